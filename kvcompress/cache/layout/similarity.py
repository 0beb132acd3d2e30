"""Layer similarity calibration: how alike every pair of layers' K/V are, and what sharing costs.

On the calibration text (``CalibrationContext``) this measures, for every pair of layers (i, j):
the mean cosine similarity of their keys and of their values, per token and KV head; and for every
adjacent pair the increase in mean next-token NLL when layer i+1 reads layer i's cache (a cache
sharing only that pair, in the loop). Keys are compared before RoPE: both layers rotate a token by
the same angle, so the cosine is the same after it.

The result is saved as ``similarity-<ctx.key>.pt`` in ``ctx.cache_dir`` and reused by every run on
the same model and calibration data; ``scripts/sharing_heatmap.py`` plots it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kvcompress.cache import artifacts
from kvcompress.cache.base import CalibrationContext, KVCache

FORMAT_VERSION = 1
WHAT = "layer-similarity calibration file"


@dataclass
class LayerSimilarity:
    key: str                 # the calibration context's key (model + data + tokens)
    key_cos: Tensor          # (L, L) mean cosine of keys between layers
    value_cos: Tensor        # (L, L) mean cosine of values
    pair_dnll: Tensor        # (L-1,) NLL increase when layer i+1 reads layer i's cache
    base_nll: float          # NLL with the full cache
    path: Path | None = field(default=None, compare=False)  # where it was loaded from or saved to (not saved)

    def saved(self) -> dict:
        """The form saved on disk (``artifacts``): the fields but ``path``, with the format version."""
        return {"format": FORMAT_VERSION, **{k: v for k, v in asdict(self).items() if k != "path"}}

    @classmethod
    def from_saved(cls, data: dict, path: Path) -> LayerSimilarity:
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a layer-similarity file of format {FORMAT_VERSION}; delete it")
        return cls(**{k: v for k, v in data.items() if k != "format"}, path=path)

    @classmethod
    def load(cls, path: Path) -> LayerSimilarity:
        return cls.from_saved(artifacts.load(path, WHAT), path)


def mean_cosines(x: list[Tensor]) -> Tensor:
    """(L, L) mean over tokens and heads of cos(x_i, x_j); ``x`` holds one (1, H, N, D) tensor per layer."""
    unit = torch.stack([t.float().flatten(0, 2) for t in x])  # (L, H*N, D)
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("imd,jmd->ij", unit, unit) / unit.shape[1]


def measure(ctx: CalibrationContext, share_pair: Callable[[int], KVCache], base: KVCache,
            log: Callable[[str], None]) -> LayerSimilarity:
    samples = ctx.kv_samples()
    key_cos = mean_cosines([k for k, _, _ in samples])
    value_cos = mean_cosines([v for _, v, _ in samples])
    pairs = range(len(samples) - 1)
    windows = getattr(ctx, "windows", None)
    tokens = windows.numel() if isinstance(windows, Tensor) else "the calibration"
    log(f"[sharing] measuring what sharing costs: {len(pairs) + 1} NLL passes over {tokens} tokens (the full cache, "
        f"then each of the {len(pairs)} adjacent layer pairs shared alone); once per model and calibration text")
    base_nll = ctx.nll(base)
    bar = tqdm(pairs, desc="sharing cost per layer pair", disable=not getattr(ctx, "progress", True))
    dnll = [ctx.nll(share_pair(i)) - base_nll for i in bar]
    log(f"[sharing] layer similarity measured: base NLL {base_nll:.4f}, pair dNLL "
        f"min {min(dnll):.4f} (layers {dnll.index(min(dnll))}-{dnll.index(min(dnll)) + 1}) max {max(dnll):.4f}")
    return LayerSimilarity(ctx.key, key_cos, value_cos, torch.tensor(dnll, dtype=torch.float64), base_nll)


def load_or_measure(ctx: CalibrationContext, share_pair: Callable[[int], KVCache], base: KVCache,
                    log: Callable[[str], None] = artifacts.log) -> LayerSimilarity:
    """The saved similarity for ``ctx.key`` if there is one, else measure and save it."""
    path = Path(ctx.cache_dir).expanduser() / f"similarity-{ctx.key}.pt"
    data, reused = artifacts.cached(path, lambda: measure(ctx, share_pair, base, log).saved(), WHAT,
                                    lambda saved: LayerSimilarity.from_saved(saved, path).key == ctx.key)
    log(f"[sharing] layer similarity {'from' if reused else 'saved to'} {path}")
    return LayerSimilarity.from_saved(data, path)
