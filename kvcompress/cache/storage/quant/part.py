"""One of K or V in a quantized store: a quantized prefix of complete groups, then a full-precision residual.

After ``n`` tokens the prefix holds ``split(n) = floor(max(n - residual, 0) / gran) * gran`` tokens,
``gran`` being 1 for per-token groups and ``group_size`` for per-channel groups; the rest (the
most recent ``residual`` tokens, plus an unfinished per-channel group) stays in full precision.
The rule depends only on the token count, so prefill, decode and any chunking leave the same
tokens in full precision, and every batch row has the same layout.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.buffers import GrowingBuffer, gather_tokens
from kvcompress.cache.checks import DTYPES
from kvcompress.cache.storage.quant.quantizer import QTensor, QuantConfig, dequantize, quantize
from kvcompress.kernels import quantize_tokens

RESIDUAL_DTYPES = DTYPES


def prefix_length(n: int | Tensor, residual: int, gran: int) -> int | Tensor:
    """``floor(max(n - residual, 0) / gran) * gran``: the tokens of ``n`` in the quantized prefix (an int, or a
    device tensor for the static form)."""
    over = n - residual
    return (over.clamp(min=0) if isinstance(over, Tensor) else max(over, 0)) // gran * gran


class QuantPart:
    """Packed codes + fp16 scale (and zero) of the prefix, ``res`` the full-precision recent tokens.

    ``dequant_cache=True`` also keeps ``mirror``: every held token dequantized in the input's dtype,
    written once when a token arrives and overwritten once when it is quantized, so ``read`` is a
    view instead of dequantizing the whole history at every step. Its bytes are held state and are
    reported (in fp32 it is twice the fp16 reference, so it trades all the memory saving for speed).
    """

    def __init__(self, cfg: QuantConfig, residual: int, residual_dtype: str = "float16", dequant_cache: bool = False):
        self.cfg, self.residual = cfg, residual
        self.residual_dtype = RESIDUAL_DTYPES[residual_dtype]
        self.codes, self.scale, self.zero = GrowingBuffer(), GrowingBuffer(), GrowingBuffer()
        self.res: Tensor | None = None  # (B, H, r, D) full-precision recent tokens
        self.n_q = 0  # tokens in the quantized prefix
        self.dtype: torch.dtype | None = None  # residual storage dtype, fixed by the first append
        self.mirror = GrowingBuffer() if dequant_cache else None

    def split(self, n: int) -> int:
        """How many of ``n`` tokens belong to the quantized prefix."""
        return prefix_length(n, self.residual, self.cfg.token_granularity)

    @property
    def n_res(self) -> int:
        return 0 if self.res is None else self.res.shape[2]

    @property
    def length(self) -> int:
        return self.n_q + self.n_res

    def _own(self, x: Tensor) -> Tensor:
        """A private contiguous copy in the residual dtype (never a view of the caller's tensor)."""
        return x.to(dtype=self.dtype, memory_format=torch.contiguous_format, copy=True)

    def append(self, x: Tensor) -> None:
        """Add tokens; they are first cast to the residual dtype, so chunking never changes any code."""
        self.dtype = self.dtype or self.residual_dtype or x.dtype
        out_dtype, x = x.dtype, x.to(self.dtype)
        if self.mirror is not None:
            self.mirror.append(x.to(out_dtype))
        full = x if not self.n_res else torch.cat([self.res, x], 2)
        n = self.split(self.n_q + full.shape[2]) - self.n_q
        if n > 0:
            q = self._quantize(full[:, :, :n])
            if self.mirror is not None:
                dequantize(q, self.cfg, out=self.mirror.view()[:, :, self.n_q : self.n_q + n])
            self._push(q)
        self.res = self._own(full[:, :, n:])

    def _quantize(self, x: Tensor) -> QTensor:
        """Quantize-on-append: per-token groups through ``kernels.quantize_tokens`` (Triton on CUDA, bit for bit
        ``quantize``); per-channel groups (they span tokens) through ``quantize``."""
        if self.cfg.axis == "token":
            return QTensor(*quantize_tokens(x, self.cfg.bits, self.cfg.group_size, self.cfg.symmetric))
        return quantize(x, self.cfg)

    def _push(self, q: QTensor) -> None:
        self.codes.append(q.codes)
        self.scale.append(q.scale)
        if q.zero is not None:
            self.zero.append(q.zero)
        self.n_q += q.codes.shape[2]

    def prefix(self) -> QTensor:
        return QTensor(self.codes.view(), self.scale.view(), self.zero.view() if self.zero.data is not None else None)

    def read(self, dtype: torch.dtype) -> Tensor:
        """Everything held, (B, H, T, D) in ``dtype``: dequantized prefix then residual."""
        if self.mirror is not None and self.mirror.data is not None and self.mirror.data.dtype == dtype:
            return self.mirror.view()
        return self._dequantize_all(dtype)

    def _dequantize_all(self, dtype: torch.dtype) -> Tensor:
        if not self.n_q:
            return self.res.to(dtype)
        B, H, _, D = self.res.shape
        out = self.res.new_empty((B, H, self.length, D), dtype=dtype)
        dequantize(self.prefix(), self.cfg, out=out[:, :, : self.n_q])
        out[:, :, self.n_q :] = self.res
        return out

    def _buffers(self) -> list[GrowingBuffer]:
        return [b for b in (self.codes, self.scale, self.zero, self.mirror) if b is not None and b.data is not None]

    def tensors(self) -> list[Tensor]:
        return [b.view() for b in self._buffers()] + ([self.res] if self.res is not None else [])

    def reserved(self) -> list[Tensor]:
        return [b.data for b in self._buffers()] + ([self.res] if self.res is not None else [])

    # -- eviction ---------------------------------------------------------------------------
    def keep(self, idx: Tensor) -> None:
        """Keep tokens ``idx`` (B, H, T'), then re-split by the same rule on T'."""
        n_new = self.split(idx.shape[-1])
        if self.cfg.axis == "token":
            prefix, tail = self._keep_token(idx, n_new)
        else:
            prefix, tail = self._keep_channel(idx, n_new)
        self.n_q = 0
        for b in (self.codes, self.scale, self.zero):
            b.data, b.length = None, 0
        if n_new:
            self._push(prefix)
        self.res = self._own(tail)
        if self.mirror is not None and self.mirror.data is not None:
            self.mirror.replace(self._dequantize_all(self.mirror.data.dtype))

    def _all_codes(self) -> QTensor:
        """Per-token codes of every held token (residual tokens quantized as they would be later)."""
        if not self.n_res:
            return self.prefix()
        r = quantize(self.res, self.cfg)
        if not self.n_q:
            return r
        p = self.prefix()
        return QTensor(torch.cat([p.codes, r.codes], 2), torch.cat([p.scale, r.scale], 2),
                       None if r.zero is None else torch.cat([p.zero, r.zero], 2))

    def _keep_token(self, idx: Tensor, n_new: int) -> tuple[QTensor, Tensor]:
        """Per-token groups are independent: kept codes are gathered exactly, never re-quantized."""
        q = _all_codes_gather(self._all_codes(), idx)
        head = QTensor(q.codes[:, :, :n_new], q.scale[:, :, :n_new], None if q.zero is None else q.zero[:, :, :n_new])
        tail_q = QTensor(q.codes[:, :, n_new:], q.scale[:, :, n_new:], None if q.zero is None else q.zero[:, :, n_new:])
        tail_idx = idx[:, :, n_new:]
        tail = dequantize(tail_q, self.cfg, self.dtype)
        if self.n_res:  # tokens that were full precision stay exact
            was_res = (tail_idx >= self.n_q)[..., None]
            exact = gather_tokens(self.res, (tail_idx - self.n_q).clamp(0, self.n_res - 1))
            tail = torch.where(was_res, exact, tail)
        return head, tail

    def _keep_channel(self, idx: Tensor, n_new: int) -> tuple[QTensor, Tensor]:
        """Per-channel groups span tokens: a new group that is exactly an old complete group keeps its
        codes and scales; any other group is re-quantized from the current (dequantized) values."""
        vals = gather_tokens(self._dequantize_all(torch.float32), idx)
        tail = vals[:, :, n_new:]
        if not n_new:
            return None, tail
        new = quantize(vals[:, :, :n_new], self.cfg)
        G, old_groups = self.cfg.group_size, self.n_q // self.cfg.group_size
        if not old_groups:
            return new, tail
        groups = idx[:, :, :n_new].unflatten(-1, (-1, G))  # (B, H, n_new/G, G)
        start = groups[..., 0]
        steps = torch.arange(G, device=idx.device)
        intact = (groups == start[..., None] + steps).all(-1) & (start % G == 0) & (start + G <= self.n_q)
        src = (start // G).clamp(max=old_groups - 1)
        old = self.prefix()
        old_codes = gather_tokens(old.codes.unflatten(2, (old_groups, G)), src).flatten(2, 3)
        pick = intact.repeat_interleave(G, dim=2)[..., None]
        codes = torch.where(pick, old_codes, new.codes)
        scale = torch.where(intact[..., None], gather_tokens(old.scale, src), new.scale)
        zero = None if new.zero is None else torch.where(intact[..., None], gather_tokens(old.zero, src), new.zero)
        return QTensor(codes, scale, zero), tail


def _all_codes_gather(q: QTensor, idx: Tensor) -> QTensor:
    return QTensor(gather_tokens(q.codes, idx), gather_tokens(q.scale, idx),
                   None if q.zero is None else gather_tokens(q.zero, idx))
