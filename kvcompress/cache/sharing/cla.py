"""CLA-style cross-layer sharing: groups of layers attend to their first layer's cache.

Only a group's producer stores K/V; its consumers append nothing and attend with their own queries
to the producer's history (their entries in ``stores`` are the producer's store). With
``skip_projections`` the engine does not even compute a consumer's k/v projections; without it
they are computed and discarded, which gives the same logits and isolates the compute saving.

Groups: ``group_size`` consecutive layers from ``start_layer`` on (``groups: null``), an explicit list of lists
(``[[0, 1], [5, 6, 7]]``, producer first), or ``auto``: the adjacent pairs cheapest by the layer
similarity calibration until ``share_fraction`` of the layers are consumers. The producers' storage
is any storage (``storage=int8`` composes sharing with quantization).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from torch import Tensor

from kvcompress.cache.base import ModelSpec, Rotary
from kvcompress.cache.layered import KeyMode, LayeredCache
from kvcompress.cache.sharing.groups import auto_groups, check_groups, describe, producers, uniform_groups
from kvcompress.cache.sharing.similarity import LayerSimilarity, load_or_measure

AUTO_METRICS = ("ppl", "cosine")


class CLACache(LayeredCache):
    def __init__(self, group_size: int = 2, start_layer: int = 0, groups: str | Sequence[Sequence[int]] | None = None,
                 share_fraction: float = 0.5, auto_metric: str = "ppl", skip_projections: bool = True,
                 storage: str = "dense", storage_params: dict | None = None, keys: KeyMode = "post_rope"):
        super().__init__(storage, storage_params, keys)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        if isinstance(start_layer, bool) or not isinstance(start_layer, int) or start_layer < 0:
            raise ValueError(f"start_layer must be an int >= 0, got {start_layer!r}")
        if isinstance(groups, str) and groups != "auto":
            raise ValueError(f"groups must be null (uniform by group_size), 'auto' or a list of lists, got {groups!r}")
        if not isinstance(share_fraction, (int, float)) or not 0 <= share_fraction < 1:
            raise ValueError(f"share_fraction must be in [0, 1), got {share_fraction!r}")
        if auto_metric not in AUTO_METRICS:
            raise ValueError(f"unknown auto_metric {auto_metric!r}; valid choices: {', '.join(AUTO_METRICS)}")
        self.group_size, self.start_layer = group_size, start_layer
        self.groups_setting, self.share_fraction = groups, share_fraction
        self.auto_metric, self.skip_projections = auto_metric, skip_projections
        self.similarity: LayerSimilarity | None = None

    def setup(self, spec: ModelSpec) -> None:
        super().setup(spec)
        n = spec.num_layers
        if self.groups_setting is None:
            if self.group_size > n:
                raise ValueError(f"group_size must be in [1, num_layers={n}], got {self.group_size}")
            if self.start_layer > n - 1:
                raise ValueError(f"start_layer must be in [0, num_layers - 1 = {n - 1}], got {self.start_layer}")
            self.set_groups(uniform_groups(n, self.group_size, self.start_layer))
        elif self.groups_setting == "auto":
            if round(self.share_fraction * n) > n - 1:
                raise ValueError(f"share_fraction must leave layer 0 a producer: at most {(n - 1) / n:.3f} "
                                 f"for {n} layers, got {self.share_fraction}")
            self.set_groups([])  # until calibrated
        else:
            self.set_groups(check_groups(self.groups_setting, n))

    def set_groups(self, groups: list[list[int]]) -> None:
        self.groups = groups
        self.producer = producers(groups, self.spec.num_layers)

    def calibrate(self, ctx) -> None:
        if self.groups_setting != "auto":
            return
        log = lambda msg: print(msg, file=sys.stderr, flush=True)
        self.similarity = load_or_measure(ctx, self._pair_cache, self._pair_cache(None), log)
        self.set_groups(auto_groups(self.pair_cost(), self.spec.num_layers, self.share_fraction))
        log(f"[sharing] auto groups ({self.auto_metric}, share_fraction={self.share_fraction}): "
            f"{describe(self.groups)}")

    def _pair_cache(self, first: int | None) -> CLACache:
        """A dense cache sharing only layers (first, first+1); ``None``: sharing nothing (the full cache)."""
        cache = CLACache(groups=[] if first is None else [[first, first + 1]], keys=self.keys)
        cache.setup(self.spec)
        return cache

    def pair_cost(self) -> list[float]:
        """Cost of layer i+1 reading layer i, by ``auto_metric``: NLL increase, or 1 - mean K/V cosine."""
        sim = self.similarity
        if self.auto_metric == "ppl":
            return sim.pair_dnll.tolist()
        cos = (sim.key_cos.diagonal(1) + sim.value_cos.diagonal(1)) / 2
        return (1 - cos).tolist()

    # -- runtime --------------------------------------------------------------------------------
    def is_consumer(self, layer: int) -> bool:
        return self.producer[layer] != layer

    def reset(self, batch_size: int) -> None:
        super().reset(batch_size)
        self.stores = [self.stores[owner] for owner in self.producer]  # consumers alias their producer's store

    def computes_kv(self, layer: int) -> bool:
        return not (self.skip_projections and self.is_consumer(layer))

    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> None:
        if not self.is_consumer(layer):  # consumers' k/v (when computed at all) are discarded
            super().append(layer, k, v, pos, rope)

    def memory_report(self) -> dict[str, float]:
        return {**super().memory_report(), "shared_layers": sum(len(g) - 1 for g in self.groups)}
