"""The paged buffer (``cache.pages``): a store whose KV heads keep different token counts holds them in pages, with
the same logits, positions and kept tokens as the padded form and the bytes of the pages it uses."""
from __future__ import annotations

import copy

import pytest
import torch

from kvcompress.cache.base import PAD_POSITION
from kvcompress.cache.pages import PagedParts, pack_bits, unpack_bits
from kvcompress.cache.storage.dense import DenseStore
from kvcompress.cache.storage.frontier.fp8 import Fp8Store
from kvcompress.testing import contract

UNEVEN = {"adakv": dict(budget=0.5, recent=4, scorer=dict(window=4)),
          "duo_attention": dict(budget=0.5, probe_recent=4)}


def dense(page_size):
    store = DenseStore()
    store.page_size = page_size
    return store


@pytest.fixture(scope="module")
def runs():
    """(policy, page_size) -> (cache, logits) of the tiny model, each combination driven once."""
    model, done = contract.tiny_model(), {}

    def run(policy, page_size):
        if (policy, page_size) not in done:
            cache = contract.build(model, contract.Axes(dense(page_size), policy), policy=UNEVEN[policy])
            done[policy, page_size] = cache, contract.drive(model, cache, contract.tokens(0))
        return done[policy, page_size]
    return run


@pytest.mark.parametrize("policy", sorted(UNEVEN))
@pytest.mark.parametrize("page", [1, 4])
def test_paged_equals_padded(runs, policy, page):
    """Logits bit for bit, positions and every kept token's K and V equal the padded form's; only the padded form
    holds padding."""
    padded, want = runs(policy, None)
    paged, got = runs(policy, page)
    assert torch.equal(got, want)
    for a, b in zip(padded.stores(), paged.stores(), strict=True):
        assert not a.paged
        assert torch.equal(a.positions(), b.positions())
        real = a.positions() < PAD_POSITION
        for name, x in a.parts.view().items():
            assert torch.equal(x[real], b.parts.view()[name][real])
    assert any(b.paged for b in paged.stores()), "no store moved into pages: the test compares nothing"


@pytest.mark.parametrize("policy", sorted(UNEVEN))
@pytest.mark.parametrize("page", [1, 4])
def test_bytes_are_pages_in_use(runs, policy, page):
    """kv_bytes of a paged store = per (row, head) ceil(kept / page) pages of K, V and positions, plus the page table
    and one bit per slot, all allocated (nothing spare); with 1-token pages (no rounding), below the padded form's."""
    padded, _ = runs(policy, None)
    cache, _ = runs(policy, page)
    want = 0
    for store, plain in zip(cache.stores(), padded.stores(), strict=True):
        if not store.paged:  # pages would not hold fewer slots: the store stays as the padded one
            want += sum(t.nbytes for t in plain.tensors())
            continue
        counts = (store.positions() < PAD_POSITION).sum(-1)
        pages = int(((counts + page - 1) // page).sum())
        k = store.parts.view()["k"]
        per_token = 2 * k.shape[-1] * k.element_size() + 4  # K, V, an int32 position
        b, h, t = store.positions().shape
        want += pages * page * per_token + store.pos.pages.table.nbytes + b * h * -(-t // 8)
    assert cache.kv_bytes() == want + sum(t.nbytes for t in cache.policy.tensors())
    assert cache.kv_bytes_allocated() < padded.kv_bytes_allocated()
    if page == 1:
        assert cache.kv_bytes() < padded.kv_bytes()


def test_pages_follow_append_keep_hide():
    """Append (with padding slots of a shorter row), keep per head, hide, append again: the view equals the same
    operations on the padded tensors, and every pool page is in use."""
    g = torch.Generator().manual_seed(0)
    B, H, T, D, page = 2, 3, 11, 5, 4
    x = torch.randn(B, H, T, D, generator=g)
    pos = torch.arange(T)[None].repeat(B, 1)
    pos[1, 8:] = PAD_POSITION  # row 1 is shorter
    paged = PagedParts({"x": x[:, :, :6]}, pos[:, None, :6], page)
    paged.append({"x": x[:, :, 6:]}, pos[:, 6:])
    ref_x, ref_pos = x.clone(), pos[:, None].expand(B, H, T).clone()
    ref_x[ref_pos >= PAD_POSITION] = 0

    def same():
        real = ref_pos < PAD_POSITION
        assert torch.equal(paged.positions(), ref_pos.to(torch.int32))
        assert torch.equal(paged.view()["x"], torch.where(real[..., None], ref_x, 0.0))
        assert paged.pools["x"].shape[0] == int(((real.sum(-1) + page - 1) // page).sum()) * page

    same()
    idx = torch.stack([torch.randperm(T, generator=g)[:7].sort().values for _ in range(B * H)]).view(B, H, 7)
    paged.keep(idx)
    ref_x, ref_pos = ref_x.gather(2, idx[..., None].expand(-1, -1, -1, D)), ref_pos.gather(2, idx)
    same()
    visible = torch.rand(B, H, 7, generator=g) > 0.4
    paged.hide(visible)
    ref_pos = torch.where(visible, ref_pos, PAD_POSITION)
    same()
    more = torch.randn(B, 1, 2, D, generator=g)  # a part shared by the heads (H = 1) is held per head
    paged.append({"x": more}, torch.tensor([[20, 21], [20, PAD_POSITION]]))
    ref_x = torch.cat([ref_x, more.expand(B, H, 2, D)], 2)
    ref_pos = torch.cat([ref_pos, torch.tensor([[20, 21], [20, PAD_POSITION]])[:, None].expand(B, H, 2)], 2)
    same()


def test_float8_parts_and_bits():
    """A float8 part moves through its byte view; slot bits round-trip."""
    mask = torch.rand(3, 2, 13) > 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), 13), mask)
    x = torch.randn(1, 2, 5, 4).to(torch.float8_e4m3fn)
    pos = torch.tensor([[[0, 1, 2, 3, PAD_POSITION], [0, 1, PAD_POSITION, PAD_POSITION, PAD_POSITION]]])
    paged = PagedParts({"x": x}, pos, 2)
    out = paged.view()["x"]
    assert out.dtype == torch.float8_e4m3fn
    real = pos < PAD_POSITION
    assert torch.equal(out.view(torch.uint8)[real], x.view(torch.uint8)[real])


def test_page_size_setting(runs):
    """A page size that is not a positive integer is refused naming the setting."""
    with pytest.raises(ValueError, match="page_size"):
        runs("adakv", 0)


class NoRope:
    def rotate(self, x, pos):
        return x


@pytest.mark.parametrize("page, paged", [(1, True), (2, True), (4, False)])
def test_pages_only_where_they_hold_fewer_slots(page, paged):
    """Heads keeping 1 and 4 of 4 tokens (8 padded slots): pages of 1 hold 5 rows, pages of 2 hold 2 + 4 = 6, pages
    of 4 hold 4 + 4 = 8, no fewer than the padded view, so that store stays padded."""
    store = dense(page).fresh(0)
    k = torch.randn(1, 2, 4, 3)
    store.append(k, k + 1, torch.arange(4)[None], NoRope())
    store.keep(torch.tensor([[[0, 1, 2, 3], [0, 1, 2, 3]]]))
    store.hide(torch.tensor([[[False, False, False, True], [True, True, True, True]]]))
    assert store.paged == paged
    assert store.positions().tolist() == [[[PAD_POSITION] * 3 + [3], [0, 1, 2, 3]]]
    assert sum(t.nbytes for t in store.parts.tensors()) == (2 * 3 * 4 * (5 if page == 1 else 6 if page == 2 else 8))


@pytest.mark.parametrize("store", [DenseStore(), Fp8Store()], ids=["dense", "fp8"])
def test_update_values_in_pages(store):
    """Token merging (CaM's ``update_values``) on a paged store writes the real tokens' values as the padded store
    does (float8 codes included)."""
    g = torch.Generator().manual_seed(1)
    k, v, new = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    out = []
    for page in (None, 1):
        s = copy.deepcopy(store)
        s.page_size = page
        s = s.fresh(0)
        s.append(k, v, torch.arange(4)[None], NoRope())
        s.keep(torch.tensor([[[0, 1, 2, 3], [0, 1, 2, 3]]]))
        s.hide(torch.tensor([[[False, False, True, True], [True, True, True, True]]]))
        assert s.paged == (page is not None)
        s.update_values(new)
        out.append(s.read())
    real = out[0][2] < PAD_POSITION
    for a, b in zip(out[0], out[1], strict=True):
        assert torch.equal(a[real], b[real])
