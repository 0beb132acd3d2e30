"""The attention band of a sliding-window layer, for the duration of its attention call.

A sliding-window layer (Mistral, Gemma 3's local layers) lets a query at position q see keys at positions in
(q - window, q]. ``cache/window.py`` keeps such a layer's store to its window between steps; within a multi-token
step (a prefill chunk) the band still has to be masked, and every storage's attention builds its mask with
``base.visibility_mask``, which reads the window set here (None: causal only). A module global rather than a
ContextVar: torch.compile traces a global read (and guards on it), not ``ContextVar.get``.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_window: int | None = None


def current_window() -> int | None:
    return _window


@contextmanager
def attention_window(window: int | None) -> Iterator[None]:
    global _window
    previous, _window = _window, window
    try:
        yield
    finally:
        _window = previous
