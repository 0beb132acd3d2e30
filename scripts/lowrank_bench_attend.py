"""Decode-step attention cost of the low-rank cache, absorbed vs reconstructed, without a model.

SmolLM2-135M's attention shapes (30 layers, 9 query / 3 KV heads, head_dim 64, RoPE theta 1e5), a 2,048-token
history, batch 1: per decode step every layer appends one token and attends one query. The projections come
from synthetic calibration samples (timing does not depend on their values). Variants run interleaved, the
median of ``--reps`` rounds is reported.

    .venv/bin/python scripts/lowrank_bench_attend.py --device cpu  --out results/lowrank
    python3 scripts/lowrank_bench_attend.py --device cuda --out results/lowrank   (on a GPU machine)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kvcompress.cache import ComposedCache, FullCache
from kvcompress.cache.base import ModelSpec
from kvcompress.cache.storage.latent.store import LatentStore
from kvcompress.engine.rope import RotaryEmbedding

SPEC = ModelSpec("smollm2-135m-shapes", num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, max_position=8192)
VARIANTS = {
    "full cache": None,
    "K+V 0.5, reconstructed": dict(rank_fraction=0.5),
    "K+V 0.5, absorbed": dict(rank_fraction=0.5, absorb=True),
    "joint 0.5 rope16, reconstructed": dict(rank_fraction=0.5, joint_kv=True, rope_dims=16),
    "joint 0.5 rope16, absorbed (values)": dict(rank_fraction=0.5, joint_kv=True, rope_dims=16, absorb=True),
    "joint 0.5 rope16 nope, reconstructed": dict(rank_fraction=0.5, joint_kv=True, rope_dims=16, nope=True),
    "joint 0.5 rope16 nope, absorbed (K and V)": dict(rank_fraction=0.5, joint_kv=True, rope_dims=16, nope=True,
                                                      absorb=True),
}


class SyntheticCalibration:
    """Random keys / values with a decaying spectrum, per layer (1, Hkv, N, D)."""

    def __init__(self, cache_dir: str, tokens: int = 2048):
        self.key, self.cache_dir, self.tokens = "synthetic-smollm2-shapes", cache_dir, tokens

    def kv_samples(self):
        g = torch.Generator().manual_seed(0)
        n, d = self.tokens, SPEC.num_kv_heads * SPEC.head_dim
        scale = torch.linspace(1, 0.01, d)
        out = []
        for _ in range(SPEC.num_layers):
            k, v = (torch.randn(n, d, generator=g) * scale for _ in range(2))
            shape = (1, n, SPEC.num_kv_heads, SPEC.head_dim)
            out.append((k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2), torch.arange(n)[None]))
        return out


@torch.inference_mode()
def decode_step_seconds(cache, rope, context: int, steps: int, device: torch.device) -> float:
    """Fill ``context`` tokens, then time ``steps`` decode steps (append + attend in every layer)."""
    H, D = SPEC.num_kv_heads, SPEC.head_dim
    g = torch.Generator(device=device).manual_seed(1)
    cache.reset(1)
    kv = torch.randn(1, H, context, D, device=device, generator=g)
    pos = torch.arange(context, device=device)[None]
    for layer in range(SPEC.num_layers):
        cache.append(layer, kv, kv, pos, rope)
    k1 = torch.randn(1, H, 1, D, device=device, generator=g)
    q = torch.randn(1, SPEC.num_heads, 1, D, device=device, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(steps):
        p = torch.full((1, 1), context + i, device=device)
        sync()
        t = time.perf_counter()
        for layer in range(SPEC.num_layers):
            cache.append(layer, k1, k1, p, rope)
            cache.attend(layer, rope.rotate(q, p), p)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="results/lowrank")
    args = ap.parse_args()
    device = torch.device(args.device)
    rope = RotaryEmbedding(SPEC.head_dim, 100000.0, None, SPEC.max_position)
    caches = {}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = SyntheticCalibration(tmp)
        for name, kw in VARIANTS.items():
            cache = FullCache() if kw is None else ComposedCache(storage=LatentStore(**kw))
            cache.setup(SPEC)
            cache.calibrate(ctx)
            caches[name] = cache
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.reps):  # interleaved rounds
        for name, cache in caches.items():
            results[name].append(decode_step_seconds(cache, rope, args.context, args.steps, device))
    full = statistics.median(results["full cache"])
    cpu = f"CPU, {torch.get_num_threads()} threads"
    name_dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    lines = [f"Attention-only decode step (30 layers, append + attend), context {args.context}, batch 1, fp32, "
             f"{name_dev}; median of {args.reps} interleaved rounds x {args.steps} steps. "
             f"`{Path(__file__).name} --device {args.device} --context {args.context}`", "",
             "| cache | ms / step | vs full | rounds (ms) |", "|---|---|---|---|"]
    for name, ts in results.items():
        m = statistics.median(ts)
        lines.append(f"| {name} | {1e3 * m:.2f} | {m / full:.2f}x | {', '.join(f'{1e3 * t:.2f}' for t in ts)} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"attend_bench_{device.type}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
