"""A native Llama-family and Gemma 3 decoder. Every attention call goes through the cache interface.

GQA, RoPE (with scaling), RMSNorm, SwiGLU, tied or untied embeddings, optional q/k/v bias and
Qwen3-style q/k norm. Gemma 3 adds: RMSNorm scaling by (1 + w), norms after attention and after the MLP,
GELU-tanh gating, embeddings times sqrt(hidden), scores scaled by query_pre_attn_scalar ** -0.5, sliding-window
layers with their own RoPE base (the window is held by the cache: ``cache/window.py``), final logit softcapping.

q/k/v and gate/up are stored fused, the way gpt-fast does, and multiplied as one product each (4 matrix products a
layer, not 7: fewer, larger GEMVs at decode); a layer that does not need k/v multiplies the q rows only (rows
0..q_dim: a slice at offset 0). Never a slice at an offset: Inductor's C++ GEMM template (the compiled CPU step,
``engine/compiled.py``) packs a frozen weight's storage from its start, so such a slice multiplied the wrong rows
(torch 2.13; logits off by 0.43 on the tiny model, tests/test_compiled.py).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvcompress.cache.base import SLOW_CPU_HALF, KVCache
from kvcompress.engine.config import ModelConfig
from kvcompress.engine.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    """Llama: w * cast(x / rms(x)). Gemma (offset 1): cast((x / rms(x)) * (1 + w)) in fp32."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, with products of several rows in fp32 where the CPU's reduced-precision GEMM is slow (one row,
    a decode GEMV, has its own fast path there). Exact inputs either way (bf16/fp16 widen exactly) and both
    accumulate in fp32: only the summation order differs, then the result is rounded back to the input's dtype."""
    if x.device.type == "cpu" and SLOW_CPU_HALF.get(x.dtype) and x.numel() > x.shape[-1]:
        up = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return up.to(x.dtype)
    return F.linear(x, weight, bias)


def linear_rows(x: Tensor, layer: nn.Linear, hi: int) -> Tensor:
    """``layer(x)[..., :hi]`` computed from the weight's first ``hi`` rows only (a view, no copy)."""
    bias = layer.bias[:hi] if layer.bias is not None else None
    return linear(x, layer.weight[:hi], bias)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.hq, self.hkv, self.d = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_dim = self.hq * self.d
        self.wqkv = nn.Linear(c.hidden_size, (self.hq + 2 * self.hkv) * self.d, bias=c.attention_bias)
        self.wo = nn.Linear(self.q_dim, c.hidden_size, bias=c.output_bias)
        self.q_norm = RMSNorm(self.d, c.rms_eps, c.norm_offset) if c.qk_norm else None
        self.k_norm = RMSNorm(self.d, c.rms_eps, c.norm_offset) if c.qk_norm else None
        # scores = q.k * query_scale; the cache's attention applies head_dim ** -0.5, so q carries the ratio
        ratio = c.query_scale * self.d**0.5 if c.query_scale else 1.0
        self.q_factor = None if ratio == 1.0 else ratio

    def project(self, x: Tensor, heads: int) -> Tensor:
        """(B, heads, T, d) from the first ``heads`` heads' rows of ``wqkv`` (q heads, then k, then v)."""
        B, T, _ = x.shape
        return linear_rows(x, self.wqkv, heads * self.d).view(B, T, heads, self.d).transpose(1, 2)

    def forward(self, x: Tensor, pos: Tensor, cache: KVCache, layer: int, rope: RotaryEmbedding) -> Tensor:
        B, T, _ = x.shape
        kv = cache.computes_kv(layer)  # False: a consumer of another layer's cache skips the k/v projections
        qkv = self.project(x, self.hq + 2 * self.hkv if kv else self.hq)
        q, k, v = qkv.split((self.hq, self.hkv, self.hkv), dim=1) if kv else (qkv, None, None)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = rope.rotate(q, pos)
        if self.q_factor is not None:
            q = q * self.q_factor
        if kv:
            if self.k_norm is not None:
                k = self.k_norm(k)
            cache.append(layer, k, v, pos, rope)
        out = cache.attend(layer, q, pos)
        return linear(out.transpose(1, 2).reshape(B, T, self.q_dim), self.wo.weight, self.wo.bias)


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.hidden = c.intermediate_size
        self.act = F.silu if c.hidden_act == "silu" else partial(F.gelu, approximate="tanh")
        self.w13 = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)
        self.w2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = linear_rows(x, self.w13, 2 * self.hidden).chunk(2, dim=-1)
        return linear(self.act(gate) * up, self.w2.weight, self.w2.bias)


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        norm = partial(RMSNorm, c.hidden_size, c.rms_eps, c.norm_offset)
        self.attn_norm, self.attn = norm(), Attention(c)
        self.mlp_norm, self.mlp = norm(), MLP(c)
        self.attn_post_norm = norm() if c.post_norms else None  # Gemma 3: before each residual add
        self.mlp_post_norm = norm() if c.post_norms else None

    def forward(self, x: Tensor, pos: Tensor, cache: KVCache, layer: int, rope: RotaryEmbedding) -> Tensor:
        h = self.attn(self.attn_norm(x), pos, cache, layer, rope)
        x = x + (h if self.attn_post_norm is None else self.attn_post_norm(h))
        h = self.mlp(self.mlp_norm(x))
        return x + (h if self.mlp_post_norm is None else self.mlp_post_norm(h))


class Transformer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_eps, c.norm_offset)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.rope = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position)
        # Gemma 3's sliding-window layers rotate with their own base (and no scaling)
        local = RotaryEmbedding(c.head_dim, c.local_rope_theta, None, c.max_position) if c.local_rope_theta else None
        self.layer_ropes = [local if local and c.window(i) else self.rope for i in range(c.num_layers)]

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def forward(self, tokens: Tensor, pos: Tensor, cache: KVCache, select: Tensor | None = None) -> Tensor:
        """Logits (B, T, V) for tokens (B, T) at absolute positions pos (B, T).

        ``select`` (B,) picks one position per row, so only (B, 1, V) logits are computed.
        """
        for rope in {id(r): r for r in self.layer_ropes}.values():
            rope.prepare(pos)
        x = self.embed(tokens)
        if self.config.embed_scale is not None:  # in the weights' dtype, as transformers does
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, pos, cache, i, self.layer_ropes[i])
        if select is not None:
            x = x[torch.arange(x.shape[0], device=x.device), select][:, None]
        logits = linear(self.norm(x), self.lm_head.weight)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
