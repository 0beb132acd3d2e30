"""A paged token buffer: per (batch row, KV head) only the tokens that head keeps, in fixed-size pages.

A policy that keeps a different number of tokens per KV head (AdaKV, DuoAttention, per-head global budgets) leaves
the store's slot view (B, H, T) padded: head h holds n_h real tokens and T - n_h invisible slots (``PAD_POSITION``),
T = max_h n_h. ``PagedParts`` holds what those slots mean without the padding:

* every part (a codec's per-token tensors, ``storage.codec``) and the positions live in one pool per part, rows
  of ``page`` tokens, shared by all (row, head);
* a page table (B, H, pages) names the pool pages of each (row, head) in order: head h's j-th real token is row
  ``table[b, h, j // page] * page + j % page`` of every pool; (row, head) holds ceil(n_h / page) pages;
* one bit per slot of the view says which slots are real (packed 8 per byte), so the padded view is rebuilt
  exactly: the same slots in the same places, the arithmetic over it unchanged bit for bit.

Appends fill each head's last page and add pages at the pool's end. ``keep`` / ``hide`` (eviction) re-pack the kept
tokens into fresh pools sized to the pages in use, so the allocation shrinks with eviction: memory held is the
tokens kept rounded up to pages, plus the page table and the slot bits, never the fullest head's count.
``view`` / ``positions`` materialise the padded (B, H, T, ...) form for attention and scoring: transient compute,
not storage (padding slots read as zeros, positions ``PAD_POSITION``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION
from kvcompress.cache.buffers import as_bytes

BIT = 2 ** torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """(..., T) bool -> (..., ceil(T / 8)) uint8, slot t in bit t % 8 of byte t // 8."""
    pad = -mask.shape[-1] % 8
    m = torch.nn.functional.pad(mask, (0, pad)).view(*mask.shape[:-1], -1, 8).to(torch.uint8)
    return (m * BIT.to(m.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: Tensor, length: int) -> Tensor:
    """Inverse of ``pack_bits``: (..., ceil(T / 8)) uint8 -> (..., T) bool."""
    return (bits[..., None] & BIT.to(bits.device)).ne(0).flatten(-2)[..., :length]


def upto(counts: Tensor) -> Tensor:
    """0, 1, ... up to the largest of ``counts`` (none for no counts), on their device."""
    return torch.arange(int(counts.max()) if counts.numel() else 0, device=counts.device)


class PagedParts:
    """Named per-token parts and int32 positions of B rows x H KV heads in ``page``-token pages (module docstring).
    Built from a padded form: ``parts`` (B, H|1, T, ...) and ``pos`` (B, H|1, T), real where pos < PAD_POSITION."""

    def __init__(self, parts: dict[str, Tensor], pos: Tensor, page: int):
        self.page = page
        heads = max([pos.shape[1], *(x.shape[1] for x in parts.values())])
        pos = pos.expand(pos.shape[0], heads, pos.shape[-1])
        valid = pos < PAD_POSITION
        self.dtypes = {name: x.dtype for name, x in parts.items()}
        self._store({name: self._expand(x, heads)[valid] for name, x in parts.items()}, pos[valid], valid)

    @staticmethod
    def _expand(x: Tensor, heads: int) -> Tensor:
        return as_bytes(x).expand(x.shape[0], heads, *x.shape[2:])

    # -- layout ------------------------------------------------------------------------------------------
    def _store(self, real: dict[str, Tensor], pos: Tensor, valid: Tensor) -> None:
        """Hold the real tokens ``real[name]`` (N, ...) / ``pos`` (N,), listed row-major over (b, h, slot) of the
        view ``valid`` (B, H, T), in fresh pools: (row, head)'s pages are consecutive, pool row start * page + j."""
        self.length = valid.shape[-1]
        self.bits = pack_bits(valid)
        counts = valid.sum(-1)
        pages = (counts + self.page - 1) // self.page
        start = pages.flatten().cumsum(0).view_as(pages) - pages
        width = upto(pages)
        self.table = torch.where(width < pages[..., None], start[..., None] + width, -1).to(torch.int32)
        j = upto(counts)
        dest = (start[..., None] * self.page + j)[j < counts[..., None]]
        rows = int(pages.sum()) * self.page
        self.pools = {name: self._pool(x, rows, dest) for name, x in real.items()}
        self.pos_pool = self._pool(pos.to(torch.int32), rows, dest)

    @staticmethod
    def _pool(x: Tensor, rows: int, dest: Tensor) -> Tensor:
        pool = x.new_zeros((rows, *x.shape[1:]))
        pool[dest] = x
        return pool

    def valid(self) -> Tensor:
        """(B, H, T) True where a slot of the view holds a real token."""
        return unpack_bits(self.bits, self.length)

    def counts(self) -> Tensor:
        return self.valid().sum(-1)

    def _rows(self, j: Tensor) -> Tensor:
        """Pool rows of the j-th real tokens (B, H, n) of each (row, head) (j < its count)."""
        if not self.table.shape[-1]:  # no (row, head) holds a page: there is no such token
            return torch.zeros_like(j)
        page = self.table.long().gather(-1, (j // self.page).clamp_max(self.table.shape[-1] - 1))
        return page * self.page + j % self.page

    def _token_rows(self) -> Tensor:
        """Pool rows of every real token, row-major over (b, h, slot): the order of ``view()[valid]``."""
        counts = self.counts()
        j = upto(counts).expand(*counts.shape, -1)
        return self._rows(j)[j < counts[..., None]]

    # -- reading -----------------------------------------------------------------------------------------
    def view(self) -> dict[str, Tensor]:
        """The padded form (B, H, T, ...) of every part; padding slots are zeros."""
        valid, rows = self.valid(), self._token_rows()
        return {name: self._spread(pool, valid, rows).view(self.dtypes[name]) for name, pool in self.pools.items()}

    def positions(self) -> Tensor:
        """(B, H, T) int32 positions; padding slots ``PAD_POSITION``."""
        valid = self.valid()
        out = torch.full(valid.shape, PAD_POSITION, dtype=torch.int32, device=valid.device)
        out[valid] = self.pos_pool[self._token_rows()]
        return out

    @staticmethod
    def _spread(pool: Tensor, valid: Tensor, rows: Tensor) -> Tensor:
        out = pool.new_zeros((*valid.shape, *pool.shape[1:]))
        out[valid] = pool[rows]
        return out

    # -- tokens ------------------------------------------------------------------------------------------
    def append(self, parts: dict[str, Tensor], pos: Tensor) -> None:
        """Add T' slots: parts (B, H|1, T', ...) at positions ``pos`` (B, T'); slots at ``PAD_POSITION`` (padding of
        shorter rows) stay invisible and take no page. Each head fills its last page, then takes new pages."""
        heads = self.table.shape[1]
        new = (pos < PAD_POSITION)[:, None].expand(-1, heads, -1)
        counts, held = self.counts(), (self.table >= 0).sum(-1)
        total = counts + new.sum(-1)
        need = (total + self.page - 1) // self.page - held
        if int(need.sum()):
            self._add_pages(held, need)
        j = counts[..., None] + new.long().cumsum(-1) - 1
        rows = self._rows(j.clamp_min(0))[new]
        for name, x in parts.items():
            self.pools[name][rows] = self._expand(x.to(self.dtypes[name]), heads)[new]
        self.pos_pool[rows] = pos.to(torch.int32)[:, None].expand(-1, heads, -1)[new]
        self.bits = pack_bits(torch.cat([self.valid(), new], -1))
        self.length += pos.shape[-1]

    def _add_pages(self, held: Tensor, need: Tensor) -> None:
        """Give (row, head) ``need`` more pages (B, H), numbered after the pool's last; grow every pool to fit."""
        used = self.pos_pool.shape[0] // self.page
        first = used + need.flatten().cumsum(0).view_as(need) - need
        width = int((held + need).max())
        table = torch.nn.functional.pad(self.table, (0, width - self.table.shape[-1]), value=-1)
        i = torch.arange(width, device=table.device)
        fresh = (i >= held[..., None]) & (i < (held + need)[..., None])
        self.table = torch.where(fresh, first[..., None] + i - held[..., None], table).to(torch.int32)
        extra = int(need.sum()) * self.page
        grow = lambda p: torch.cat([p, p.new_zeros((extra, *p.shape[1:]))])  # noqa: E731
        self.pools = {name: grow(p) for name, p in self.pools.items()}
        self.pos_pool = grow(self.pos_pool)

    def keep(self, idx: Tensor) -> None:
        """Keep slots ``idx`` (B, T') or (B, H', T') of every (row, head), in that order; re-packed into pages."""
        valid = self.valid()
        idx = (idx[:, None] if idx.dim() == 2 else idx).expand(*valid.shape[:2], -1)
        kept = valid.gather(-1, idx)
        j = (valid.long().cumsum(-1) - 1).gather(-1, idx)  # the slot's rank among its head's real tokens
        self._repack(self._rows(j.clamp_min(0))[kept], kept)

    def hide(self, visible: Tensor) -> None:
        """Drop the tokens of slots where ``visible`` (B, T) or (B, H, T) is False (they become padding slots)."""
        valid = self.valid()
        kept = valid & (visible[:, None] if visible.dim() == 2 else visible)
        self._repack(self._token_rows()[kept[valid]], kept)

    def _repack(self, rows: Tensor, valid: Tensor) -> None:
        self._store({name: p[rows] for name, p in self.pools.items()}, self.pos_pool[rows], valid)

    def replace(self, name: str, x: Tensor) -> None:
        """Hold part ``name`` of every real token from ``x``, a padded view (B, H|1, T, ...) (token merging: CaM)."""
        valid = self.valid()
        x = as_bytes(x.to(self.dtypes[name]))
        self.pools[name][self._token_rows()] = self._expand(x, valid.shape[1])[valid]

    # -- accounting: the real tensors ---------------------------------------------------------------------
    def tensors(self) -> list[Tensor]:
        """The parts' pools (every page in them is in use: ``reserved`` is the same)."""
        return list(self.pools.values())

    reserved = tensors


class PagedPositions:
    """The positions side of a ``PagedParts`` where a store reads its positions buffer: the padded view, its slot
    count, and the bytes of positions, page table and slot bits."""

    def __init__(self, pages: PagedParts):
        self.pages = pages

    def view(self) -> Tensor:
        return self.pages.positions()

    @property
    def length(self) -> int:
        return self.pages.length

    def tensors(self) -> list[Tensor]:
        return [self.pages.pos_pool, self.pages.table, self.pages.bits]

    reserved = tensors
