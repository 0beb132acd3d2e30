"""Pareto fronts over any number of objectives, each maximised or minimised."""
from __future__ import annotations

import math
from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float], maximize: Sequence[bool]) -> bool:
    """``a`` is at least as good as ``b`` on every objective and strictly better on one."""
    better = False
    for x, y, up in zip(a, b, maximize, strict=True):
        if (x < y) if up else (x > y):
            return False
        better |= (x > y) if up else (x < y)
    return better


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[int]:
    """Indices (ascending) of the points no other point dominates.

    Points with a NaN/inf or missing coordinate are never on the front and never dominate.
    Equal points do not dominate each other, so duplicates of a front point are all on it.
    """
    if any(len(p) != len(maximize) for p in points):
        raise ValueError(f"every point needs {len(maximize)} coordinates (one per objective)")
    valid = [i for i, p in enumerate(points) if all(isinstance(x, (int, float)) and math.isfinite(x) for x in p)]
    return [i for i in valid if not any(dominates(points[j], points[i], maximize) for j in valid if j != i)]
