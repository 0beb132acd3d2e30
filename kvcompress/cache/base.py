"""The one cache interface every strategy implements, and the shared attention helper.

Shapes used throughout (B batch rows, H heads, T tokens, D head_dim):
  keys / values  (B, Hkv, T, D)   keys arrive *before* RoPE
  queries        (B, Hq,  T, D)   already rotated
  positions      (B, T) int64     absolute positions; PAD_POSITION marks padding
The engine calls, for every layer and forward step: ``append`` then ``attend``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcompress.cache.window_mask import current_window

# Padding tokens get a huge position: no real query (pos <= PAD_POSITION - 1) ever sees them,
# while a padding query still sees at least itself, so no softmax row is empty.
PAD_POSITION = 2**30

# A CPU without oneDNN's reduced-precision kernels (they need AVX-512 BF16/FP16, AMX or AVX-NE-CONVERT) multiplies
# bf16/fp16 in ATen's scalar fallback: a 256-row bf16 product ran ~8x slower than the fp32 MKL one, and a masked
# bf16 decode SDPA 4.7x slower than upcasting to fp32, on this project's AVX2 CPU. There products of several rows
# (``engine.model.linear``) and masked attention (``attention``) are computed in fp32 and rounded back; with those
# kernels (AVX-512 BF16 / AMX) the native bf16 SDPA is the faster one
# (~3x at a 1k decode step: scripts/profile_cpu_step.py --attention-only --dtype bfloat16).
SLOW_CPU_HALF = {torch.bfloat16: not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                 torch.float16: not torch.ops.mkldnn._is_mkldnn_fp16_supported()}


class Rotary(Protocol):
    """The model's rotary embedding, handed to caches so they may rotate keys when they like."""

    def rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        """Rotate ``x`` (B, H, T, D) at positions ``pos`` (B, T) or (B, H, T)."""
        ...

    def cos_sin(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin tables of shape pos.shape + (D,) (rotate-half layout), for stores that rotate parts."""
        ...


@dataclass(frozen=True)
class ModelSpec:
    """What a cache may know about the model: dimensions, not weights."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    windows: tuple[int | None, ...] | None = None  # per layer: its sliding window, the model's own (cache/window.py)

    def fp16_bytes_per_token(self) -> int:
        """fp16 reference: 2 bytes x (K and V) x layers x kv_heads x head_dim."""
        return 2 * 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None


class KVCache(ABC):
    """Attention history of every layer of one batch.

    Lifecycle: ``setup(spec)`` validates settings against the model before any weights load;
    ``calibrate(ctx)`` runs once after loading (no-op unless the strategy needs data);
    ``reset(batch_size)`` starts a new batch; then ``append``/``attend`` per layer and step.
    Settings and calibration survive ``reset``; token state does not.
    """

    spec: ModelSpec

    def setup(self, spec: ModelSpec) -> None:
        """Check settings against the model's dimensions; raise ValueError naming the setting."""
        self.spec = spec

    def calibrate(self, ctx: CalibrationContext) -> None:
        """One-off, data-dependent preparation (projections, layer groups). Default: none."""

    @abstractmethod
    def reset(self, batch_size: int) -> None:
        """Drop all tokens and prepare for a batch of ``batch_size`` rows."""

    @abstractmethod
    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> None:
        """Store the new tokens' pre-RoPE keys ``k``, values ``v`` at positions ``pos``."""

    @abstractmethod
    def attend(self, layer: int, q: Tensor, q_pos: Tensor) -> Tensor:
        """Attention output (B, Hq, Tq, D) of rotated queries over everything still held."""

    @abstractmethod
    def tensors(self) -> Iterable[Tensor]:
        """Every tensor the cache keeps per batch: payload, scales, zero points, positions, residuals."""

    def calibration_tensors(self) -> Iterable[Tensor]:
        """One-off tensors (projections, codebooks) reported apart from ``kv_bytes``."""
        return ()

    def computes_kv(self, layer: int) -> bool:
        """False lets the engine skip this layer's k/v projections (a layer that reads another layer's store)."""
        return True

    def replay_wanted(self) -> bool:
        """True when the strategy scores the prompt by a second pass over it (KVzip's context reconstruction):
        after prefill the engine then calls ``replay(True)``, feeds the prompt again at the following positions,
        and calls ``replay(False)``; the pass leaves no tokens behind and costs a second prefill."""
        return False

    def replay_prefix(self) -> list[int]:
        """Token ids the engine feeds before the replayed prompt (KVzip's repeat instruction); empty by default."""
        return []

    def replay(self, on: bool) -> None:
        """Begin (True) or end (False) the replay pass (see ``replay_wanted``)."""

    def end_prompt(self) -> None:
        """The evaluation's explicit prompt boundary: every token of the prompt has been fed (and replayed, if
        ``replay_wanted``); what follows is decode or teacher-forced scoring. Prefill-time compression acts on
        the next step (``policy.when=prefill|both``). Default: nothing to do."""

    def acts_at_prompt_end(self) -> bool:
        """True when the strategy needs ``end_prompt`` to be what it claims to be (prefill-time compression): an
        evaluation that defines no prompt (teacher-forced ``eval=ppl``) refuses such a cache before weights load."""
        return False

    # -- accounting: always the real tensors, never a formula --------------------------------
    def kv_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def reserved_tensors(self) -> Iterable[Tensor]:
        """Whole allocations behind ``tensors`` (spare buffer capacity included). Default: the same."""
        return self.tensors()

    def kv_bytes_allocated(self) -> int:
        """Bytes of the distinct underlying storages: a mask or a view of a full-size buffer saves nothing here."""
        seen: dict[int, int] = {}
        for t in self.reserved_tensors():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())

    def calibration_bytes(self) -> int:
        return sum(t.nbytes for t in self.calibration_tensors())

    @property
    @abstractmethod
    def tokens_seen(self) -> int:
        """Real (non-padding) tokens appended since ``reset``, summed over batch rows."""

    def kv_bytes_fp16(self) -> int:
        return self.spec.fp16_bytes_per_token() * self.tokens_seen

    def memory_report(self) -> dict[str, float]:
        held, ref = self.kv_bytes(), self.kv_bytes_fp16()
        return {
            "kv_bytes": held,
            "kv_bytes_allocated": self.kv_bytes_allocated(),
            "kv_bytes_fp16": ref,
            "compression_ratio": ref / held if held else float("nan"),
            "calibration_bytes": self.calibration_bytes(),
        }


class CalibrationContext(Protocol):
    """What the experiment layer hands a cache that needs data (the cache never sees the engine)."""

    key: str  # identifies the weights + calibration data + token count, for on-disk reuse
    cache_dir: str
    progress: bool

    def kv_samples(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per layer: pre-RoPE keys, values (1, Hkv, N, D) and positions (1, N) on calibration text."""
        ...

    def nll(self, cache: KVCache) -> float:
        """Mean next-token NLL of the calibration text with ``cache`` in the loop."""
        ...

    def retrieval_nll(self, cache: KVCache) -> float:
        """Mean NLL of recalling random spans planted in calibration text (synthetic passkey prompts; DuoAttention)."""
        ...


def expand_heads(x: Tensor, groups: int) -> Tensor:
    """Repeat KV heads (dim 1) ``groups`` times to match the query heads."""
    return x if groups == 1 or x.shape[1] == 1 else x.repeat_interleave(groups, dim=1)


def visibility_mask(q_pos: Tensor, k_pos: Tensor, groups: int = 1) -> Tensor:
    """Boolean (B, 1 or Hkv * groups, Tq, Tk) mask: key visible iff key_position <= query_position; per-head key
    positions (B, Hkv, Tk) repeated for the ``groups`` query heads of each KV head."""
    if k_pos.dim() == 2:
        k_pos = k_pos[:, None]
    visible = k_pos[:, :, None, :] <= q_pos[:, None, :, None]
    window = current_window()  # a sliding-window layer's own band: key_position > query_position - window
    if window is not None:
        visible &= k_pos[:, :, None, :] > q_pos[:, None, :, None] - window
    return expand_heads(visible, groups)


def attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """Causal-by-position scaled-dot-product attention with GQA.

    ``k_pos`` is (B, Tk) or per head (B, Hkv, Tk). Positions decide causality, so history held in
    any order, with gaps (eviction) or padding, stays correct.
    """
    groups = q.shape[1] // k.shape[1]
    if is_own_prefix(q_pos, k_pos):  # fresh prefill: the plain causal kernel, no mask (~1.5x faster on CPU)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
    if q.device.type == "cpu" and SLOW_CPU_HALF.get(q.dtype):  # no oneDNN half kernels: fp32, then rounded
        return attention(q.float(), k.float(), v.float(), q_pos, k_pos).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visibility_mask(q_pos, k_pos, groups),
                                          enable_gqa=groups > 1)


def is_own_prefix(q_pos: Tensor, k_pos: Tensor) -> bool:
    """True when the keys are exactly the queries' own tokens in ascending order (a fresh prefill).

    The position mask is then lower-triangular for every real token; padding rows (PAD_POSITION,
    after the real tokens) may differ, and their outputs are never used.
    """
    window = current_window()
    return (k_pos.dim() == 2 and q_pos.shape == k_pos.shape and q_pos.shape[-1] > 1
            and (window is None or q_pos.shape[-1] <= window)
            and torch.equal(q_pos, k_pos) and bool((k_pos[:, 1:] >= k_pos[:, :-1]).all()))


def attention_weights(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """The softmax weights (B, Hq, Tq, Tk) of ``attention``'s queries, for policies that score tokens by attention
    (H2O, TOVA, SnapKV). Computed beside the output, never instead of it: a policy that observes attention never
    changes the arithmetic of the attention it observes."""
    groups = q.shape[1] // k.shape[1]
    scores = (q @ expand_heads(k, groups).transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~visibility_mask(q_pos, k_pos, groups), float("-inf")).float().softmax(-1).to(q.dtype)


def tail_weights(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, n: int) -> Tensor | None:
    """The softmax weights (B, Hq, n, Tk) of the last ``n`` queries (None for n <= 0), beside an output."""
    if n <= 0:
        return None
    n = min(n, q.shape[2])
    return attention_weights(q[:, :, -n:], k, q_pos[:, -n:], k_pos)


def attention_tail_weights(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, n: int
                           ) -> tuple[Tensor, Tensor | None]:
    """``attention``'s output and ``tail_weights`` beside it: the output is the same computation whether or not
    weights are asked for."""
    return attention(q, k, v, q_pos, k_pos), tail_weights(q, k, q_pos, k_pos, n)
