"""Calibration of the latent storage: per-layer PCA of keys and values, saved to disk.

For each layer the calibration keys (pre-RoPE by default) and values are split into *groups*
(one per KV head with ``per_head``, else one per layer: the heads' vectors concatenated) and a
PCA is fitted per group: mean, every principal direction (descending) and its eigenvalue. Ranks
are chosen later from the eigenvalues, so one file serves a whole rank sweep.

The file is keyed by the calibration context's ``key`` (model + calibration data + tokens) and by
the settings that change the PCA; a file made for anything else is refused, never silently used.
Eigendecompositions run in float64 on the CPU (numpy) with a sign convention, so a file is deterministic.
"""
from __future__ import annotations

import hashlib
import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from kvcompress.cache import artifacts

FORMAT_VERSION = 1
ROPE_SELECT = ("high", "low")
KEY_MODES = ("pre_rope", "post_rope")


@dataclass(frozen=True)
class PCASettings:
    """Everything (besides the calibration data) that changes the fitted projections."""

    keys: str = "pre_rope"
    rope_dims: int = 0
    rope_select: str = "high"
    per_head: bool = False
    joint_kv: bool = False
    center: bool = True

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def rope_split(head_dim: int, rope_dims: int, select: str) -> tuple[Tensor, Tensor]:
    """Indices of the ``rope_dims`` dims kept uncompressed and of the compressed rest, per head.

    Rotate-half RoPE pairs dim ``i`` with ``i + head_dim/2`` at frequency ``base**(-2i/head_dim)``,
    so whole pairs are kept: ``high`` keeps the highest-frequency pairs (i = 0, 1, ...), which
    carry the position information and compress worst (MHA2MLA's S_high); ``low`` the lowest.
    """
    half, pairs = head_dim // 2, rope_dims // 2
    first = torch.arange(pairs) if select == "high" else torch.arange(half - pairs, half)
    keep = torch.cat([first, first + half]).sort().values
    mask = torch.ones(head_dim, dtype=torch.bool)
    mask[keep] = False
    return keep, torch.arange(head_dim)[mask]


def to_groups(x: Tensor, groups: int) -> Tensor:
    """(B, Hkv, T, d) -> (B, G, T, n): per head (G = Hkv, n = d) or heads joined (G = 1, n = Hkv*d)."""
    if groups == x.shape[1]:
        return x
    B, H, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, 1, H * d).transpose(1, 2)


def from_groups(x: Tensor, heads: int) -> Tensor:
    """Inverse of ``to_groups``: (B, G, T, n) -> (B, Hkv, T, d)."""
    if x.shape[1] == heads:
        return x
    B, _, T, n = x.shape
    return x.transpose(1, 2).reshape(B, T, heads, n // heads).transpose(1, 2)


def pca(x: Tensor, center: bool) -> dict[str, Tensor]:
    """PCA of samples x (G, N, n): mean (G, n), basis (G, n, n) columns by descending eigenvalue (G, n)."""
    x = x.double().cpu()
    mean = x.mean(1) if center else torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype)
    xc = x - mean[:, None]
    cov = xc.transpose(1, 2) @ xc / x.shape[1]
    # numpy's LAPACK: torch's threaded eigh can spin for seconds on a busy CPU
    evals, evecs = (torch.from_numpy(np.stack(a)) for a in zip(*map(np.linalg.eigh, cov.numpy()), strict=True))
    evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)
    # sign convention: each direction's largest-magnitude entry is positive
    pick = evecs.abs().argmax(1, keepdim=True)
    evecs = evecs * torch.gather(evecs, 1, pick).sign()  # unit vectors: the largest entry is never 0
    return {"mean": mean.float(), "basis": evecs.float(), "eig": evals}


def fit(samples: list[tuple[Tensor, Tensor, Tensor]], s: PCASettings, rope=None, progress: bool = True
        ) -> list[dict[str, dict]]:
    """Per layer: {"key": pca, "value": pca} or {"joint": pca} from (k pre-RoPE, v, pos) samples."""
    out = []
    for k, v, pos in tqdm(samples, desc="latent calibration (PCA per layer)", leave=False, disable=not progress):
        heads, head_dim = k.shape[1], k.shape[3]
        groups = heads if s.per_head else 1
        if s.keys == "post_rope":
            k = rope.rotate(k.float(), pos)
        _, comp = rope_split(head_dim, s.rope_dims, s.rope_select)
        kx = to_groups(k[..., comp.to(k.device)].float(), groups)[0]  # (G, N, n_k)
        vx = to_groups(v.float(), groups)[0]
        if s.joint_kv:
            out.append({"joint": pca(torch.cat([kx, vx], -1), s.center)})
        else:
            out.append({"key": pca(kx, s.center), "value": pca(vx, s.center)})
    return out


def default_path(cache_dir: str | Path, ctx_key: str, s: PCASettings) -> Path:
    return Path(cache_dir).expanduser() / f"latent-{ctx_key}-{s.digest()}.pt"


def group_samples(samples: list, groups: list[list[int]]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """One sample set per group of layers: the group's keys, values and positions joined along tokens."""
    return [(torch.cat([samples[i][0] for i in g], 2), torch.cat([samples[i][1] for i in g], 2),
             torch.cat([samples[i][2] for i in g], 1)) for g in groups]


def load_or_fit(ctx, s: PCASettings, path: Path | None = None, groups: list[list[int]] | None = None
                ) -> tuple[list[dict], dict]:
    """Projections for ``ctx`` and settings ``s``: loaded from ``path`` if present, else fitted and saved.
    ``groups`` (layout=xkv): one PCA per group of layers, fitted on the group's samples joined; every layer of
    a group gets the same (shared) dict.

    Returns the per-layer PCAs and a stats dict (calibration_s, calibration_reused, sample bytes, peak RSS).
    """
    grouped = groups is not None and any(len(g) > 1 for g in groups)
    default = default_path(ctx.cache_dir, ctx.key, s)
    path = Path(path).expanduser() if path else default
    meta = {"version": FORMAT_VERSION, "ctx_key": ctx.key, "settings": asdict(s)}
    if grouped:
        if path == default:
            path = path.with_stem(f"{path.stem}-xkv{hashlib.sha256(json.dumps(groups).encode()).hexdigest()[:8]}")
        meta["settings"] = {**meta["settings"], "layer_groups": [list(g) for g in groups]}
    t0, made = time.perf_counter(), {}

    def make() -> dict:
        if s.keys == "post_rope" and getattr(ctx, "rope", None) is None:
            raise ValueError("keys=post_rope needs a calibration context with the model's rotary embedding (ctx.rope)")
        samples = ctx.kv_samples()
        made["calibration_sample_bytes"] = float(sum(t.nbytes for layer in samples for t in layer))
        layers = fit(group_samples(samples, groups) if grouped else samples, s, getattr(ctx, "rope", None),
                     getattr(ctx, "progress", True))
        made["calibration_peak_rss_bytes"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        made["tokens"] = samples[0][0].shape[2]
        return {"meta": meta, "layers": layers}

    blob, reused = artifacts.cached(path, make, "latent calibration file",
                                    lambda saved: check_meta(saved.get("meta", {}), meta, path))
    stats = {"calibration_s": time.perf_counter() - t0, "calibration_reused": float(reused),
             "calibration_file": str(path), **{k: v for k, v in made.items() if k != "tokens"}}
    layers = blob["layers"]
    if grouped:  # every layer of a group gets its group's fit
        layers = [layers[next(j for j, g in enumerate(groups) if i in g)] for i in range(sum(map(len, groups)))]
    if reused:
        artifacts.log(f"latent: reusing calibration {path}")
    else:
        artifacts.log(f"latent: calibrated {len(layers)} layers on {made['tokens']} tokens in "
                      f"{stats['calibration_s']:.1f}s (samples {made['calibration_sample_bytes'] / 2**20:.1f} MiB, "
                      f"peak RSS {made['calibration_peak_rss_bytes'] / 2**20:.0f} MiB) -> {path}")
    return layers, stats


def check_meta(got: dict, want: dict, path: Path) -> bool:
    """True for a calibration file made for this model, calibration text and settings; any other is refused."""
    if got.get("version") != want["version"]:
        raise ValueError(f"calibration file {path} has format version {got.get('version')!r}, expected "
                         f"{want['version']}; delete it to recalibrate")
    if got.get("ctx_key") != want["ctx_key"]:
        raise ValueError(f"calibration file {path} was made for model/calibration data {got.get('ctx_key')!r}, "
                         f"not {want['ctx_key']!r}; delete it or set storage.calibration_file to another path")
    diff = {k: (got["settings"].get(k), v) for k, v in want["settings"].items() if got["settings"].get(k) != v}
    if diff:
        detail = ", ".join(f"{k}={a!r} in the file but {b!r} here" for k, (a, b) in diff.items())
        raise ValueError(f"calibration file {path} was made with other settings ({detail}); delete it or set "
                         f"storage.calibration_file to another path")
    return True


def explained(eig: Tensor) -> Tensor:
    """Cumulative explained-variance fraction per rank, (G, n)."""
    return eig.cumsum(-1) / eig.sum(-1, keepdim=True).clamp_min(1e-300)


def choose_rank(spec: int | float | str, eig: Tensor, energy: float) -> int:
    """Rank from a spec: an int, a fraction of the dimension, or "auto" (smallest rank reaching
    ``energy`` of the variance in every group, i.e. the max over groups)."""
    n = eig.shape[-1]
    if spec == "auto":
        return int(min(n, int((explained(eig) < energy - 1e-9).sum(-1).max()) + 1))
    if isinstance(spec, float):
        return max(1, min(n, round(spec * n)))
    return int(spec)
