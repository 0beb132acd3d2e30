"""``storage=rotated_kivi``: rotation before KIVI (QuaRot, Ashkboos et al., 2024, and KVLinC's Hadamard before 2-bit
codes, over KIVI, Liu et al., 2024): each head vector is turned by an orthogonal R (``rotated.Rotation``: Hadamard or
seeded random) on arrival, then held exactly as ``storage=kivi`` holds it: keys quantized per channel in groups of
``group_size`` tokens, values per token, the ``residual`` most recent tokens in ``residual_dtype`` (rotated too).
Every setting of ``QuantizedStore`` applies (``bits``, axes, group sizes, ``keys``), plus ``transform``, ``rotate``
and ``seed``.

Per channel, R mixes the channels of one token, so a channel's range over a group of tokens becomes a norm-weighted
blend of every channel's: the few large key channels that KIVI isolates are spread over all of them (KVLinC reports
the rotated keys prefer per-token groups for that reason; both axes are settings here).

Reading (prefill chunks, policies, ``pre_rope`` keys): decode and turn back by R^T, then attend. A post-RoPE decode
step attends in the rotated space instead: (q R)(k R)^T = q k^T over the packed codes and residual
(``kernels.quant_attention``), and o = softmax(.)(V R) R^T. Per step and layer that costs two D x D products per query
head (O(Hq D^2), independent of the context), where un-rotating the held keys would cost O(T Hkv D^2). The captured
form is KIVI's (``residual.ResidualSlots``) with the same turns: keys turned after RoPE, values on arrival; a decode
step turns the query and the output, a prefill chunk turns the held tokens back as the eager store does.
"""
from __future__ import annotations

from torch import Tensor

from kvcompress.cache.base import ModelSpec, Rotary, attention, attention_weights
from kvcompress.cache.storage.fixed import capturing
from kvcompress.cache.storage.frontier.rotated import Rotation
from kvcompress.cache.storage.quant.store import QuantizedStore
from kvcompress.cache.storage.residual import ResidualSlots
from kvcompress.kernels import quant_attention


class RotatedQuantizedStore(Rotation, QuantizedStore):
    """``QuantizedStore`` (KIVI with its YAML's settings) over rotated K and/or V. Always the residual stage, also
    with per-token groups and no residual (the per-token codec path would bypass the rotation)."""

    def __init__(self, transform: str = "hadamard", rotate: str = "kv", seed: int = 0, **quantized):
        self.rotation(transform, rotate, seed)
        super().__init__(**quantized)

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        self.build_rotation(spec.head_dim)

    @property
    def per_token_codec(self) -> bool:
        return False

    def append_payload(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        super().append_payload(self.turn(k, "k").to(k.dtype), self.turn(v, "v").to(v.dtype), pos)

    def read_payload(self) -> tuple[Tensor, Tensor]:
        k, v = super().read_payload()
        return self.turn(k, "k", back=True).to(k.dtype), self.turn(v, "v", back=True).to(v.dtype)

    def attend(self, q: Tensor, q_pos: Tensor, n_weights: int = 0) -> tuple[Tensor, Tensor | None]:
        """A post-RoPE decode step over the codes in the rotated space (see module); anything else decodes."""
        if q.shape[2] > 1 or self.keys != "post_rope" or self.dequant_cache:
            return super().attend(q, q_pos, n_weights)
        qr = self.turn(q, "k").to(q.dtype)
        out = quant_attention(qr, q_pos, self.positions(), self.k.packed(), self.v.packed(), backend=self.backend)
        out = self.turn(out, "v", back=True).to(q.dtype)
        if not n_weights:
            return out, None
        k, _, pos = self.read()
        return out, attention_weights(q, k.to(q.dtype), q_pos, pos)

    def static_form(self, capacity: int):
        """KIVI's captured form with the turns (post-RoPE keys without ``dequant_cache``, as KIVI's)."""
        return None if self.keys != "post_rope" or self.dequant_cache else RotatedSlots(self, capacity)

    def calibration_tensors(self) -> list[Tensor]:
        return [self.matrix] if self.matrix is not None else []


class TurnedRope:
    """RoPE, then R on the rotated side: how a captured KIVI stage receives the keys of a rotated store."""

    def __init__(self, rope: Rotary, store: RotatedQuantizedStore):
        self.rope, self.store = rope, store

    def rotate(self, k: Tensor, pos: Tensor) -> Tensor:
        return self.store.turn(self.rope.rotate(k, pos), "k").to(k.dtype)


class RotatedSlots(ResidualSlots):
    """KIVI's fixed slots (``residual.ResidualSlots``) holding rotated keys and values: the query is turned before
    attention and the output back after it (prefill chunks and decode steps alike)."""

    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> None:
        super().append(layer, k, self.store.turn(v, "v").to(v.dtype), pos, TurnedRope(rope, self.store))

    def attend(self, layer: int, q: Tensor, q_pos: Tensor) -> Tensor:
        """Where the eager store decodes (a prefill chunk, the count readable on the host) the held tokens are turned
        back and attended as it does, bit for bit; otherwise (decode steps, traced or recorded) in the rotated space."""
        if q.shape[2] > 1 and not capturing():
            n, store = int(self.index), self.store
            k, v = (side.decoded(layer, n, q.dtype) for side in self.sides)
            k, v = store.turn(k, "k", back=True).to(q.dtype), store.turn(v, "v", back=True).to(q.dtype)
            return attention(q, k, v, q_pos, self.pos[:, :n])
        out = super().attend(layer, self.store.turn(q, "k").to(q.dtype), q_pos)
        return self.store.turn(out, "v", back=True).to(q.dtype)
