"""The one cache: a storage x a policy x a layout (``conf/storage``, ``conf/policy``, ``conf/layout``).

Per layer and step the engine calls ``append`` then ``attend``. The layout routes each layer to its
view of a store; the storage holds tokens and computes attention; the policy sees the attention
weights of every layer that reads a store (summed) and picks what the store keeps, once per step,
after the store's last reader attended. No axis knows another: any storage works under any policy
and any layout. With ``dense``, ``none`` and ``per_layer`` this is the full cache, exactly.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, KVCache, ModelSpec, Rotary
from kvcompress.cache.buffers import pick_rows
from kvcompress.cache.layout.base import Layout
from kvcompress.cache.policy.base import Policy
from kvcompress.cache.storage.base import TokenStore
from kvcompress.cache.storage.dense import DenseStore
from kvcompress.cache.window import check_layout, per_row, window_keep, windowed_fp16_bytes
from kvcompress.cache.window_mask import attention_window


class SlotRotary:
    """Rotary embedding at slot indices instead of positions (a policy's ``rerotate``: positions within the cache)."""

    def __init__(self, rope: Rotary):
        self.rope = rope

    def rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        return self.rope.rotate(x, torch.arange(pos.shape[-1], device=pos.device).expand_as(pos))

    def cos_sin(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.rope.cos_sin(torch.arange(pos.shape[-1], device=pos.device).expand_as(pos), dtype)


class ComposedCache(KVCache):
    def __init__(self, storage: TokenStore | None = None, policy: Policy | None = None, layout: Layout | None = None):
        self.storage = storage if storage is not None else DenseStore()
        self.policy = policy if policy is not None else Policy()
        self.layout = layout if layout is not None else Layout()
        self._seen = torch.zeros((), dtype=torch.long)

    # -- lifecycle -------------------------------------------------------------------------------
    def setup(self, spec: ModelSpec) -> None:
        super().setup(spec)
        self.storage.check(spec)
        self.layout.check(spec)
        check_layout(spec, self.layout)
        self.layout.check_storage(self.storage)
        self.policy.check(spec, self.storage)

    def calibrate(self, ctx) -> None:
        groups = self.layout.calibration_groups()
        if any(len(g) > 1 for g in groups):  # check_storage made sure the storage fits groups
            self.storage.calibrate(ctx, groups)
        else:
            self.storage.calibrate(ctx)
        self.layout.calibrate(ctx, lambda layout: self._dense(Policy(), layout, self.storage.keys))
        self.policy.calibrate(ctx, lambda policy: self._dense(policy, Layout()))

    def _dense(self, policy: Policy, layout: Layout, keys: str = "post_rope") -> ComposedCache:
        """Full precision under ``policy`` and ``layout``, set up: what a layout's or a policy's calibration measures
        with (the passkey probes of DuoAttention, the shared pairs of CLA's auto groups)."""
        cache = ComposedCache(DenseStore(keys=keys), policy, layout)
        cache.setup(self.spec)
        return cache

    def reset(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.views = self.layout.build(self.storage.fresh)
        self.owner = self.layout.owners()
        self.first_reader = {o: self.owner.index(o) for o in set(self.owner)}
        self.last_reader = {o: len(self.owner) - 1 - self.owner[::-1].index(o) for o in set(self.owner)}
        self.policy.reset(batch_size, sorted(set(self.owner)))
        self.pending_weights: dict[int, Tensor] = {}
        self._seen = torch.zeros((), dtype=torch.long)
        self._seen_rows = torch.zeros(batch_size, dtype=torch.long)  # per row: the model's windows hold min(., W-1)
        self.replay_from: Tensor | None = None  # during a replay pass: each row's first replayed position
        self.replayed = 0

    def computes_kv(self, layer: int) -> bool:
        return self.layout.computes_kv(layer)

    # -- the engine's calls ----------------------------------------------------------------------
    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> None:
        self.rope = rope
        if layer == 0 and self.replay_from is not None:  # a replay pass: its tokens are not the row's history
            real = pos < PAD_POSITION
            self.replay_from = torch.minimum(self.replay_from.to(pos.device),
                                             torch.where(real, pos, PAD_POSITION).amin(1))
            self.replayed += int(real.sum())
        elif layer == 0:
            self._seen = self._seen.to(pos.device) + (pos < PAD_POSITION).sum()
            self._seen_rows = self._seen_rows.to(pos.device) + (pos < PAD_POSITION).sum(1)
            self.policy.start_step(k.shape[2], pos)
        self.layout.append(layer, self.views[layer], k, v, pos, SlotRotary(rope) if self.policy.rerotate else rope)

    def attend(self, layer: int, q: Tensor, q_pos: Tensor) -> Tensor:
        view, owner, steps = self.views[layer], self.owner[layer], q.shape[2]
        replaying = self.replay_from is not None
        if layer == self.first_reader[owner] and not replaying:
            self.policy.before_attend(owner, view, steps)
        if self.policy.wants_queries:
            self.policy.observe_queries(owner, q, q_pos, self.rope)
        if self.policy.rerotate:  # the query sits at the slot after the last key: R(slot) = R(slot - pos) R(pos)
            slots = torch.arange(view.length - steps, view.length, device=q.device)[None]
            q = self.rope.rotate(q, slots - q_pos)
        n = self.policy.weights_wanted(owner, steps)
        with attention_window(self.spec.window(layer)):  # a sliding-window layer masks its band (cache/window.py)
            out, weights = view.attend(q, q_pos, n)
        if weights is not None:
            weights = weights * (q_pos[:, -n:] < PAD_POSITION)[:, None, :, None]
            if owner in self.pending_weights:
                weights = weights + self.pending_weights.pop(owner)
        if layer != self.last_reader[owner]:
            if weights is not None:
                self.pending_weights[owner] = weights
            return out
        if weights is not None:
            self.policy.observe(owner, weights, view.positions())
        remap = self.layout.after_attend(layer)
        if remap is not None:
            self.policy.remap(owner, remap)
        self._trim_to_window(owner, view, q_pos)
        if not replaying:
            self.policy.after_attend(owner, view, steps)
        return out

    def _trim_to_window(self, owner: int, view: TokenStore, q_pos: Tensor) -> None:
        """A sliding-window layer's store keeps only its window (the model's semantics, see ``cache/window.py``).
        During a replay pass only replayed tokens leave it: the prompt stays, to be scored and compressed."""
        window = self.spec.window(owner)
        if window is None:
            return
        pos = view.positions()
        keep = window_keep(pos, q_pos, window)
        if self.replay_from is not None:
            keep |= pos < per_row(self.replay_from, pos)
        self._keep_where(owner, view, keep, pos)

    def _keep_where(self, owner: int, view: TokenStore, keep: Tensor, pos: Tensor) -> None:
        """Keep the slots where ``keep`` holds, in order, of the view's positions ``pos`` (B, T) or (B, Hkv, T); the
        policy's state follows. Nothing moves when only hidden padding slots would go and some row keeps every
        slot: the rows would be padded back to the same count (no re-pack every step while a padded row holds
        fewer tokens than its window). One host read decides it."""
        if bool((keep | (pos >= PAD_POSITION)).all() & (keep.sum(-1).max() == keep.shape[-1])):
            return
        idx, valid = pick_rows(keep)
        view.keep(idx)
        if not bool(valid.all()):
            view.hide(valid)
        self.policy.remap(owner, idx)

    # -- a replay pass over the prompt (KVzip's reconstruction), driven by the engine ----------------------
    def replay_wanted(self) -> bool:
        return self.policy.replay_wanted()

    def replay_prefix(self) -> list[int]:
        return self.policy.replay_prefix()

    def replay(self, on: bool) -> None:
        """``on``: the next steps replay the prompt (observed by the policy, never counted). Off: drop every token
        at or after each row's first replayed position from every store, so the stores hold the prompt again."""
        if on:
            self.replay_from = torch.full((self.batch_size,), PAD_POSITION, dtype=torch.long)
            self.policy.start_replay()
            return
        start, self.replay_from = self.replay_from, None
        for owner in sorted(set(self.owner)):
            pos = self.views[owner].positions()
            self._keep_where(owner, self.views[owner], pos < per_row(start, pos), pos)

    def end_prompt(self) -> None:
        self.policy.end_prompt()

    def acts_at_prompt_end(self) -> bool:
        return self.policy.acts_at_prompt_end()

    def static_form(self, capacity: int) -> KVCache | None:
        """The static-capacity equivalent (captured decode), or None (eager decode). Under the identity layout:
        the storage's form when the policy keeps everything, else the policy's form over the storage (a fixed
        budget keeps a fixed shape). Sharing layouts change what a layer reads per step: eager."""
        if type(self.layout) is not Layout or self.spec.windows:  # sliding windows trim the store: eager
            return None
        if type(self.policy) is Policy:
            return self.storage.static_form(capacity)
        return self.policy.static_form(self.storage, capacity)

    # -- accounting ------------------------------------------------------------------------------
    def stores(self) -> list[TokenStore]:
        """Distinct views (a shared store counts once)."""
        return list({id(v): v for v in self.views}.values())

    def tensors(self) -> Iterable[Tensor]:
        return [t for s in self.stores() for t in s.tensors()] + self.policy.tensors()

    def reserved_tensors(self) -> Iterable[Tensor]:
        return [t for s in self.stores() for t in s.reserved_tensors()] + self.policy.tensors()

    def calibration_tensors(self) -> Iterable[Tensor]:
        return self.storage.calibration_tensors()

    @property
    def tokens_seen(self) -> int:
        return int(self._seen)

    def kv_bytes_fp16(self) -> int:
        """The model's own full cache: sliding-window layers hold their window only (``cache/window.py``)."""
        return windowed_fp16_bytes(self.spec, self._seen_rows) if self.spec.windows else super().kv_bytes_fp16()

    def memory_report(self) -> dict[str, float]:
        replay = {"replay_tokens": self.replayed} if self.replayed else {}
        if self.spec.windows:  # what a plain full cache (no windows) would hold, beside the model's own
            replay["kv_bytes_fp16_no_window"] = super().kv_bytes_fp16()
        return {**super().memory_report(), **self.storage.report(), **self.policy.report(), **self.layout.report(),
                **replay}


class FullCache(ComposedCache):
    """Every token, as computed, in the model's dtype: dense x none x per_layer. The exact baseline."""

    def __init__(self) -> None:
        super().__init__()
