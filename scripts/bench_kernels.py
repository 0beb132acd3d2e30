"""Decode-attention microbenchmark at SmolLM2-135M's shapes (3 KV heads x 3 query heads each, head_dim 64):
full-precision SDPA (what the eager full cache runs) against attention over packed codes, by the Triton kernel
and by the PyTorch reference (dequantize, then SDPA: what the eager quantized storages cost today). The float
codes (``fp8`` e4m3 per token, ``nvfp4``, ``mxfp4``) are encoded by their codec; their reference is its decode.

    python scripts/bench_kernels.py --out results/gpu_bench/kernels      # CUDA, bf16
    python scripts/bench_kernels.py --device cpu --dtype float32 --contexts 256 --batches 1 --backends torch

One layer, one query token per row; the median of ``--repeats`` timed calls (CUDA events on CUDA).
``GB/s`` is the bytes the cache holds for the layer divided by the time: the attention's memory roofline.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvcompress.cache.storage.frontier.fp4 import Fp4Store
from kvcompress.cache.storage.frontier.fp8 import Fp8Store
from kvcompress.kernels import reference
from kvcompress.kernels.layout import Packed, dense
from kvcompress.kernels.ops import latent_attention, quant_attention

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FLOAT = {"fp8": lambda: Fp8Store("e4m3", "token"), "nvfp4": lambda: Fp4Store("nvfp4"),
         "mxfp4": lambda: Fp4Store("mxfp4")}
STORAGES = ("full", "int8", "int4", "kivi2", "latent0.5", *FLOAT)


def quantize_channel(x: torch.Tensor, bits: int, g: int) -> Packed:
    """Per-channel groups of g tokens (KIVI keys), min/max asymmetric, codes packed along D."""
    grouped = x.float().unflatten(2, (-1, g))
    lo, hi = grouped.amin(3, keepdim=True), grouped.amax(3, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(2.0**-24)
    codes = ((grouped - lo) / scale).round().clamp(0, 2**bits - 1).to(torch.uint8).flatten(2, 3)
    return Packed(reference.pack(codes, bits), scale.squeeze(3).half(), lo.squeeze(3).half(), None, bits, g, "channel")


def quantize_token(x: torch.Tensor, bits: int, g: int, res: torch.Tensor | None = None) -> Packed:
    codes, scale, zero = reference.quantize_tokens(x, bits, g, False)
    return Packed(codes, scale, zero, res, bits, g, "token")


def case(storage: str, B: int, T: int, dtype: torch.dtype, device: str, H: int = 3, groups: int = 3, D: int = 64):
    """Inputs of one layer's decode attention: (q, q_pos, k_pos, K side or latents, V side ...); float codes add
    their codec's decode (the reference's input) as a last item."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H * groups, 1, D, generator=gen).to(device, dtype)
    k, v = (torch.randn(B, H, T, D, generator=gen).to(device, dtype) for _ in range(2))
    q_pos, k_pos = torch.full((B, 1), T, device=device), torch.arange(T, device=device).expand(B, T).int()
    if storage == "full":
        return q, q_pos, k_pos, dense(k), dense(v)
    if storage in ("int8", "int4"):
        bits = int(storage[3:])
        return q, q_pos, k_pos, quantize_token(k, bits, 64), quantize_token(v, bits, 64)
    if storage in FLOAT:  # uncalibrated nvfp4: tensor scale 1 (the bytes read are the same)
        store = FLOAT[storage]()
        parts = store.encode(k, v)
        decode = lambda: [dense(x) for x in store.decode(parts, dtype)]  # noqa: E731
        return q, q_pos, k_pos, store.packed(parts, "k"), store.packed(parts, "v"), decode
    if storage == "kivi2":  # residual 128 in fp16, keys per channel (32 tokens), values per token (32 channels)
        n_q = max(T - 128, 0) // 32 * 32
        if not n_q:
            return q, q_pos, k_pos, dense(k.half()), dense(v.half())
        kq = quantize_channel(k[:, :, :n_q], 2, 32)
        kq = Packed(kq.codes, kq.scale, kq.zero, k[:, :, n_q:].half(), 2, 32, "channel")
        return q, q_pos, k_pos, kq, quantize_token(v[:, :, :n_q], 2, 32, v[:, :, n_q:].half())
    rank = H * D // 2  # latent0.5: one latent of half the layer's K (V) width, shared by the heads, fp16
    basis = torch.linalg.qr(torch.randn(H * D, rank, generator=gen))[0].reshape(H, D, rank).to(device, dtype)
    ck, cv = (torch.randn(B, 1, T, rank, generator=gen).to(device, torch.float16) for _ in range(2))
    return q, q_pos, k_pos, ck, cv, basis, basis, torch.zeros(H, D, device=device, dtype=dtype)


def held_bytes(args) -> int:
    tensors = []
    for a in args[3:]:
        if isinstance(a, Packed):
            tensors += [t for t in (a.codes, a.scale, a.zero, a.res, a.outer) if t is not None]
        elif isinstance(a, torch.Tensor) and a.dim() == 4:
            tensors.append(a)
    return sum(t.nbytes for t in tensors) + args[2].nbytes


def runner(storage: str, backend: str, args):
    if backend == "sdpa":  # the eager full cache: SDPA with the position mask over full-precision K/V
        q, q_pos, k_pos, k, v = args
        mask = (k_pos[:, None, None, :] <= q_pos[:, None, :, None])
        return lambda: F.scaled_dot_product_attention(q, k.res, v.res, attn_mask=mask, enable_gqa=True)
    if storage in FLOAT:
        return lambda: quant_attention(*args[:3], *(args[5]() if backend == "torch" else args[3:5]), backend=backend)
    if storage.startswith("latent"):
        return lambda: latent_attention(*args, backend=backend)
    return lambda: quant_attention(*args, backend=backend)


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of one call, after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(contexts, batches, storages, backends, dtype, device, repeats) -> list[dict]:
    rows = []
    for T in contexts:
        for B in batches:
            for storage in storages:
                args = case(storage, B, T, dtype, device)
                for backend in (("sdpa", *backends) if storage == "full" else backends):
                    s = timed(runner(storage, backend, args), device, repeats)
                    rows.append({"storage": storage, "backend": backend, "context": T, "batch": B,
                                 "ms": round(1000 * s, 4), "held_bytes": held_bytes(args),
                                 "gb_per_s": round(held_bytes(args) / s / 1e9, 2)})
                    print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    base = {(r["context"], r["batch"]): r["ms"] for r in rows if r["backend"] == "sdpa"}
    lines = ["| storage | backend | context | batch | ms / layer | vs full SDPA | held MB | GB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        full = base.get((r["context"], r["batch"]))
        rel = "" if full is None else f"{full / r['ms']:.2f}x"
        lines.append(f"| {r['storage']} | {r['backend']} | {r['context']} | {r['batch']} | {r['ms']:.4g} | {rel} | "
                     f"{r['held_bytes'] / 1e6:.2f} | {r['gb_per_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8176])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--storages", nargs="+", default=list(STORAGES), choices=STORAGES)
    ap.add_argument("--backends", nargs="+", default=["torch", "triton"], choices=["torch", "triton"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None, help="folder for kernels.json and kernels.md")
    a = ap.parse_args(argv)
    rows = run(a.contexts, a.batches, a.storages, a.backends, DTYPES[a.dtype], a.device, a.repeats)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        name = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "cpu"
        meta = {"device": a.device, "device_name": name, "dtype": a.dtype, "torch": torch.__version__,
                "repeats": a.repeats}
        (out / "kernels.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / "kernels.md").write_text(f"Decode attention, one layer ({meta})\n\n" + table(rows))
    return rows


if __name__ == "__main__":
    main()
