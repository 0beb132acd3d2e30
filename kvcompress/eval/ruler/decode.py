"""Greedy answers with the cache in the loop, for both protocols, batched.

Every row has a context c_i (prefilled in chunks, right-padded; pads sit at PAD_POSITION and are never
attended) and a question q_i (possibly empty). After the prefill, every step feeds one token per row: row i
feeds q_i[t] while t < |q_i|, then its own greedy choices. So

* query-aware (q_i empty): the whole prompt is the prefill, the cache compresses it with the question inside,
  and the answer is decoded: what ``engine.generate`` does;
* query-agnostic (q_i = question): the context is prefilled alone and the question arrives one token at a time.
  Each question token is a decode step; the prompt ends with the context (``Session.prefill``: the explicit
  boundary), so a cache that compresses when the prompt ends (``policy.when=prefill``) compresses the context at
  the first question token, before any question token is attended (only that token is held beside the context,
  as the newest slot), and decode-time policies keep evicting while the question and the answer go through.

With the full cache both protocols compute the same attention over the same tokens and positions; only the
chunking differs. Rows stop at a stop id or after ``max_new_tokens``; finished rows keep stepping (their
tokens are dropped) so the batch stays in lockstep without padding inside the decode.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcompress.cache.base import KVCache
from kvcompress.engine.model import Transformer
from kvcompress.engine.session import Session


@torch.inference_mode()
def answer(model: Transformer, cache: KVCache | Session, contexts: Sequence[Sequence[int]],
           questions: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = (),
           chunk: int | None = None) -> list[list[int]]:
    """Greedy continuations (without their stop token) of context_i + question_i."""
    device = model.device
    session = (cache if isinstance(cache, Session) else Session(model, cache)).start(len(contexts))
    logits, pos = session.prefill(contexts, chunk)
    q_len = torch.tensor([len(q) for q in questions], device=device)
    width = int(q_len.max()) if len(questions) else 0
    q_tok = torch.zeros(len(contexts), max(width, 1), dtype=torch.long, device=device)
    for i, q in enumerate(questions):
        q_tok[i, : len(q)] = torch.as_tensor(list(q), dtype=torch.long, device=device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    out = torch.zeros(len(contexts), max_new_tokens, dtype=torch.long, device=device)
    n_out = torch.zeros(len(contexts), dtype=torch.long, device=device)
    done = torch.zeros(len(contexts), dtype=torch.bool, device=device)
    rows = torch.arange(len(contexts), device=device)
    for t in range(width + max_new_tokens):
        pick = logits.argmax(-1)
        answering = (t >= q_len) & ~done
        out[rows[answering], n_out[answering]] = pick[answering]
        n_out += answering.long()
        done |= answering & (torch.isin(pick, stop) | (n_out >= max_new_tokens))
        if bool(done.all()):
            break
        step = t < q_len
        nxt = torch.where(step, q_tok[:, min(t, q_tok.shape[1] - 1)], pick)
        logits = session.step(nxt, pos)
        pos = pos + 1
    session.finish("ruler decode")
    stop_set, answers = set(stop_ids), []
    for row, n in zip(out.tolist(), n_out.tolist(), strict=True):
        answers.append(row[: next((j for j, x in enumerate(row[:n]) if x in stop_set), n)])
    return answers
