"""``layout=xkv``: one calibrated low-rank basis shared by each group of ``group_size`` adjacent layers
(cross-layer low-rank, after xKV, Chang et al., 2025), every layer storing its own latent in that basis.

Every layer still owns its store (``owners`` is the identity); what the layout changes is calibration:
``calibration_groups`` hands the storage groups of adjacent layers, and a storage with
``group_calibration`` (``storage=latent``) fits one PCA per group on the group's samples joined. The
per-token bytes equal per-layer latents of the same rank; the calibration bytes shrink by ``group_size``.

How this differs from the paper: xKV runs an online SVD of the *prompt's* K (or V) of the grouped layers
concatenated along channels and stores one token latent shared by the group (each layer its own
reconstruction matrix), at prefill. Here the basis is calibrated offline on other text and is shared in
channel space, each layer keeping its own latent, so a decode step never waits for a later layer.
"""
from __future__ import annotations

from kvcompress.cache.base import ModelSpec
from kvcompress.cache.checks import int_at_least
from kvcompress.cache.layout.base import Layout
from kvcompress.cache.layout.groups import describe, uniform_groups
from kvcompress.cache.storage.base import TokenStore


class XKV(Layout):
    def __init__(self, group_size: int = 2):
        int_at_least("layout.group_size", group_size, 1)
        self.group_size = group_size

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        self.groups = uniform_groups(spec.num_layers, self.group_size)

    def check_storage(self, storage: TokenStore) -> None:
        if not storage.group_calibration:
            raise ValueError(f"layout=xkv shares one calibrated basis per group of layers, but storage "
                             f"{type(storage).__name__} fits no per-layer calibration it could share; use "
                             f"storage=latent with layout=xkv")

    def calibration_groups(self) -> list[list[int]]:
        return [list(g) for g in self.groups]

    def report(self) -> dict[str, float | str]:
        return {"xkv_groups": describe(self.groups)}
