"""An lm-eval ``LM`` over a loaded model and cache: the native engine with the chosen KV cache in the loop.

Options: ``batch_size``, ``chunk`` (tokens per forward step when scoring; 1 = exact decode semantics),
``prefill_chunk`` (prompt chunk in generation; default = chunk), ``window`` and ``bos`` (rolling perplexity
windows, as ``eval=ppl``), ``rolling`` (``lm_eval``, the default: lm-eval's own rolling windows, comparable with
its ``hf`` model | ``ppl``: eval=ppl's disjoint windows), ``max_length``, ``max_gen_toks``. ``eval=lm_eval``
wraps the run's model and cache (``from_context``); ``kvc-lm-eval`` builds them from model args first
(``kvcompress.harness.model``, the Hydra side).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from kvcompress.cache.base import PAD_POSITION
from kvcompress.engine.generate import Sampling
from kvcompress.engine.session import Session, padded
from kvcompress.eval.data import tokenize, wants_bos

log = logging.getLogger(__name__)
ROLLING = ("ppl", "lm_eval")
Pair = tuple[tuple[str, str], list[int], list[int]]


def _batch_size(value: Any) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("kvcompress: batch_size=%s is not supported; using 8", value)
        return 8
    value = int(value)
    if value < 1:
        raise ValueError(f"kvcompress batch_size must be >= 1, got {value}")
    return value


def _check(checks: list[tuple[bool, str, str, Any]]) -> None:
    for ok, name, allowed, got in checks:
        if not ok:
            raise ValueError(f"kvcompress model_args: {name} must be {allowed}, got {got!r}")


@dataclass
class Loaded:
    """What the LM scores with: a loaded model, its tokenizer, a set-up cache, and names for lm-eval's report."""

    model: Any
    tokenizer: Any
    cache: Any
    name: str
    cache_name: str


def length_checks(max_length: int | None, window: int | None):
    """The checks of ``max_length`` / ``window`` against the model's context (runnable before weights load)."""
    def check(limit: int) -> tuple[int, int]:
        length = int(max_length or limit)
        win = int(window) if window is not None else min(1024, length)
        _check([(2 <= length <= limit, "max_length", f"in [2, {limit}]", max_length),
                (2 <= win <= length, "window", f"in [2, max_length={length}]", window)])
        return length, win
    return check


class KVCompressLM(TemplateLM):
    """lm-eval ``LM`` over kvcompress: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(self, batch_size: int | str = 8, max_batch_size: int | None = None, chunk: int = 16,
                 prefill_chunk: int | None = None, window: int | None = None, bos: str | bool = "auto",
                 rolling: str = "lm_eval", max_length: int | None = None, max_gen_toks: int = 256,
                 loaded: Loaded | None = None) -> None:
        super().__init__()
        self.batch = _batch_size(batch_size)
        self.chunk, self.prefill_chunk = int(chunk), int(prefill_chunk or chunk)
        self.bos, self.rolling, self.max_gen_toks = bos, rolling, int(max_gen_toks)
        _check([(rolling in ROLLING, "rolling", " | ".join(ROLLING), rolling),
                (bos in ("auto", True, False), "bos", "auto, true or false", bos),
                (self.chunk >= 1 and self.prefill_chunk >= 1, "chunk / prefill_chunk", ">= 1", chunk),
                (self.max_gen_toks >= 1, "max_gen_toks", ">= 1", max_gen_toks),
                (loaded is not None, "loaded", "a loaded model and cache (kvc-lm-eval builds one from model args)",
                 loaded)])
        self._max_length, self.window = length_checks(max_length, window)(loaded.model.config.max_position)
        self.built = loaded
        self.model, self.tokenizer, self.cache = loaded.model, loaded.tokenizer, loaded.cache
        self._device = self.model.device
        self.memory: dict[str, float] = {}

    @classmethod
    def from_context(cls, ctx, cache_name: str = "?", **options: Any) -> KVCompressLM:
        """Wrap an already loaded model + cache (``eval=lm_eval`` inside ``kvc``)."""
        return cls(loaded=Loaded(ctx.model, ctx.tokenizer, ctx.cache, ctx.model.config.name, cache_name), **options)

    # -- tokenization (same conventions as lm-eval's hf model) ------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **kw)

    # -- scoring ----------------------------------------------------------------------------------
    def _note_memory(self) -> None:
        report = self.cache.memory_report()
        if report.get("kv_bytes_fp16", 0) >= self.memory.get("kv_bytes_fp16", -1):
            self.memory = report

    @torch.inference_mode()
    def _score(self, rows: list[list[int]], prompts: list[int] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed input rows ``chunk`` tokens at a time through the cache (right-padded; pads sit at PAD_POSITION,
        never attended). Returns (B, T-1) log-probs of each row's own next tokens, whether each was the argmax,
        and (B, V) log-probs after each row's last token. ``prompts``: each row's prompt length p (lm-eval's
        context): the first p tokens are prefilled and the prompt ends there (``Session.prefill``), the rest is
        teacher-forced; only positions >= p - 1 are scored then."""
        dev = self.model.device
        tokens, pos, lengths = padded(rows, dev)
        T = tokens.shape[1]
        logp = torch.zeros(len(rows), T - 1, dtype=torch.float64, device=dev)
        greedy = torch.zeros(len(rows), T - 1, dtype=torch.bool, device=dev)
        last = torch.zeros(len(rows), self.model.config.vocab_size, dtype=torch.float64, device=dev)

        def take(raw: torch.Tensor, at: torch.Tensor) -> None:
            """Logits (B, c, V) of the tokens at positions ``at`` (B, c): each scores the row's next token."""
            lp = F.log_softmax(raw.float(), dim=-1)
            real = at < PAD_POSITION
            nxt = tokens.gather(1, torch.where(real, at + 1, 0).clamp(max=T - 1))
            b, c = (real & (at < lengths[:, None] - 1)).nonzero(as_tuple=True)
            logp[b, at[b, c]] = lp[b, c].gather(-1, nxt[b, c, None])[:, 0].double()
            greedy[b, at[b, c]] = lp[b, c].argmax(-1) == nxt[b, c]
            b, c = (real & (at == lengths[:, None] - 1)).nonzero(as_tuple=True)
            last[b] = lp[b, c].double()

        session = Session(self.model, self.cache).start(len(rows))
        if prompts is None:  # teacher-forced throughout: no prompt boundary
            session.score(tokens, self.chunk, pos=pos, on_chunk=lambda raw, lo, hi: take(raw, pos[:, lo:hi]))
        else:
            p = torch.tensor(prompts, device=dev)
            first, _ = session.prefill([r[:n] for r, n in zip(rows, prompts, strict=True)], self.chunk)
            take(first[:, None], (p - 1)[:, None])
            at = p[:, None] + torch.arange(int((lengths - p).max()), device=dev)[None]
            at = torch.where(at < lengths[:, None], at, PAD_POSITION)
            rest = tokens.gather(1, torch.where(at < PAD_POSITION, at, 0))
            session.score(rest, self.chunk, pos=at, on_chunk=lambda raw, lo, hi: take(raw, at[:, lo:hi]))
        session.finish("kvcompress lm-eval scoring")
        self._note_memory()
        return logp, greedy, last

    def _loglikelihood_tokens(self, requests: list[Pair], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """Sum of continuation log-probs (left-truncated to max_length like lm-eval's hf). Requests with the same
        model input (context + continuation without its last token, e.g. one-token choices of one question) share
        one row; rows are batched longest first. A cache that acts when the prompt ends (``policy.when=prefill``)
        gets lm-eval's context as the prompt (rows then share only with the same context length); the first
        continuation token is predicted by the prefill itself, as the first generated token is."""
        prompted = self.cache.acts_at_prompt_end()
        fulls = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in requests]
        members: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for i, full in enumerate(fulls):
            prompt = max(1, len(full) - len(requests[i][2])) if prompted else 0
            members.setdefault((tuple(full[:-1]), prompt), []).append(i)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        order = Collator(list(members), sort_fn=lambda x: (-len(x[0]), x))
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="kvcompress loglikelihood", leave=False)
        for batch in order.get_batched(n=self.batch):
            logp, greedy, last = self._score([list(x) for x, _ in batch], [n for _, n in batch] if prompted else None)
            for row, key in enumerate(batch):
                n = len(key[0])  # logp[row, j] scores inp[j + 1]; last[row] scores the token after inp
                for i in members[key]:
                    k, tok = len(requests[i][2]), fulls[i][-1]
                    ll = float(logp[row, n - k : n - 1].sum() + last[row, tok])
                    answer = (ll, bool(greedy[row, n - k : n - 1].all()) and int(last[row].argmax()) == tok)
                    out[i] = answer
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(len(members[key]))
        bar.close()
        return out

    def _ppl_windows(self, text: str) -> list[list[int]]:
        """``eval=ppl`` windows of one text: BOS (when the model uses one) + window-1 tokens, disjoint; the last
        may be shorter. Every token after a window's first is scored (all of them when the first is BOS)."""
        bos = wants_bos(self.tokenizer, self.bos)
        body = self.window - (bos is not None)
        ids = tokenize(self.tokenizer, text)
        head = [bos] if bos is not None else []
        return [head + ids[i : i + body] for i in range(0, len(ids), body)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood. ``rolling=ppl``: eval=ppl's windowing (see _ppl_windows); ``rolling=
        lm_eval``: lm-eval's own rolling windows (max_length, one token of context), as its hf model does."""
        if self.rolling == "lm_eval":
            results = []
            for (text,) in (r.args for r in requests):
                pairs = [((None, None), *make_disjoint_window(w)) for w in get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, 1)]
                results.append(sum(ll for ll, _ in self._loglikelihood_tokens(pairs, disable_tqdm=True)))
            return results
        windows = [(i, w) for i, r in enumerate(requests) for w in self._ppl_windows(r.args[0]) if len(w) > 1]
        totals = [0.0] * len(requests)
        order = Collator(windows, sort_fn=lambda x: -len(x[1]))
        for batch in tqdm(list(order.get_batched(n=self.batch)), disable=disable_tqdm, desc="kvcompress rolling",
                          leave=False):
            logp, _, last = self._score([w[:-1] for _, w in batch])
            for row, (i, w) in enumerate(batch):
                totals[i] += float(logp[row, : len(w) - 2].sum() + last[row, w[-1]])
        for r, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    # -- generation -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], until: list[str], max_new: int, sampling: Sampling) -> list[str]:
        session = Session(self.model, self.cache).start(len(prompts))
        logits, pos = session.prefill(prompts, self.prefill_chunk)  # replayed if asked; the prompt ends here
        eos = self.eot_token_id
        rows: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for step in range(max_new):
            nxt = sampling.pick(logits).tolist()
            for i, t in enumerate(nxt):
                if done[i]:
                    continue
                if t == eos:
                    done[i] = True
                    continue
                rows[i].append(t)
                text = self.tokenizer.decode(rows[i])
                done[i] = any(s and s in text for s in until)
            if all(done) or step + 1 == max_new:
                break
            logits = session.step(torch.tensor(nxt, device=pos.device), pos)
            pos = pos + 1
        session.finish("kvcompress lm-eval generation")
        self._note_memory()
        texts = [self.tokenizer.decode(r) for r in rows]
        for s in until:
            texts = [t.split(s)[0] if s else t for t in texts]
        return texts

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, do_sample=true) generation; stops at any ``until`` string, EOS or max_gen_toks."""
        reqs = [(ctx, dict(kw)) for ctx, kw in (r.args for r in requests)]
        order = Collator([(c, kw, self.tok_encode(c)) for c, kw in reqs], sort_fn=lambda x: -len(x[2]),
                         group_fn=lambda x: x[1], group_by="gen_kwargs")
        out: list[str] = []
        bar = tqdm(total=len(reqs), disable=disable_tqdm, desc="kvcompress generate", leave=False)
        for batch in order.get_batched(n=self.batch):
            kw = dict(batch[0][1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tokenizer.decode([self.eot_token_id])
            until = until + ([eos_text] if eos_text not in until else [])
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temp = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
            sampling = Sampling(temp, int(kw.pop("top_k", 0) or 0), float(kw.pop("top_p", 1.0) or 1.0))
            keep = max(1, self.max_length - max_new)
            prompts = [toks[-keep:] for _, _, toks in batch]
            texts = self._generate(prompts, until, max_new, sampling)
            for (ctx, gkw, _), text in zip(batch, texts, strict=True):
                out.append(text)
                self.cache_hook.add_partial("generate_until", (ctx, gkw), text)
            bar.update(len(batch))
        bar.close()
        return order.get_original(out)

    def get_model_info(self) -> dict:
        return {"kvcompress_model": self.built.name, "kvcompress_cache": self.built.cache_name}
