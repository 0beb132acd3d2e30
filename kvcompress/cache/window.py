"""A model's own sliding windows, held by the cache: semantics, never counted as compression.

A layer with window W lets the query at position q see keys at positions in (q - W, q] (transformers'
``sliding_window_overlay``). After the layer's step its store keeps, per row, the keys at positions above
q_last - W + 1 (the last W - 1 tokens, what transformers' sliding cache keeps), so the next single-token step sees
exactly W keys with no mask at all (a fused decode kernel needs none); a multi-token step masks the band with
``window_mask``. The plain full cache of such a model is therefore the windowed one: the fp16 reference is
2 bytes x (K and V) x kv_heads x head_dim x sum over layers and rows of min(tokens seen, W - 1), and the plain
figure (every token of every layer) is reported beside it.

Every axis runs on such layers unchanged: a policy sees the windowed store (a budget above the window is a no-op
there); a sharing layout must not make a local layer read a global layer's store (refused: ``check_layout``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, ModelSpec
from kvcompress.cache.layout.base import Layout


def check_layout(spec: ModelSpec, layout: Layout) -> None:
    """Refuse a sharing layout on a model whose layers have different windows (a local layer would read or merge
    with a global one). Uniform windows (Mistral) share freely."""
    if spec.windows and len(set(spec.windows)) > 1 and type(layout) is not Layout:
        windows = sorted({str(w) for w in spec.windows})
        raise ValueError(f"layout {type(layout).__name__} shares stores between layers, but {spec.name} mixes "
                         f"sliding-window and global layers (windows {', '.join(windows)}): a local layer would "
                         "read a global layer's store. Only layout=per_layer runs on this model")


def window_keep(pos: Tensor, q_pos: Tensor, window: int) -> Tensor:
    """Which held positions ``pos`` (B, T) or (B, Hkv, T) are still inside the window after queries ``q_pos``
    (B, Tq): the last W - 1 positions up to each row's last real query. Hidden padding slots go too: kept, they
    would make a padded row hold more slots than the others, and every row would then be padded to that count (a
    storage that codes groups of slots, KIVI, would group another row's tokens differently)."""
    real = q_pos < PAD_POSITION
    last = torch.where(real, q_pos, -PAD_POSITION).amax(1)  # a row with no real query keeps everything
    floor = torch.where(real.any(1), last - window + 2, -PAD_POSITION)
    return (pos >= per_row(floor, pos)) & (pos < PAD_POSITION)


def per_row(x: Tensor, like: Tensor) -> Tensor:
    """A per-row value ``x`` (B,) on ``like``'s device, shaped to broadcast against ``like`` (B, T) or (B, Hkv, T)."""
    return x.to(like.device).view(-1, *[1] * (like.dim() - 1))


def windowed_fp16_bytes(spec: ModelSpec, seen_per_row: Tensor) -> int:
    """fp16 bytes of the model's own full cache: per layer and row, min(tokens seen, W - 1) tokens (all on a
    global layer)."""
    per_token = spec.fp16_bytes_per_token() // spec.num_layers  # one layer's
    seen = seen_per_row.long()
    held = sum(int(seen.sum() if w is None else seen.clamp(max=w - 1).sum()) for w in spec.windows)
    return per_token * held
