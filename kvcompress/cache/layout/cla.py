"""CLA-style cross-layer sharing (Brandon et al., 2024): groups of layers attend to their first layer's store.

Only a group's producer stores K/V; its consumers append nothing and attend with their own queries
to the producer's history. With ``skip_projections`` the engine does not even compute a consumer's
k/v projections; without it they are computed and discarded (same logits; isolates the compute saving).

Groups: ``group_size`` consecutive layers from ``start_layer`` on (``groups: null``), an explicit list of
lists (``[[0, 1], [5, 6, 7]]``, producer first), or ``auto``: the adjacent pairs cheapest by the layer
similarity calibration until ``share_fraction`` of the layers are consumers. Any storage holds the
producers' tokens and any policy evicts them, scored by every layer of the group.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from kvcompress.cache import artifacts
from kvcompress.cache.base import ModelSpec, Rotary
from kvcompress.cache.checks import int_at_least, number_in, one_of
from kvcompress.cache.layout.base import CacheFor, Layout, NewStore
from kvcompress.cache.layout.groups import auto_groups, check_groups, describe, producers, uniform_groups
from kvcompress.cache.layout.similarity import LayerSimilarity, load_or_measure
from kvcompress.cache.storage.base import TokenStore

AUTO_METRICS = ("ppl", "cosine")


class CLA(Layout):
    def __init__(self, group_size: int = 2, start_layer: int = 0, groups: str | Sequence[Sequence[int]] | None = None,
                 share_fraction: float = 0.5, auto_metric: str = "ppl", skip_projections: bool = True):
        int_at_least("layout.group_size", group_size, 1)
        int_at_least("layout.start_layer", start_layer, 0)
        if isinstance(groups, str) and groups != "auto":
            raise ValueError(f"layout.groups must be null (uniform by group_size), 'auto' or a list of lists, "
                             f"got {groups!r}")
        number_in("layout.share_fraction", share_fraction, 0, 1, open_hi=True)
        one_of("layout.auto_metric", auto_metric, AUTO_METRICS)
        self.group_size, self.start_layer = group_size, start_layer
        self.groups_setting, self.share_fraction = groups, share_fraction
        self.auto_metric, self.skip_projections = auto_metric, bool(skip_projections)
        self.similarity: LayerSimilarity | None = None

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        n = spec.num_layers
        if self.groups_setting is None:
            if self.start_layer > n - 1:
                raise ValueError(f"layout.start_layer must be in [0, num_layers - 1 = {n - 1}], got {self.start_layer}")
            self.set_groups(uniform_groups(n, self.group_size, self.start_layer))
        elif self.groups_setting == "auto":
            if round(self.share_fraction * n) > n - 1:
                raise ValueError(f"layout.share_fraction must leave layer 0 a producer: at most {(n - 1) / n:.3f} "
                                 f"for {n} layers, got {self.share_fraction}")
            self.set_groups([])  # until calibrated
        else:
            self.set_groups(check_groups(self.groups_setting, n))

    def set_groups(self, groups: list[list[int]]) -> None:
        self.groups = groups
        self.producer = producers(groups, self.spec.num_layers)

    def calibrate(self, ctx, cache_for: CacheFor) -> None:
        if self.groups_setting != "auto":
            return
        share_pair = lambda first: cache_for(CLA(groups=[[first, first + 1]]))
        self.similarity = load_or_measure(ctx, share_pair, cache_for(Layout()))
        self.set_groups(auto_groups(self.pair_cost(), self.spec.num_layers, self.share_fraction))
        artifacts.log(f"[sharing] auto groups ({self.auto_metric}, share_fraction={self.share_fraction}): "
                      f"{describe(self.groups)}")

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

    def owners(self) -> list[int]:
        return list(self.producer)

    def build(self, new_store: NewStore) -> list[TokenStore]:
        stores = {p: new_store(p) for p in sorted(set(self.producer))}
        return [stores[p] for p in self.producer]  # consumers alias their producer's store

    def computes_kv(self, layer: int) -> bool:
        return not (self.skip_projections and self.is_consumer(layer))

    def append(self, layer: int, view: TokenStore, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> None:
        if not self.is_consumer(layer):  # consumers' k/v (when computed at all) are discarded
            view.append(k, v, pos, rope)

    def report(self) -> dict[str, float | str]:
        out = {"shared_layers": sum(len(g) - 1 for g in self.groups), "layer_groups": describe(self.groups)}
        if self.similarity is not None and self.similarity.path is not None:
            out["calibration_file"] = str(self.similarity.path)
        return out
