"""``storage=kvtc``: KV cache transform coding (Staniszewski & Łańcucki, 2025, "KV Cache Transform Coding for
Compact Storage in LLM Inference"): PCA decorrelation, bits per component by variance, uniform quantization of the
coefficients, and a lossless entropy coder, over the cold tokens; sinks and a hot window stay decoded.

Calibration (per layer and side, K or V): a layer's KV heads joined into one vector x of p = Hkv * head_dim entries
per token (KVTC joins heads, and layers too; here a store is one layer), mean mu, covariance eigenpairs
(lambda_i, u_i) sorted by variance. Keys are pre-RoPE by default, as in KVTC (RoPE rotates by position, which
spreads a key's variance over the rotated pairs); ``keys=post_rope`` fits keys rotated at the calibration
positions (needs the calibration's rotary).

Bits: a budget of round(bits * p) bits per token and side is spread over components to minimise the high-rate
distortion sum_i lambda_i 4^-b_i (each bit halves a uniform quantizer's step): the marginal gain of component i's
next bit, 3/4 lambda_i 4^-b_i, falls with b_i, so taking the budget's largest gains among all (i, b) pairs, b < 8,
is the exact optimum over integer b_i in [0, 8] (reverse water-filling; KVTC's dynamic program solves the same
problem). Components with 0 bits are not stored (decoded as the mean).

Quantization: c = U^T (x - mu); component i with b_i bits is a mid-rise uniform code q = clamp(floor(c / d_i),
-2^(b-1), 2^(b-1) - 1), decoded (q + 1/2) d_i, its step d_i the one of a grid (fitted on the calibration
coefficients) with least squared error. Entropy coding: once ``residual`` tokens are newer, every ``block_size``
tokens' codes are DEFLATE-compressed (stdlib zlib, raw streams, ``level``), one stream per bit width (its own
Huffman table), component-major (``per_byte``: how codes become byte symbols); ``kv_bytes`` counts the streams
as held uint8 tensors. The first ``sink`` tokens and the newest ``residual`` (up to ``block_size - 1`` more) stay
fp16, as in KVTC (4 sinks, 128 recent tokens); cold tokens are coded from that fp16 copy.

Reading inflates and decodes every blob at every step (its cost per step: results/storages_frontier,
decode_cost.py). A blob spans its block's tokens, batch rows and heads, so eviction (``keep``) decodes the kept
tokens and codes them again, and there is no captured form (``static_form`` None: ``CAPTURE_REFUSAL``).
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import Tensor

from kvcompress.cache.buffers import gather_tokens
from kvcompress.cache.checks import int_at_least, number_in
from kvcompress.cache.storage.base import TokenStore
from kvcompress.cache.storage.frontier.formats import saved_fit

MAX_BITS = 8  # one byte per code before entropy coding
STEPS = torch.linspace(0.5, 8.0, 31)  # step grid: d = s * sigma / 2^(b-1), s over this range
CAPTURE_REFUSAL = ("storage=kvtc has no captured form: its cold tokens are DEFLATE blobs inflated on the host "
                   "(zlib) at every read, which a CUDA graph cannot record; it decodes eagerly")


def allocate(var: Tensor, budget: int, max_bits: int = MAX_BITS) -> Tensor:
    """Integer bits per component (p,) minimising sum var_i 4^-b_i with sum b_i <= budget, b_i <= max_bits: the
    ``budget`` largest of the gains var_i 4^-b (b < max_bits), counted per component."""
    gains = var.double()[:, None] * 4.0 ** -torch.arange(max_bits, dtype=torch.float64)  # (p, max_bits)
    take = min(int(budget), gains.numel())
    chosen = torch.zeros(gains.numel(), dtype=torch.int64)
    chosen[gains.flatten().argsort(descending=True, stable=True)[:take]] = 1
    return chosen.view_as(gains).sum(1)


def quantize(c: Tensor, bits: Tensor, step: Tensor) -> Tensor:
    """Mid-rise uniform codes (unsigned, < 2^bits) of coefficients c (..., p) with steps (p,)."""
    half = 2.0 ** (bits.float() - 1)
    return (torch.floor(c / step).clamp(-half, half - 1) + half).to(torch.uint8)


def dequantize(q: Tensor, bits: Tensor, step: Tensor) -> Tensor:
    return (q.float() - 2.0 ** (bits.float() - 1) + 0.5) * step


def groups(bits: Tensor) -> list[tuple[int, Tensor]]:
    """The coded components by bit width, widest first: [(b, indices)]."""
    return [(int(b), (bits == b).nonzero()[:, 0]) for b in bits.unique().flip(0).tolist() if b > 0]


def per_byte(b: int) -> int:
    """Codes per byte before DEFLATE: 1- and 2-bit codes are packed 4 and 2 to a byte (a Huffman code spends at
    least a bit per byte symbol), wider ones one to a byte; every byte symbol then takes at most 16 values."""
    return max(1, 4 // b)


def pack(q: Tensor, b: int) -> Tensor:
    k = per_byte(b)
    q = torch.cat([q, q.new_zeros(-len(q) % k)]).view(-1, k).to(torch.int32)
    return (q << (b * torch.arange(k, dtype=torch.int32))).sum(1).to(torch.uint8)


def unpack(raw: Tensor, b: int, n: int) -> Tensor:
    k = per_byte(b)
    q = (raw.to(torch.int32)[:, None] >> (b * torch.arange(k, dtype=torch.int32))) & (2**b - 1)
    return q.flatten()[:n].to(torch.uint8)


def fit_steps(c: Tensor, bits: Tensor) -> Tensor:
    """Per component, the grid step with the least squared error on calibration coefficients c (N, p)."""
    sigma = c.std(0).clamp_min(1e-8)
    steps = STEPS[:, None] * sigma / 2.0 ** (bits.float() - 1).clamp_min(0)  # (G, p)
    err = torch.stack([(dequantize(quantize(c, bits, s), bits, s) - c).square().mean(0) for s in steps])
    return steps.gather(0, err.argmin(0, keepdim=True))[0]


def fit_side(x: Tensor, bits_per_entry: float) -> dict[str, Tensor]:
    """PCA basis, allocation and steps of samples x (N, p)."""
    mu = x.mean(0)
    lam, u = torch.linalg.eigh(torch.cov((x - mu).T.double()))
    lam, u = lam.flip(0).clamp_min(0).float(), u.flip(1).float()  # descending variance
    bits = allocate(lam, max(1, round(bits_per_entry * x.shape[1])))
    keep = bits > 0
    steps = torch.ones_like(lam)
    if keep.any():
        steps[keep] = fit_steps(((x - mu) @ u)[:, keep], bits[keep])
    return {"mu": mu, "basis": u, "bits": bits.to(torch.uint8), "step": steps, "var": lam}


class KVTCStore(TokenStore):
    ragged_heads = False  # one PCA code covers every KV head of a token: a head cannot drop it alone

    def __init__(self, bits: float = 3.0, block_size: int = 64, residual: int = 128, sink: int = 4,
                 level: int = 9, keys: str = "pre_rope", calibration_file: str | None = None):
        self.bits = number_in("storage.bits", bits, 0, MAX_BITS, open_lo=True)
        self.block = int_at_least("storage.block_size", block_size, 1)
        self.residual, self.sink = int_at_least("storage.residual", residual, 0), int_at_least("storage.sink", sink, 0)
        self.level = int_at_least("storage.level", level, 0, 9)
        self.calibration_file = calibration_file
        self.tables: list[dict[str, dict[str, Tensor]]] | None = None  # per layer {"k": fit_side(...), "v": ...}
        self.stats: dict[str, float | str] = {}
        super().__init__(keys)

    def settings(self) -> dict:
        return {"bits": float(self.bits), "keys": self.keys}  # what changes the calibration

    # -- calibration ---------------------------------------------------------------------------------
    def calibrate(self, ctx, groups: list[list[int]] | None = None) -> None:
        def fit_layer(k: Tensor, v: Tensor) -> dict[str, dict[str, Tensor]]:
            return {name: fit_side(x[0].float().transpose(0, 1).flatten(1), self.bits)  # samples (N, Hkv * D)
                    for name, x in (("k", k), ("v", v))}

        self.tables, self.stats = saved_fit(self, ctx, "kvtc", "a KVTC basis", "tables", fit_layer)
        self.stats["kvtc_bits_allocated_per_entry"] = float(np.mean(
            [t[s]["bits"].float().mean().item() for t in self.tables for s in "kv"]))
        self.stats["kvtc_captured_form"] = CAPTURE_REFUSAL

    def _table(self, name: str, like: Tensor) -> dict[str, Tensor]:
        if self.tables is None:
            raise ValueError("storage=kvtc has no PCA basis: it must be calibrated (kvc calibrates every run)")
        t = self.tables[self.layer][name]
        if t["basis"].device != like.device:
            t = self.tables[self.layer][name] = {n: x.to(like.device) for n, x in t.items()}
        return t

    # -- one block of tokens <-> DEFLATE streams, one per bit width and side -------------------------
    def encode_block(self, name: str, x: Tensor) -> list[Tensor]:
        """x (B, H, T, D) -> per bit width (``groups``), the deflated codes of its components: host uint8 tensors."""
        t = self._table(name, x)
        c = (x.float().transpose(1, 2).flatten(2) - t["mu"]) @ t["basis"]  # (B, T, p)
        blobs = []
        for b, idx in groups(t["bits"]):
            q = quantize(c[..., idx], t["bits"][idx], t["step"][idx]).permute(2, 0, 1).flatten()  # component-major
            z = zlib.compressobj(self.level, zlib.DEFLATED, -15)  # raw DEFLATE: no header or checksum
            data = z.compress(pack(q.cpu(), b).numpy().tobytes()) + z.flush()
            blobs.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return blobs

    def decode_block(self, name: str, blobs: list[Tensor], shape: tuple[int, int, int, int], like: Tensor) -> Tensor:
        """The block (B, H, T, D) in fp32 back from its streams."""
        B, H, T, D = shape
        t = self._table(name, like)
        c = torch.zeros(B, T, H * D, device=like.device)
        for (b, idx), blob in zip(groups(t["bits"]), blobs, strict=True):
            raw = torch.frombuffer(bytearray(zlib.decompress(blob.numpy().tobytes(), -15)), dtype=torch.uint8)
            q = unpack(raw, b, len(idx) * B * T).to(like.device).view(len(idx), B, T).permute(1, 2, 0)
            c[..., idx] = dequantize(q, t["bits"][idx], t["step"][idx])
        return (c @ t["basis"].T + t["mu"]).view(B, T, H, D).transpose(1, 2)

    # -- the TokenStore hooks ----------------------------------------------------------------------
    def clear_payload(self) -> None:
        self.dtype = None
        self.sinks: dict[str, Tensor] = {}  # fp16 (B, H, <= sink, D)
        self.blobs: list[dict[str, list[Tensor]]] = []  # per block {"k": uint8 streams, "v": ...}
        self.shapes: list[tuple[int, int, int, int]] = []  # per block (B, H, T, D)
        self.res: dict[str, Tensor] = {}  # fp16 newest tokens

    def append_payload(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        self.dtype = k.dtype
        new = {"k": k.half(), "v": v.half()}
        held = self.sinks["k"].shape[2] if self.sinks else 0
        n_sink = min(self.sink - held, k.shape[2])
        if n_sink > 0:
            self.sinks = {n: x[:, :, :n_sink].clone() if not held else torch.cat([self.sinks[n], x[:, :, :n_sink]], 2)
                          for n, x in new.items()}  # clone: a view would hold the whole chunk's storage
        new = {n: x[:, :, max(n_sink, 0):] for n, x in new.items()}
        res = {n: x if not self.res else torch.cat([self.res[n], x], 2) for n, x in new.items()}
        cold = max(res["k"].shape[2] - self.residual, 0) // self.block * self.block
        for s in range(0, cold, self.block):
            self.blobs.append({n: self.encode_block(n, x[:, :, s:s + self.block]) for n, x in res.items()})
            self.shapes.append(tuple(res["k"][:, :, s:s + self.block].shape))
        self.res = {n: x[:, :, cold:].clone() for n, x in res.items()}

    def read_payload(self) -> tuple[Tensor, Tensor]:
        out = []
        for n in ("k", "v"):
            like = self.res[n]
            cold = [self.decode_block(n, b[n], s, like) for b, s in zip(self.blobs, self.shapes, strict=True)]
            parts = ([self.sinks[n].float()] if self.sinks else []) + cold + [like.float()]
            out.append(torch.cat(parts, 2).to(self.dtype))
        return out[0], out[1]

    def keep(self, idx: Tensor) -> None:
        if self.res:  # nothing held yet: nothing to keep
            super().keep(idx)

    def keep_payload(self, idx: Tensor) -> None:
        k, v = (gather_tokens(x, idx) for x in self.read_payload())
        self.clear_payload()
        self.append_payload(k, v, None)

    def payload_tensors(self) -> list[Tensor]:
        blobs = [t for b in self.blobs for n in ("k", "v") for t in b[n]]
        return list(self.sinks.values()) + blobs + list(self.res.values())

    def calibration_tensors(self) -> list[Tensor]:
        return [x for layer in self.tables or [] for side in layer.values() for n, x in side.items() if n != "var"]

    def report(self) -> dict[str, float | str]:
        return dict(self.stats)
