"""Validation helpers: every setting is checked in a constructor or ``check(spec)``, before weights load,
and every error names the setting, its valid range and the value given."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# dtype names accepted by every setting that picks a storage dtype; "model" keeps the model's dtype
DTYPES: dict[str, torch.dtype | None] = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                                         "float32": torch.float32, "model": None}


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def fail(setting: str, allowed: str, got: Any) -> None:
    raise ValueError(f"{setting} must be {allowed}, got {got!r}")


def int_at_least(setting: str, x: Any, lo: int, hi: int | None = None) -> int:
    """An int in [lo, hi] (hi: no upper bound when None)."""
    if not is_int(x) or x < lo or (hi is not None and x > hi):
        fail(setting, f"an int in [{lo}, {hi}]" if hi is not None else f"an int >= {lo}", x)
    return x


def number_in(setting: str, x: Any, lo: float, hi: float, open_lo: bool = False, open_hi: bool = False) -> float:
    """A number in the interval lo..hi, each end closed unless told open."""
    ok = is_number(x) and (x > lo if open_lo else x >= lo) and (x < hi if open_hi else x <= hi)
    if not ok:
        fail(setting, f"a number in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}", x)
    return float(x)


def one_of(setting: str, x: Any, choices: Iterable) -> Any:
    choices = list(choices)
    if x not in choices:
        raise ValueError(f"unknown {setting} {x!r}; valid choices: {', '.join(map(str, choices))}")
    return x


def dtype_of(setting: str, name: str) -> torch.dtype | None:
    return DTYPES[one_of(setting, name, DTYPES)]
