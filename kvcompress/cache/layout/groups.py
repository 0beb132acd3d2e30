"""Layer groups for CLA-style sharing: uniform, explicit, or picked from a similarity calibration.

A group is an ascending list of layer indices; its first layer is the *producer* (it stores K/V),
the others are *consumers* (they attend to the producer's history). Layers in no group are their
own producer. Consumers must come after their producer: a layer cannot read a cache that is only
filled later in the same forward pass.
"""
from __future__ import annotations

from collections.abc import Sequence

from kvcompress.cache.checks import is_int


def uniform_groups(num_layers: int, size: int, start: int = 0) -> list[list[int]]:
    """Consecutive groups of ``size`` (``layout.group_size``) layers from layer ``start`` on (the last one may be
    shorter)."""
    if size > num_layers:
        raise ValueError(f"layout.group_size must be in [1, num_layers={num_layers}], got {size}")
    return [list(range(i, min(i + size, num_layers))) for i in range(start, num_layers, size)]


def check_groups(groups: Sequence[Sequence[int]], num_layers: int) -> list[list[int]]:
    """Validate explicit groups; ValueError names the offending group and the rule it breaks."""
    seen: set[int] = set()
    out = []
    for g in groups:
        if isinstance(g, (str, bytes)) or not isinstance(g, Sequence) or not g:
            raise ValueError(f"groups must be a list of non-empty lists of layer indices, got group {g!r}")
        g = list(g)
        for layer in g:
            if not is_int(layer) or not 0 <= layer < num_layers:
                raise ValueError(f"group {g}: layer index {layer!r} is outside [0, {num_layers - 1}]")
        if g[0] != min(g):
            raise ValueError(f"group {g}: its producer (the first layer listed) must be its earliest layer; "
                             f"a consumer cannot read a cache filled later in the forward pass")
        if len(set(g)) != len(g) or sorted(g) != g:
            raise ValueError(f"group {g}: layers must be distinct and ascending")
        if seen & set(g):
            raise ValueError(f"group {g}: layer(s) {sorted(seen & set(g))} already belong to another group")
        seen |= set(g)
        out.append(g)
    return out


def producers(groups: Sequence[Sequence[int]], num_layers: int) -> list[int]:
    """The producer of every layer (itself for producers and ungrouped layers)."""
    owner = list(range(num_layers))
    for g in groups:
        for layer in g[1:]:
            owner[layer] = g[0]
    return owner


def auto_groups(pair_cost: Sequence[float], num_layers: int, share_fraction: float) -> list[list[int]]:
    """Make the ``round(share_fraction * num_layers)`` layers cheapest to share consumers.

    ``pair_cost[i]`` is the cost of layer ``i + 1`` reading layer ``i``'s cache. Pairs are taken
    cheapest first; chosen pairs that touch chain into longer groups (layer i+2 then reads the
    group's producer, so the adjacent-pair cost is an optimistic estimate for it).
    """
    n = round(share_fraction * num_layers)
    consumers = {i + 1 for i in sorted(range(num_layers - 1), key=lambda i: pair_cost[i])[:n]}
    groups, current = [], [0]
    for layer in range(1, num_layers):
        if layer in consumers:
            current.append(layer)
        else:
            groups.append(current)
            current = [layer]
    groups.append(current)
    return [g for g in groups if len(g) > 1]


def describe(groups: Sequence[Sequence[int]]) -> str:
    """Compact text for logs and records: '0-1 2-3 14-15-16'."""
    return " ".join("-".join(map(str, g)) for g in groups) or "none"
