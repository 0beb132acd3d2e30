"""Why KIVI-2 scores 0 in this grid: the answers and the tensor checks behind results/ruler/README.md's section.

    OMP_NUM_THREADS=2 .venv/bin/python results/ruler/kivi_check.py answers [dtype] [config ...]
    OMP_NUM_THREADS=2 .venv/bin/python results/ruler/kivi_check.py tensors

``answers``: the 8 query-aware prompts of the small grid (niah_single_1/2, 1024 tokens, samples 0-3, seed 0, chat
template, 16 new tokens, prefill chunk 512: what ``eval=ruler`` decodes) answered with each cache, printed with the
accuracy (RULER's all-of string match). A config is one quoted string of kvc overrides (``""`` is the full cache);
``kbits=N`` / ``vbits=N`` replace the bits of one side of a quantized storage after setup (the storages' YAMLs
share one ``bits``), so ``"storage=kivi storage.bits=2 vbits=8"`` quantizes only the keys to 2 bits.

``tensors``: the full cache's keys and values of the first prompt (every layer, after prefill) and the first decode
step's queries; KIVI-2's stored tensors are checked against an independent fp32 re-implementation, chunked against
one-shot prefill, and its decode attention against dequantize-then-SDPA; then the error each side adds.
"""
from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import Tensor

import kvcompress.run  # noqa: F401  (registers the config resolvers)
from kvcompress.cache.storage.quant.codec import QuantSide
from kvcompress.cache.storage.quant.quantizer import QuantConfig
from kvcompress.cache.storage.residual import Stage
from kvcompress.engine.generate import prefill
from kvcompress.eval.data import load_text, wants_bos
from kvcompress.eval.ruler import ALL_TASKS
from kvcompress.eval.ruler import evaluation as ruler_eval
from kvcompress.eval.ruler.decode import answer
from kvcompress.eval.ruler.haystack import token_codec
from kvcompress.eval.ruler.scoring import score
from kvcompress.eval.ruler.tasks import Haystacks
from kvcompress.job import build_cache, prepare, setup_cache
from kvcompress.kernels import quant_attention
from kvcompress.run import CONF_DIR

TASKS, LENGTH, SAMPLES, NEW_TOKENS, CHUNK = ("niah_single_1", "niah_single_2"), 1024, 4, 16, 512
BASE = ["model=smollm2-135m", "eval=ruler", "eval.chat=true"]


def load(dtype: str):
    run = prepare(compose("config", overrides=[*BASE, f"dtype={dtype}"]))
    codec = token_codec(run.tokenizer, wants_bos(run.tokenizer, "auto"), True)
    hay = Haystacks(codec, lambda: load_text("paradise_lost", run.data_dir))
    samples = [ALL_TASKS[t].make(ruler_eval.sample_seed(0, t, LENGTH, i), hay, LENGTH, t)
               for t in TASKS for i in range(SAMPLES)]
    return run, samples


def make_cache(run, dtype: str, overrides: list[str]):
    sides = [o for o in overrides if o.startswith(("kbits=", "vbits="))]
    cfg = compose("config", overrides=[*BASE, f"dtype={dtype}", *[o for o in overrides if o not in sides]])
    cache = build_cache(cfg)
    setup_cache(cache, run.model.config.spec(), cfg)
    for o in sides:  # the per-layer stores are shallow copies: they share this dict
        side = "key" if o[0] == "k" else "value"
        old = cache.storage.configs[side]
        cache.storage.configs[side] = QuantConfig(int(o.split("=")[1]), old.group_size, old.axis, old.symmetric)
    return cache


def answers(dtype: str, configs: list[str]) -> None:
    run, samples = load(dtype)
    tok = run.tokenizer
    print("references:", [s.references[0] for s in samples])
    first = previous = None
    for c in configs:
        cache = make_cache(run, dtype, c.split())
        outs = answer(run.model, cache, [s.prompt.units for s in samples], [[] for _ in samples], NEW_TOKENS,
                      [tok.eos_token_id], CHUNK)
        text = [tok.decode(o, skip_special_tokens=True) for o in outs]
        acc = sum(score(t, s.references, s.metric) for t, s in zip(text, samples, strict=True)) / len(samples)
        same = ", ".join(f"{sum(a == b for a, b in zip(outs, o, strict=True))}/{len(outs)} as {n}"
                         for n, o in (("the first config", first), ("the previous one", previous)) if o is not None)
        print(f"\n== {c or 'full'} ({dtype}): acc {acc:.2f}" + (f"; same answers: {same}" if same else ""))
        for t in text:
            print("   ", repr(t))
        first, previous = first or outs, outs
        sys.stdout.flush()


def fake_quant(x: Tensor, bits: int, g: int, axis: str, steps: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Independent asymmetric round-to-nearest in fp32 (no fp16 scale / zero): per-channel groups of g tokens
    or per-token groups of g channels; with ``steps`` also each element's quantization step."""
    B, H, T, D = x.shape
    grouped, dim = (x.reshape(B, H, T // g, g, D), 3) if axis == "channel" else (x.reshape(B, H, T, D // g, g), 4)
    lo, hi = grouped.amin(dim, keepdim=True), grouped.amax(dim, keepdim=True)
    step = (hi - lo).clamp_min(1e-8) / (2**bits - 1)
    out = (((grouped - lo) / step).round() * step + lo).reshape(B, H, T, D)
    return (out, step.expand_as(grouped).reshape(B, H, T, D)) if steps else out


def prefix_quant(x: Tensor, n_q: int, bits: int, axis: str) -> Tensor:
    """The first n_q tokens through ``fake_quant``, the rest exact (the fp16 residual, without its rounding)."""
    return torch.cat([fake_quant(x[:, :, :n_q], bits, 32, axis), x[:, :, n_q:]], 2)


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One decode query per head (B, Hq, 1, D) over all of k, v (B, Hkv, T, D), GQA heads repeated."""
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))


def rel(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f})"


@torch.inference_mode()
def tensors() -> None:
    run, samples = load("float32")
    model, spec, prompt = run.model, run.model.config.spec(), list(samples[0].prompt.units)
    full, queries = make_cache(run, "float32", []), {}
    attend = type(full).attend

    def record(self, layer, q, q_pos):
        if q.shape[2] == 1:
            queries[layer] = q.clone()
        return attend(self, layer, q, q_pos)

    full.reset(1)
    logits, pos = prefill(model, [prompt], full, CHUNK)
    type(full).attend = record
    try:
        model(logits.argmax(-1)[:, None], pos[:, None], full)
    finally:
        type(full).attend = attend
    T, kc, vc = len(prompt), QuantConfig(2, 32, "channel"), QuantConfig(2, 32, "token")
    n_q = (T - 128) // 32 * 32
    print(f"prompt {T} tokens; KIVI-2 (g32, r128) quantizes the first {n_q} keys and values")
    diff, flips, kernel, out = [], [], [], {"K2": [], "V2": [], "K2V2": [], "K4V4": []}
    err = {"K2": [], "V2": [], "K4": [], "V4": []}
    for layer in range(spec.num_layers):
        k, v = (t[:, :, :T] for t in full.views[layer].read()[:2])
        q = queries[layer]
        part = lambda cfg: Stage(QuantSide(cfg), 128, torch.float16)  # the storage's residual stage, fp16 residual
        pk, pv, ok, ov = part(kc), part(vc), part(kc), part(vc)
        for lo in range(0, T, 100):  # chunks that end off the 32-token groups
            pk.append(k[:, :, lo:lo + 100])
            pv.append(v[:, :, lo:lo + 100])
        ok.append(k)
        ov.append(v)
        assert (pk.n_q, pv.n_q) == (n_q, n_q)
        for a, b in ((pk, ok), (pv, ov)):
            assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True)), "chunking"
        dk, dv = pk.read(torch.float32), pv.read(torch.float32)
        assert torch.equal(dk[:, :, n_q:], k[:, :, n_q:].half().float()), "residual keys not the fp16 originals"
        assert torch.equal(dv[:, :, n_q:], v[:, :, n_q:].half().float()), "residual values not the fp16 originals"
        for d, x, cfg in ((dk, k, kc), (dv, v, vc)):  # the store quantizes the fp16-cast input
            ref, step = fake_quant(x.half().float()[:, :, :n_q], 2, 32, cfg.axis, steps=True)
            diff.append(rel(d[:, :, :n_q], ref))
            apart = (ref - d[:, :, :n_q]).abs() / step
            assert float(apart.max()) < 1.01, "more than one step from the independent quantizer"
            flips.append(float((apart > 0.01).float().mean()))
        got = quant_attention(q, pos[:, None], torch.arange(T)[None], pk.packed(), pv.packed())
        want = sdpa(q, dk, dv)
        kernel.append(float((got - want).abs().max()))
        k2, k4 = prefix_quant(k, n_q, 2, "channel"), prefix_quant(k, n_q, 4, "channel")
        v2, v4 = prefix_quant(v, n_q, 2, "token"), prefix_quant(v, n_q, 4, "token")
        for name, a, b in (("K2", k2, k), ("K4", k4, k), ("V2", v2, v), ("V4", v4, v)):
            err[name].append(rel(a[:, :, :n_q], b[:, :, :n_q]))
        exact = sdpa(q, k, v)
        for name, kk, vv in (("K2", k2, v), ("V2", k, v2), ("K2V2", k2, v2), ("K4V4", k4, v4)):
            out[name].append(rel(sdpa(q, kk, vv), exact))
    print(f"stored vs independent fp32 quantizer, rel. diff per side and layer: max {max(diff):.3f}; elements that "
          f"differ (by one step: values at a rounding boundary, moved by fp16 scale / zero): max {max(flips):.2%}")
    print("prefill in 100-token chunks == one-shot prefill (codes, scales, zeros, residual), every layer: yes")
    print(f"the last {T - n_q} keys and values read back as their fp16-rounded originals, every layer: yes")
    print(f"quant_attention vs dequantize-then-SDPA, max abs diff over layers: {max(kernel):.1e}")
    print("relative error of the quantized prefix, over the 30 layers:")
    for name, xs in err.items():
        print(f"  {name}: {spread(xs)}")
    print("relative error of the first decode step's attention output (prefix quantized, last 128 tokens exact):")
    for name, xs in out.items():
        print(f"  {name}: {spread(xs)}")


if __name__ == "__main__":
    mode, rest = (sys.argv[1] if len(sys.argv) > 1 else "answers"), sys.argv[2:]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        if mode == "tensors":
            tensors()
        else:
            dtype = rest.pop(0) if rest and rest[0] in ("float32", "bfloat16") else "float32"
            answers(dtype, rest or ["", "storage=kivi storage.bits=2"])
