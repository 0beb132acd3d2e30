"""Number formats and shared parts of the frontier storages: FP8 (e4m3 / e5m2), FP4 e2m1 with its block scales,
the calibrated absmax that per-tensor and per-head scales use, the fp8 / fp4 stores' common base, and the saved
per-layer fit of ``pq`` and ``kvtc``.

FP4 e2m1 (OCP Microscaling Formats v1.0, the element type of MXFP4 and NVFP4): 1 sign, 2 exponent, 1 mantissa bit,
magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}, no inf or NaN. A code is ``sign << 3 | magnitude index``; two codes a byte
(low nibble first). Values are rounded to the nearest magnitude (a tie to the smaller) and saturate at 6.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvcompress.cache import artifacts
from kvcompress.cache.storage.codec import CodecStore
from kvcompress.kernels import quant_attention, resolve

FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {name: float(torch.finfo(dt).max) for name, dt in FP8.items()}  # 448, 57344
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of the largest e2m1 magnitude (6 = 1.5 * 2**2): MX's shared exponent subtracts it
TINY = 2.0**-24


def to_fp8(x: Tensor, fmt: str) -> Tensor:
    """Saturating cast of fp32 ``x`` to float8 (torch's cast rounds to nearest even; out of range would be NaN/inf)."""
    m = FP8_MAX[fmt]
    return x.float().clamp(-m, m).to(FP8[fmt])


def e2m1_codes(x: Tensor) -> Tensor:
    """fp32 x (already divided by its scale) -> uint8 codes in [0, 16): nearest e2m1 value, saturating at +-6."""
    grid = torch.tensor(E2M1, device=x.device)
    idx = torch.bucketize(x.abs().clamp_max(E2M1_MAX).contiguous(), (grid[1:] + grid[:-1]) / 2)
    return (idx | ((x < 0).to(idx.dtype) << 3)).to(torch.uint8)


def e2m1_values(codes: Tensor) -> Tensor:
    """uint8 codes -> fp32 e2m1 values."""
    grid = torch.tensor(E2M1, device=codes.device)
    mag = grid[(codes & 7).long()]
    return torch.where(codes >= 8, -mag, mag)


def e8m0_exponent(amax: Tensor) -> Tensor:
    """MX shared scale exponent of a block: floor(log2(amax)) - emax(e2m1), in [-127, 127] (amax 0: -127)."""
    e = torch.floor(torch.log2(amax.float().clamp_min(2.0**-127))) - E2M1_EMAX
    return e.clamp(-127, 127)


def calibrated_absmax(x: Tensor, key_bound: str) -> Tensor:
    """Per KV head absmax (Hkv,) of calibration samples x (1, Hkv, N, D).

    ``key_bound``: "value" (the entries themselves: values, pre-RoPE keys), "pair" (post-RoPE keys: a rotate-half
    RoPE turns channels c and c + D/2 together, so no rotated entry exceeds that pair's norm at any position), or
    "norm" (keys under any further orthogonal transform: no entry exceeds the vector's norm)."""
    x = x.float()[0]
    if key_bound == "pair":
        half = x.shape[-1] // 2
        x = (x[..., :half].square() + x[..., half:].square()).sqrt()
    elif key_bound == "norm":
        x = x.norm(dim=-1)
    return x.abs().flatten(1).amax(1)


def on_device(held: dict[str, Tensor], name: str, like: Tensor) -> Tensor:
    """The calibration tensor ``held[name]`` on ``like``'s device; the moved copy replaces the held one."""
    x = held[name]
    if x.device != like.device:
        x = held[name] = x.to(like.device)
    return x


class FloatCodeStore(CodecStore):
    """What the fp8 and fp4 stores share: fp32 scales calibrated per layer and side (``scales``; None: s = 1), and
    decode attention read straight from their float codes (``packed(parts, side) -> Packed``, theirs)."""

    def __init__(self, keys: str = "post_rope"):
        self.scales: list[dict[str, Tensor]] | None = None  # per layer {"k": fp32, "v": ...}
        super().__init__(keys)

    def calibrate_scales(self, ctx, scale: Callable[[Tensor], Tensor]) -> None:
        """Per layer and side, ``scale`` of the calibrated absmax per KV head (``calibrated_absmax``: post-RoPE keys
        bounded by their pair norms, unless a wrapping transform sets ``ctx.key_bound``)."""
        bound = getattr(ctx, "key_bound", None) or ("pair" if self.keys == "post_rope" else "value")
        self.scales = [{name: scale(calibrated_absmax(x, b)) for name, x, b in (("k", k, bound), ("v", v, "value"))}
                       for k, v, _ in ctx.kv_samples()]

    def calibrated_scale(self, name: str, like: Tensor) -> Tensor:
        if self.scales is None:
            return torch.ones((), device=like.device)
        return on_device(self.scales[self.layer], name, like)

    def attend_packed(self, q: Tensor, q_pos: Tensor, k_pos: Tensor, parts: dict[str, Tensor],
                      lengths: Tensor | None = None) -> Tensor | None:
        """Where ``kernels.resolve`` picks Triton: decode attention read straight from the float codes
        (``kernels.triton_fp``); ``lengths`` (captured form: 0-d, the slots written) is read on the device, so only
        held slots are read and the launch can be captured. Elsewhere None: ``decode``, then attention, which is
        the kernel's reference."""
        if resolve(q.device) != "triton":
            return None
        n = None if lengths is None else lengths.view(1).to(torch.int32).repeat(3)
        return quant_attention(q, q_pos, k_pos, self.packed(parts, "k"), self.packed(parts, "v"), backend="triton",
                               lengths=n)

    def calibration_tensors(self) -> list[Tensor]:
        return [t for layer in self.scales or [] for t in layer.values()]


def saved_fit(store, ctx, name: str, fitted: str, field: str,
              fit_layer: Callable[[Tensor, Tensor], Any]) -> tuple[list, dict[str, float | str]]:
    """``fit_layer(k, v)`` of every layer's calibration samples (keys rotated at the calibration positions under
    ``keys=post_rope``), saved like KVQuant's calibration: at ``store.calibration_file``, else under the context's
    cache dir (``paths.calibration``) named by its key and a digest of ``store.settings()``, fitted again where the
    saved settings differ. Returns the fits and the record's stats."""
    if store.keys == "post_rope" and getattr(ctx, "rope", None) is None:
        raise ValueError(f"storage.keys=post_rope: fitting {fitted} to post-RoPE keys needs the calibration's "
                         "rotary embedding; this calibration has none (use storage.keys=pre_rope)")
    settings = store.settings()
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(store.calibration_file or Path(ctx.cache_dir) / f"{name}-{ctx.key}-{digest}.pt").expanduser()
    meta = {"ctx_key": ctx.key, **settings}

    def fit() -> dict:
        return {"meta": meta, field: [fit_layer(ctx.rope.rotate(k, pos) if store.keys == "post_rope" else k, v)
                                      for k, v, pos in ctx.kv_samples()]}

    blob, reused = artifacts.cached(path, fit, f"{name.upper()} calibration file",
                                    lambda saved: saved.get("meta") == meta)
    return blob[field], {"calibration_reused": float(reused), "calibration_file": str(path)}
