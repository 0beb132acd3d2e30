"""Rotation composed with KIVI's per-channel keys (``storage=rotated_kivi``) and with pre-RoPE keys (``storage=rotated``
``keys=pre_rope``): round trips against the unrotated storage fed rotated tokens, the decode step's turned query
against un-rotating every key, eager against captured, the contract suite, settings."""
from __future__ import annotations

import pytest
import torch
from conftest import spec_of, static_prefill, tiny_model
from test_frontier import ready, x_of

from kvcompress.cache import DenseStore
from kvcompress.cache.base import attention, attention_weights
from kvcompress.cache.storage.frontier.rotated import IntTokenCodec, RotatedStore, orthogonal
from kvcompress.cache.storage.frontier.rotated_kivi import RotatedQuantizedStore
from kvcompress.cache.storage.quant.store import QuantizedStore
from kvcompress.testing import check_method

KIVI2 = dict(bits=2, group_size=8, key_axis="channel", residual=8)
TARGET = "kvcompress.cache.storage.frontier.rotated_kivi.RotatedQuantizedStore"


class Turn:
    """A stand-in RoPE: a fixed orthogonal map per position parity (enough to tell pre- from post-RoPE storage)."""

    def __init__(self, dim: int):
        self.r = orthogonal("random", dim, 7)

    def rotate(self, x, pos):
        return torch.where((pos % 2 == 1)[:, None, :, None], x @ self.r, x)


class NoRope:
    def rotate(self, x, pos):
        return x


def _spec(head_dim=32):
    return spec_of(tiny_model(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                              num_hidden_layers=1))


def held(store, k, v, rope=None):
    store.check(_spec(k.shape[-1]))
    s = store.fresh(0)
    s.append(k, v, torch.arange(k.shape[2])[None].expand(k.shape[0], -1), rope or Turn(k.shape[-1]))
    return s


@pytest.mark.parametrize("transform,rotate", [("hadamard", "kv"), ("random", "k"), ("hadamard", "v")])
def test_rotated_kivi_is_kivi_of_the_rotated_tokens(transform, rotate):
    """Read back: R^T of what KIVI holds for x R (keys after RoPE), on each rotated side; 28 tokens = 2 coded groups
    of 8 per-channel keys + 12 residual."""
    k, v = x_of(0, (2, 2, 28, 32), outlier=True), x_of(1, (2, 2, 28, 32))
    rope = Turn(32)
    r = orthogonal(transform, 32, 0)
    turn = {s: (r if s in rotate else torch.eye(32)) for s in "kv"}
    rot = held(RotatedQuantizedStore(transform, rotate, **KIVI2, residual_dtype="float32"), k, v, rope)
    pos = torch.arange(28)[None].expand(2, -1)
    plain = held(QuantizedStore(**KIVI2, residual_dtype="float32"), k, v, rope)
    plain.clear()
    plain.append_payload(rope.rotate(k, pos) @ turn["k"], v @ turn["v"], pos)
    (k1, v1, _), (k2, v2) = rot.read(), plain.read_payload()
    torch.testing.assert_close(k1, k2 @ turn["k"].T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v1, v2 @ turn["v"].T, atol=1e-5, rtol=1e-5)
    assert rot.k.n_q == 16 and not torch.equal(k1, rope.rotate(k, pos))  # coded, and lossy


def test_the_turned_query_equals_unrotating_every_key():
    """(q R)(k R)^T = q k^T: a decode step over the rotated codes equals attention over the keys read back."""
    k, v = x_of(2, (1, 2, 40, 32), outlier=True), x_of(3, (1, 2, 40, 32))
    store = held(RotatedQuantizedStore(**KIVI2), k, v)
    q, q_pos = x_of(4, (1, 4, 1, 32)), torch.full((1, 1), 40)
    out, w = store.attend(q, q_pos, n_weights=1)
    kk, vv, pos = store.read()
    torch.testing.assert_close(out, attention(q, kk, vv, q_pos, pos), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, attention_weights(q, kk, q_pos, pos), atol=1e-6, rtol=1e-5)


def test_rotation_makes_kivi_keys_per_token_usable():
    """KIVI-2 with per-token keys and an outlier channel: the rotated store reads back closer (the outlier spread)."""
    k = x_of(5, (1, 2, 32, 32), outlier=True)
    per_token = dict(bits=2, group_size=32, key_axis="token", residual=0)

    def err(store):
        kk, _, _ = held(store, k, k, NoRope()).read()
        return float((kk - k).norm() / k.norm())
    assert err(RotatedQuantizedStore(**per_token)) < 0.7 * err(QuantizedStore(**per_token))


def test_pre_rope_rotation_stores_the_rotated_unrope_key():
    """keys=pre_rope: the codes are those of k R before RoPE; read turns back, then applies RoPE at the positions."""
    k, v = x_of(6, (2, 2, 12, 32)), x_of(7, (2, 2, 12, 32))
    store = held(RotatedStore("int", key_bits=8, value_bits=8, keys="pre_rope"), k, v)
    codec = IntTokenCodec(8, 8, 32, "pre_rope")
    codec.check(_spec())
    r = orthogonal("hadamard", 32, 0)
    assert torch.equal(store.parts.view()["k"], codec.encode(k @ r, v @ r)["k"])
    kk, _, pos = store.read()
    assert float((kk - Turn(32).rotate(k, pos)).norm() / k.norm()) < 1e-2  # 8-bit codes: close, after RoPE
    kivi = held(RotatedQuantizedStore(**KIVI2, keys="pre_rope"), k, v)
    assert kivi.static_form(40) is None and kivi.read()[0].shape == k.shape


@pytest.mark.parametrize("settings", [KIVI2, dict(bits=4, group_size=8, key_axis="channel", residual=5)])
@torch.inference_mode()
def test_rotated_kivi_eager_equals_captured(settings):
    model = tiny_model(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    eager = ready(RotatedQuantizedStore(**settings), model)
    static = eager.static_form(40)
    toks = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(1))
    a, b = static_prefill(model, eager, toks[:, :14]), static_prefill(model, static, toks[:, :14])
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    for t in range(14, 30):  # decode across group flushes: eager turns the query, the slots too
        pos = torch.full((2, 1), t)
        torch.testing.assert_close(model(toks[:, t:t + 1], pos, static), model(toks[:, t:t + 1], pos, eager),
                                   atol=1e-4, rtol=1e-4)
    dense = static_prefill(model, ready(DenseStore(), model), toks)
    lossy = static_prefill(model, ready(RotatedQuantizedStore(**settings), model), toks)
    assert 0 < (lossy - dense).abs().max() < 2.0


@pytest.mark.parametrize("keys", ["post_rope", "pre_rope"])
def test_rotated_kivi_contract(keys):
    outcomes = check_method(storage={"_target_": TARGET, **KIVI2, "keys": keys})
    assert all(o.startswith("ran") for o in outcomes.values()), outcomes
    assert any(o == "ran, captured" for o in outcomes.values()) == (keys == "post_rope"), outcomes


def test_rotated_kivi_settings_name_themselves():
    for make, match in ((lambda: RotatedQuantizedStore(rotate="q"), "storage.rotate"),
                        (lambda: RotatedQuantizedStore(transform="dct"), "storage.transform"),
                        (lambda: RotatedQuantizedStore(seed=-1), "storage.seed"),
                        (lambda: RotatedQuantizedStore(residual=-1), "storage.residual")):
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(ValueError, match="transform=hadamard"):
        RotatedQuantizedStore(**KIVI2).check(_spec(24))
