"""The layout axis: which layers read which store. ``Layout`` itself is ``layout=per_layer``: one store
per layer, the identity.

A layout builds, per batch, one *view* per layer (a ``TokenStore`` the layer appends to and attends
over) and says which layer *owns* the store each layer reads. Several layers reading one owner is
sharing (CLA); a view that combines two layers' tokens is merging (MiniCache). Policies act per owner.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from kvcompress.cache.base import KVCache, ModelSpec, Rotary
from kvcompress.cache.storage.base import TokenStore

NewStore = Callable[[int], TokenStore]  # layer -> an empty store of the chosen storage
CacheFor = Callable[["Layout"], KVCache]  # layout -> a dense cache with no policy (for calibration)


class Layout:
    """``layout=per_layer``: every layer owns its store."""

    def check(self, spec: ModelSpec) -> None:
        """Validate settings against the model (before weights load)."""
        self.spec = spec

    def check_storage(self, storage: TokenStore) -> None:
        """Refuse a storage this layout cannot work with (before weights load). Default: any."""

    def calibration_groups(self) -> list[list[int]]:
        """Groups of layers whose per-layer storage calibrations are fitted jointly (xKV: one basis per
        group). Default: every layer alone."""
        return [[layer] for layer in range(self.spec.num_layers)]

    def calibrate(self, ctx, cache_for: CacheFor) -> None:
        """One-off preparation (e.g. picking layer groups); ``cache_for`` builds dense caches to measure with."""

    def owners(self) -> list[int]:
        """Per layer, the layer whose store it reads (itself when it owns one)."""
        return list(range(self.spec.num_layers))

    def build(self, new_store: NewStore) -> list[TokenStore]:
        """A batch's views, one per layer (a shared store appears several times)."""
        return [new_store(layer) for layer in range(self.spec.num_layers)]

    def computes_kv(self, layer: int) -> bool:
        """False lets the engine skip the layer's k/v projections (it appends nothing)."""
        return True

    def append(self, layer: int, view: TokenStore, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> None:
        view.append(k, v, pos, rope)

    def after_attend(self, layer: int) -> Tensor | None:
        """Runs after the owner's last reader attended; returns the slot re-ordering (new slot i holds old
        slot idx[..., i]) when the layout re-organised the store, so policy state can follow."""
        return None

    def report(self) -> dict[str, float | str]:
        return {}
