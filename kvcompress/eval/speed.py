"""Prefill and decode throughput and per-token latency at a given context length and batch, on the engine session
(``kvcompress.engine.session``: KVzip's replay and the prompt boundary as in every evaluation; eager, captured or
compiled decode steps)."""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvcompress.cache.base import ModelSpec
from kvcompress.engine.session import Session
from kvcompress.engine.static import static_form
from kvcompress.eval.base import EvalContext, Evaluation, require
from kvcompress.eval.data import check_dataset, load_text
from kvcompress.eval.ppl import text_windows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_prefill_decode(session: Session, tokens: torch.Tensor, decode_tokens: int, chunk: int | None,
                        bar=None) -> tuple[float, list[float], float]:
    """On ``session``: prefill ``tokens[:, :C]`` (KVzip's replay and the prompt boundary included, as everywhere),
    then decode the next ``decode_tokens`` text tokens one step at a time on the session's decode path.

    Decoding is teacher-forced (same work as greedy), so its NLL comes for free. Returns prefill seconds, each
    decode step's seconds, and the summed NLL of the decoded tokens; non-finite logits fail the pass.
    """
    dev, B = session.model.device, tokens.shape[0]
    C = tokens.shape[1] - decode_tokens
    session.start(B)
    _sync(dev)
    t0 = time.perf_counter()
    logits, _ = session.prefill(tokens[:, :C], chunk)
    _sync(dev)
    prefill_s = time.perf_counter() - t0
    steps, nll = [], torch.zeros((), dtype=torch.float64, device=dev)
    for i in range(decode_tokens):
        nll += F.cross_entropy(logits.float(), tokens[:, C + i], reduction="sum")
        if i + 1 == decode_tokens:
            break
        t = time.perf_counter()
        logits = session.step(tokens[:, C + i], torch.full((B,), C + i, device=dev))
        _sync(dev)
        steps.append(time.perf_counter() - t)
        if bar is not None:
            bar.update(1)
    session.finish("speed")
    return prefill_s, steps, float(nll)


DECODE_PATHS = ("eager", "auto", "graph", "compiled")
NOISE = 0.20  # (max - min) / median of the timed passes above this marks the measurement noisy


def spread(name: str, values: list[float]) -> dict[str, float]:
    """``<name>`` (the median) with its ``_min`` / ``_max`` over the timed passes, and ``noisy`` (0 or 1):
    ``(max - min) / median > NOISE``. A noisy measurement also prints one line on stderr."""
    med, lo, hi = statistics.median(values), min(values), max(values)
    noisy = len(values) > 1 and med > 0 and (hi - lo) / med > NOISE
    if noisy:
        print(f"kvc: warning: {name} is noisy: passes span {lo:.4g}..{hi:.4g} around the median {med:.4g} "
              f"(more than {NOISE:.0%}); the machine is probably loaded", file=sys.stderr)
    return {name: med, f"{name}_min": lo, f"{name}_max": hi, "noisy": int(noisy)}


SESSION_DECODE = {"eager": "eager", "graph": "captured", "compiled": "compiled"}  # eval.decode_path -> Session


WHICH_HAVE_STATIC_FORMS = ("(dense, quantized and latent storages have one, and fixed-budget decode-time policies "
                           "such as H2O/TOVA/StreamingLLM/key-norm/KeyDiff; sharing layouts, prefill-time and "
                           "stateful policies, KVTC, GEAR with a rank and bitsandbytes do not)")


def auto_path(has_static_form: bool, device_type: str) -> str:
    """``eval.decode_path=auto``: where the cache has a static form, the CUDA graph on CUDA and the compiled step on
    a CPU (1.37x eager decode in fp32 and 2.17x in bf16 at batch 1, 1k context, and ahead of llama.cpp:
    results/cpu_bench/llamacpp/t2.md); eager otherwise."""
    if not has_static_form:
        return "eager"
    return "graph" if device_type == "cuda" else "compiled" if device_type == "cpu" else "eager"


def session_for(ctx: EvalContext, capacity: int, want: str = "eager") -> Session:
    """The engine session a measurement runs on. ``eager``: the cache's own step. ``graph``: its static-capacity form
    of ``capacity`` slots, the step a CUDA graph (on a CPU: the static step, eagerly: path ``static``);
    ``compiled``: that step compiled by Inductor (where compiling fails: the static step, and the reason on stderr);
    ``auto``: ``auto_path``. The static form is exact (equal logits), so ppl holds. A cache without a static form
    is refused naming ``eval.decode_path``."""
    form = None if want == "eager" else static_form(ctx.cache, capacity)
    if want != "eager" and form is None:
        require(want == "auto", "eval.decode_path", f"eager or auto for a cache without a static-capacity form "
                f"{WHICH_HAVE_STATIC_FORMS}", want)
    if want == "auto":
        want = auto_path(form is not None, ctx.model.device.type)
        if form is None:  # never silently: the record's decode_path says eager, stderr says why
            print(f"kvc: eval.decode_path=auto runs eager: {type(ctx.cache).__name__} has no static-capacity form "
                  f"{WHICH_HAVE_STATIC_FORMS}", file=sys.stderr)
    return Session(ctx.model, ctx.cache, decode=SESSION_DECODE[want], capacity=capacity)


def timed_passes(session: Session, tokens: torch.Tensor, decode_tokens: int, repeats: int, chunk: int | None,
                 warmup: bool, progress: bool = False) -> list[tuple[float, list[float], float]]:
    """An optional short warm-up pass, then ``repeats`` timed prefill+decode passes (each a fresh batch)."""
    context = tokens.shape[1] - decode_tokens
    if warmup:
        time_prefill_decode(session, tokens[:, : min(64, context) + 4], 4, chunk)
    with tqdm(total=repeats * (decode_tokens - 1), desc="decode", disable=not progress, leave=False) as bar:
        return [time_prefill_decode(session, tokens, decode_tokens, chunk, bar) for _ in range(repeats)]


def decode_rates(passes: list[tuple[float, list[float], float]], batch: int) -> list[float]:
    """Decode tokens/s of each timed pass."""
    return [batch * len(s) / sum(s) for _, s, _ in passes]


def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


@dataclass
class Speed(Evaluation):
    context: int = 1024
    batch_size: int = 1
    decode_tokens: int = 32
    prefill_chunk: int | None = None
    warmup: bool = True
    repeats: int = 3
    dataset: str = "wikitext2"
    decode_path: str = "eager"

    def check(self, spec: ModelSpec, data_dir: Path, tokenizer=None) -> None:
        check_dataset(self.dataset, data_dir)
        require(self.decode_path in DECODE_PATHS, "eval.decode_path", f"one of {DECODE_PATHS}", self.decode_path)
        limit = spec.max_position - self.decode_tokens
        require(1 <= self.context <= limit, "eval.context", f"in [1, max_position - decode_tokens = {limit}]",
                self.context)
        require(self.batch_size >= 1, "eval.batch_size", ">= 1", self.batch_size)
        require(self.decode_tokens >= 2, "eval.decode_tokens", ">= 2", self.decode_tokens)
        require(self.repeats >= 1, "eval.repeats", ">= 1", self.repeats)
        require(self.prefill_chunk is None or self.prefill_chunk >= 1, "eval.prefill_chunk", ">= 1 or null",
                self.prefill_chunk)

    def run(self, ctx: EvalContext) -> dict[str, float]:
        text = load_text(self.dataset, ctx.data_dir)
        length = self.context + self.decode_tokens
        tokens = text_windows(ctx.tokenizer, text, length, self.batch_size, bos=False).to(ctx.model.device)
        if tokens.shape[0] < self.batch_size:  # short text: repeat rows
            tokens = tokens.repeat(-(-self.batch_size // tokens.shape[0]), 1)[: self.batch_size]
        session = session_for(ctx, length, self.decode_path)
        passes = timed_passes(session, tokens, self.decode_tokens, self.repeats, self.prefill_chunk, self.warmup,
                              ctx.progress)
        prefill_s = statistics.median(p for p, _, _ in passes)
        steps = [s for _, pass_steps, _ in passes for s in pass_steps]
        B, n, nll = self.batch_size, self.batch_size * self.decode_tokens, passes[0][2]
        return {
            "ppl": math.exp(nll / n),
            "nll": nll / n,
            "n_tokens": n,
            "prefill_tokens_per_s": B * self.context / prefill_s,  # medians over the timed passes (replay included)
            **spread("decode_tokens_per_s", decode_rates(passes, B)),  # median, _min, _max, noisy
            "decode_latency_ms_p50": 1000 * percentile(steps, 50),
            "decode_latency_ms_p90": 1000 * percentile(steps, 90),
            "prefill_s": prefill_s,
            "decode_path": session.path,
            "compile_s": session.compile_s,
            **session.cache.memory_report(),
        }
