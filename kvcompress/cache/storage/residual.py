"""A storage whose K (or V) is coded in groups of tokens, behind a full-precision residual: KIVI (Liu et al., 2024:
keys per channel in groups of ``group_size`` tokens, the recent tokens exact), int codes with a residual window,
GEAR (Kang et al., 2024: blocks of tokens, codes + low-rank + outliers), ThinK's quantized channels.

Each of K and V is a ``GroupCodec``: ``encode`` packs a whole number of groups of ``gran`` tokens into named parts,
each (B, H, groups * rows, ...) with a fixed number of rows per group (``gran`` for per-token tensors such as codes,
1 for a per-channel scale, ``gran / g`` for scales of ``g``-token groups); ``decode`` gives the tokens back.
After ``n`` tokens the coded prefix holds ``prefix_length(n) = floor(max(n - residual, 0) / gran) * gran`` tokens and
the other ``n - prefix_length(n)`` (the most recent ``residual``, plus an unfinished group) stay in the residual
dtype. The rule depends only on the token count, so prefill, decode and any chunking code the same groups, every
batch row has the same layout, and both forms below hold the same codes:

* eager (``Stage``): the prefix in growing buffers (``buffers.GrowingParts``), the residual a tensor;
* captured (``ResidualSlots``): every layer's prefix in fixed slots and ``residual + gran`` residual slots. A
  single-token step is branch-free on the device: the token goes to residual slot ``n - 1 - split(n - 1)``, the
  first ``gran`` residual tokens are encoded every step and written at group ``split(n - 1) / gran`` only where
  ``flush = split(n) > split(n - 1)`` (``torch.where`` against what is there), and the residual shifts left by
  ``gran`` under the same flag; the counts are computed once per step at layer 0. Longer steps (prefill chunks,
  never captured) read the count on the host.

A codec with ``packed`` (the integer codes) is read by the kernels (``kernels.quant_attention``) in decode steps,
eager and in fixed slots (``ResidualSlots.attend``).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from kvcompress.cache.base import Rotary, attention, attention_weights
from kvcompress.cache.buffers import GrowingBuffer, GrowingParts, gather_tokens
from kvcompress.cache.storage.base import TokenStore
from kvcompress.cache.storage.fixed import FixedSlotCache, capturing
from kvcompress.kernels import Packed, dense, quant_attention, resolve


def prefix_length(n: int | Tensor, residual: int, gran: int) -> int | Tensor:
    """``floor(max(n - residual, 0) / gran) * gran``: the coded tokens of ``n`` (an int, or a device tensor)."""
    over = n - residual
    return (over.clamp(min=0) if isinstance(over, Tensor) else max(over, 0)) // gran * gran


class GroupCodec(ABC):
    """One of K or V coded in groups of ``gran`` tokens (see the module docstring)."""

    gran = 1

    @abstractmethod
    def encode(self, x: Tensor) -> dict[str, Tensor]:
        """Parts (B, H, groups * rows, ...) of x (B, H, groups * gran, D)."""

    @abstractmethod
    def decode(self, parts: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        """The coded tokens (B, H, groups * gran, D) in ``dtype``."""

    def packed(self, parts: dict[str, Tensor], res: Tensor | None) -> Packed | None:
        """The prefix (its parts, maybe none yet) and residual as a kernel side, or None: no kernel reads it."""
        return None


class ConcatParts:
    """Named tensors grown along dim 2 by concatenation: parts that arrive once per group of ``gran`` > 1 tokens
    (KIVI keys, GEAR blocks) would leave a doubling buffer's spare capacity unused for ``gran`` steps at a time."""

    def __init__(self) -> None:
        self.data: dict[str, Tensor] = {}

    def append(self, parts: dict[str, Tensor]) -> None:
        for name, x in parts.items():
            self.data[name] = x.contiguous() if name not in self.data else torch.cat([self.data[name], x], 2)

    def view(self) -> dict[str, Tensor]:
        return self.data

    def tensors(self) -> list[Tensor]:
        return list(self.data.values())

    reserved = tensors


def own(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A private contiguous copy in ``dtype`` (never a view of the caller's tensor)."""
    return x.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


class BaseStage:
    """One of K or V (its ``codec``) behind a residual of ``residual`` tokens: the eager and fixed-slot forms' rule."""

    codec: GroupCodec
    residual: int

    def split(self, n: int | Tensor) -> int | Tensor:
        return prefix_length(n, self.residual, self.codec.gran)

    def cut(self, res: Tensor | None, x: Tensor, n_q: int) -> tuple[Tensor, Tensor]:
        """x after the residual ``res`` (None: empty) of ``n_q`` coded tokens: the groups to code, the new residual."""
        full = x if res is None else torch.cat([res, x], 2)
        m = self.split(n_q + full.shape[2]) - n_q
        return full[:, :, :m], full[:, :, m:]

    def join(self, parts: dict[str, Tensor], res: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The decoded prefix (``parts``; empty: none), then the residual (None: none), in ``dtype``."""
        if not parts:
            return res.to(dtype)
        prefix = self.codec.decode(parts, dtype)
        return prefix if res is None else torch.cat([prefix, res.to(dtype)], 2)


class Stage(BaseStage):
    """One of K or V, eager: the coded prefix in ``parts`` (``n_q`` tokens), then ``res`` (B, H, r, D).

    Tokens are cast to ``dtype`` (None: their own) on arrival, so chunking never changes a code. ``mirror=True``
    also keeps every held token decoded in the arriving dtype (written when a token arrives, overwritten once when
    it is coded), so ``read`` is a view; its bytes are held state and are reported."""

    def __init__(self, codec: GroupCodec, residual: int, dtype: torch.dtype | None = None, mirror: bool = False):
        self.codec, self.residual, self.want = codec, residual, dtype
        self.parts, self.res, self.n_q, self.dtype = self.holder(), None, 0, None
        self.mirror = GrowingBuffer() if mirror else None

    def holder(self) -> GrowingParts | ConcatParts:
        """Per-token parts (``gran`` 1) in doubling buffers, parts of larger groups concatenated."""
        return GrowingParts() if self.codec.gran == 1 else ConcatParts()

    @property
    def n_res(self) -> int:
        return 0 if self.res is None else self.res.shape[2]

    def append(self, x: Tensor) -> None:
        self.dtype = self.dtype or self.want or x.dtype
        out_dtype, x = x.dtype, x.to(self.dtype)
        if self.mirror is not None:
            self.mirror.append(x.to(out_dtype))
        done, rest = self.cut(self.res if self.n_res else None, x, self.n_q)
        n = done.shape[2]
        if n:
            parts = self.codec.encode(done)
            if self.mirror is not None:
                self.mirror.view()[:, :, self.n_q : self.n_q + n] = self.codec.decode(parts, out_dtype)
            self.parts.append(parts)
            self.n_q += n
        self.res = own(rest, self.dtype)

    def read(self, dtype: torch.dtype) -> Tensor:
        """Everything held, (B, H, T, D) in ``dtype``: decoded prefix, then residual."""
        if self.mirror is not None and self.mirror.data is not None and self.mirror.data.dtype == dtype:
            return self.mirror.view()
        return self.decoded(dtype)

    def decoded(self, dtype: torch.dtype) -> Tensor:
        return self.join(self.parts.view(), self.res, dtype)

    def packed(self) -> Packed | None:
        return self.codec.packed(self.parts.view(), self.res if self.n_res else None)

    def tensors(self, reserved: bool = False) -> list[Tensor]:
        """The held tensors (views of the used part), or with ``reserved`` the whole allocations."""
        out = self.parts.reserved() if reserved else self.parts.tensors()
        if self.mirror is not None and self.mirror.data is not None:
            out.append(self.mirror.data if reserved else self.mirror.view())
        return out + ([self.res] if self.res is not None else [])

    def keep(self, idx: Tensor) -> None:
        """Keep tokens ``idx`` (B, H, T'), then split T' by the same rule: a new group that is exactly an old coded
        group keeps its parts (never coded twice); any other group is coded from the held values (decoded)."""
        n_new = self.split(idx.shape[-1])
        vals = gather_tokens(self.decoded(torch.float32), idx)
        parts = self.regroup(idx[:, :, :n_new], vals[:, :, :n_new]) if n_new else {}
        self.parts, self.n_q = self.holder(), n_new
        self.parts.append(parts)
        self.res = own(vals[:, :, n_new:], self.dtype)
        if self.mirror is not None and self.mirror.data is not None:
            self.mirror.replace(self.decoded(self.mirror.data.dtype))

    def regroup(self, idx: Tensor, vals: Tensor) -> dict[str, Tensor]:
        new, G, old_groups = self.codec.encode(vals), self.codec.gran, self.n_q // self.codec.gran
        if not old_groups:
            return new
        groups = idx.unflatten(-1, (-1, G))  # (B, H, n_new / G, G)
        start = groups[..., 0]
        intact = (groups == start[..., None] + torch.arange(G, device=idx.device)).all(-1) & (start % G == 0) \
            & (start + G <= self.n_q)
        src = (start // G).clamp(max=old_groups - 1)
        out = {}
        for name, x in self.parts.view().items():
            rows = x.shape[2] // old_groups
            old = gather_tokens(x.unflatten(2, (old_groups, rows)), src).flatten(2, 3)
            pick = intact.repeat_interleave(rows, dim=2).reshape(*old.shape[:3], *[1] * (x.dim() - 3))
            out[name] = torch.where(pick, old, new[name])
        return out


class ResidualStore(TokenStore):
    """K and V each a ``GroupCodec`` behind a residual of ``residual`` recent tokens in ``residual_dtype`` (None: the
    model's). A subclass sets those and ``dequant_cache`` and gives ``side_codecs()``."""

    residual_dtype: torch.dtype | None = torch.float16
    dequant_cache = False
    backend: str | None = None  # kernels: None (``KVC_KERNELS`` / auto) | torch | triton
    packed_decode = True  # False: a decode step decodes, then attends (as a codec without a kernel)

    @abstractmethod
    def side_codecs(self) -> tuple[GroupCodec, GroupCodec] | None:
        """The K and V codecs (None before ``check(spec)`` where they need the model's dimensions)."""

    def clear_payload(self) -> None:
        codecs, self.dtype = self.side_codecs(), None
        self.k, self.v = (None, None) if codecs is None else (
            Stage(c, self.residual, self.residual_dtype, self.dequant_cache) for c in codecs)

    def append_payload(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        self.dtype = k.dtype
        self.k.append(k)
        self.v.append(v)

    def read_payload(self) -> tuple[Tensor, Tensor]:
        return self.k.read(self.dtype), self.v.read(self.dtype)

    def keep(self, idx: Tensor) -> None:
        if self.k is not None and self.k.res is not None:  # nothing held yet: nothing to keep
            super().keep(idx)

    def keep_payload(self, idx: Tensor) -> None:
        B, H = self.k.res.shape[:2]
        full = idx[:, None].expand(B, H, idx.shape[-1]) if idx.dim() == 2 else idx
        self.k.keep(full)
        self.v.keep(full)

    def payload_tensors(self) -> list[Tensor]:
        return self.k.tensors() + self.v.tensors()

    def payload_reserved(self) -> list[Tensor]:
        return self.k.tensors(True) + self.v.tensors(True)

    def attend(self, q: Tensor, q_pos: Tensor, n_weights: int = 0) -> tuple[Tensor, Tensor | None]:
        """A decode step reads the packed codes and the residual directly (``kernels.quant_attention``: Triton on
        CUDA, its PyTorch reference elsewhere), never a full-precision copy of the history. Prefill chunks, pre-RoPE
        keys, ``dequant_cache`` and codecs without a kernel decode, then attend. Weights a policy asks for are
        computed beside the output: the same computation whether or not a policy observes it."""
        if q.shape[2] == 1 and self.keys == "post_rope" and not self.dequant_cache and self.packed_decode:
            sides = self.k.packed(), self.v.packed()
            if None not in sides:
                out = quant_attention(q, q_pos, self.positions(), *sides, backend=self.backend)
                if not n_weights:
                    return out, None
                k, _, pos = self.read()
                return out, attention_weights(q, k.to(q.dtype), q_pos, pos)
        return super().attend(q, q_pos, n_weights)

    def static_form(self, capacity: int):
        """The same codes in fixed slots (captured decode), for post-RoPE keys without ``dequant_cache`` (pre-RoPE
        keys are rotated at read time: eager)."""
        if self.keys != "post_rope" or self.dequant_cache:
            return None
        return ResidualSlots(self, capacity)


class SlotStage(BaseStage):
    """One of K or V for every layer in fixed slots: per layer, each part (B, H, groups * rows, ...) for
    ``ceil(capacity / gran)`` groups and the residual (B, H, residual + gran, D). A tensor per layer, not one stacked
    (L, ...) tensor: Inductor turned each layer's in-place write into a slice of a stacked buffer into copies of the
    whole buffer (the compiled KIVI-2 step ran at 0.26x of its eager step: results/cpu_bench/README.md)."""

    def __init__(self, codec: GroupCodec, residual: int, dtype: torch.dtype, lead: tuple[int, int, int],
                 capacity: int, D: int, device):
        self.codec, self.residual, self.dtype, G = codec, residual, dtype, codec.gran
        example = codec.encode(torch.zeros((*lead[1:], G, D), dtype=dtype, device=device))
        self.rows = {name: x.shape[2] for name, x in example.items()}
        groups = math.ceil(capacity / G)
        self.parts = {name: [x.new_zeros((*x.shape[:2], groups * x.shape[2], *x.shape[3:])) for _ in range(lead[0])]
                      for name, x in example.items()}
        self.res = [torch.zeros((*lead[1:], residual + G, D), dtype=dtype, device=device) for _ in range(lead[0])]

    def tensors(self) -> list[Tensor]:
        return [t for layers in (*self.parts.values(), self.res) for t in layers]

    def count(self, n: Tensor, T: int) -> None:
        """This step's counts, once for every layer: ``n`` (0-d, device) tokens after a step of T. A single-token step
        keeps them on the device (where the token goes, whether a group is flushed, and which); longer ones read n."""
        self.n_q = self.split(n)
        if T > 1:
            self.n_host = int(n)
            return
        q_old = self.split(n - 1)
        self.flush = self.n_q > q_old
        self.res_slot = (n - 1 - q_old).view(1)
        self.group = (q_old // self.codec.gran).view(1)  # q_old < capacity, whole groups: in range

    def put(self, layer: int, groups: Tensor, parts: dict[str, Tensor], flush: Tensor | None = None) -> None:
        """Write the parts of ``groups`` (indices); with ``flush`` (0-d bool) only where it is True."""
        for name, new in parts.items():
            buf, r = self.parts[name][layer], self.rows[name]
            idx = (groups[:, None] * r + torch.arange(r, device=groups.device)).flatten()
            if flush is not None:
                new = torch.where(flush, new, buf.index_select(2, idx))
            buf.index_copy_(2, idx, new)

    def append(self, layer: int, x: Tensor) -> None:
        """Add x (B, H, T, D), already in the residual dtype, by this step's ``count``."""
        res, G, T = self.res[layer], self.codec.gran, x.shape[2]
        if T == 1:
            res.index_copy_(2, self.res_slot, x)
            self.put(layer, self.group, self.codec.encode(res[:, :, :G]), self.flush)
            res.copy_(torch.where(self.flush, torch.cat([res[:, :, G:], res[:, :, :G]], 2), res))
            return
        q_old = self.split(self.n_host - T)
        done, rest = self.cut(res[:, :, : self.n_host - T - q_old], x, q_old)
        if done.shape[2]:
            groups = torch.arange(q_old // G, (q_old + done.shape[2]) // G, device=x.device)
            self.put(layer, groups, self.codec.encode(done))
        res[:, :, : rest.shape[2]] = rest

    def packed(self, layer: int) -> Packed | None:
        """The layer's buffers as a kernel side (prefix capacity + residual; the counts come as ``lengths``)."""
        return self.codec.packed({n: p[layer] for n, p in self.parts.items()}, self.res[layer])

    def held(self, layer: int, n: int) -> tuple[dict[str, Tensor], Tensor | None]:
        """The layer's coded prefix of ``n`` tokens (parts) and its residual (None: empty), as ``Stage`` holds them."""
        n_q = self.split(n)
        groups = n_q // self.codec.gran
        parts = {name: p[layer][:, :, : groups * self.rows[name]] for name, p in self.parts.items()} if n_q else {}
        return parts, (self.res[layer][:, :, : n - n_q] if n > n_q else None)

    def decoded(self, layer: int, n: int, dtype: torch.dtype) -> Tensor:
        """The ``n`` held tokens (B, H, n, D) in ``dtype``, as ``Stage.decoded`` gives them."""
        return self.join(*self.held(layer, n), dtype)

    def tokens(self, layer: int, capacity: int, dtype: torch.dtype) -> Tensor:
        """All ``capacity`` slots in ``dtype``, branch-free: token t is prefix token t below this step's ``n_q``,
        else residual slot ``t - n_q`` (slots at or beyond the token count are junk the positions mask)."""
        prefix = self.codec.decode({n: p[layer] for n, p in self.parts.items()}, dtype)[:, :, :capacity]
        t = torch.arange(capacity, device=prefix.device)
        res = self.res[layer].index_select(2, (t - self.n_q).clamp(0, self.res[layer].shape[2] - 1)).to(dtype)
        return torch.where((t < self.n_q)[:, None], prefix, res)


class ResidualSlots(FixedSlotCache):
    """A ``ResidualStore`` of every layer in ``capacity`` fixed slots (see the module docstring)."""

    slot_addressable = False  # tokens are placed by the count (the residual rule), not at chosen slots

    def payload(self) -> list[Tensor]:
        return [t for side in getattr(self, "sides", []) for t in side.tensors()]

    def allocate_payload(self, dtype: torch.dtype, device: torch.device) -> None:
        s, store = self.spec, self.store
        lead = (s.num_layers, self.batch_size, s.num_kv_heads)
        self.sides = [SlotStage(c, store.residual, store.residual_dtype or dtype, lead, self.capacity, s.head_dim,
                                device) for c in store.side_codecs()]

    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> None:
        """The new tokens go after the held ones; each side places them by its own count (at the first layer the
        index advances and the counts are taken, for every layer)."""
        if self.pos is None:
            self._allocate(self.dtype or k.dtype, k.device)
        T = k.shape[2]
        if layer == 0:
            self.index.add_(T)
            self.pos.index_copy_(1, self.index - T + torch.arange(T, device=k.device), pos)
        for side, x in zip(self.sides, (rope.rotate(k, pos), v), strict=True):
            if layer == 0:
                side.count(self.index, T)
            side.append(layer, x.to(side.dtype))

    def attend(self, layer: int, q: Tensor, q_pos: Tensor) -> Tensor:
        """Outside ``capturing()`` (prefill chunks, CPU steps) the count is read and the held tokens are attended with
        the eager store's arithmetic: equal logits, bit for bit. A traced or recorded step reads the codes with
        Triton (only the held tokens' bytes, the counts on the device); otherwise every slot is decoded and empty
        slots are masked (branch-free; equal within fp rounding)."""
        if not capturing():
            return self.attend_held(layer, q, q_pos, int(self.index))
        k, v = self.sides
        if layer == 0:  # [n_q of K, n_q of V, T], once per step for every layer
            self.lengths = torch.stack([k.split(self.index), v.split(self.index), self.index]).to(torch.int32)
        sides = k.packed(layer), v.packed(layer)
        if None not in sides and resolve(q.device, self.store.backend) == "triton":
            return quant_attention(q, q_pos, self.pos, *sides, lengths=self.lengths, backend=self.store.backend)
        kk, vv = (dense(side.tokens(layer, self.capacity, q.dtype)) for side in self.sides)
        return quant_attention(q, q_pos, self.pos, kk, vv, backend="torch")

    def attend_held(self, layer: int, q: Tensor, q_pos: Tensor, n: int) -> Tensor:
        """``ResidualStore.attend`` over the ``n`` held tokens: the packed kernel for a decode step, else decode."""
        pos, store = self.pos[:, :n], self.store
        if q.shape[2] == 1 and store.packed_decode:
            sides = [side.codec.packed(*side.held(layer, n)) for side in self.sides]
            if None not in sides:
                return quant_attention(q, q_pos, pos, *sides, backend=store.backend)
        kk, vv = (side.decoded(layer, n, q.dtype) for side in self.sides)
        return attention(q, kk, vv, q_pos, pos)
