"""KVzip's replay over sliding-window layers: a windowed layer's store drops the replayed tokens its window has passed,
step by step, as it drops prompt tokens outside a replay, while the prompt itself stays whole (it is what the
replay scores and what prefill then compresses)."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from kvcompress.cache import PAD_POSITION, ComposedCache
from kvcompress.cache.policy.kvzip import KVzip
from kvcompress.engine.session import Session

WINDOW = 8
PROMPTS = [list(range(1, 31)), list(range(3, 25))]  # two rows of different lengths (30 and 22 tokens)


class Watched(ComposedCache):
    """Records every layer's held positions after each replay step, with the step's queries and the replay start."""

    def attend(self, layer, q, q_pos):
        out = super().attend(layer, q, q_pos)
        if self.replay_from is not None:
            self.seen.append((q_pos.clone(), self.views[layer].positions().clone(), self.replay_from.clone()))
        return out


@pytest.mark.parametrize("chunk", [1, 5])
def test_replay_holds_only_the_window_of_replayed_tokens(chunk):
    torch.set_num_threads(1)
    model = tiny_model(model_type="mistral", sliding_window=WINDOW)
    cache = Watched(policy=KVzip(budget=12, when="prefill", scope="layer"))
    cache.seen = []
    cache.setup(model.config.spec())
    Session(model, cache, chunk=chunk).start(len(PROMPTS)).prefill(PROMPTS)
    lengths = torch.tensor([len(p) for p in PROMPTS])
    assert cache.replayed == int(lengths.sum()) and cache.seen
    for q_pos, pos, start in cache.seen:
        real = pos < PAD_POSITION
        last = torch.where(q_pos < PAD_POSITION, q_pos, -1).amax(1)  # each row's last replay query so far
        replayed = real & (pos >= start[:, None])
        # replayed tokens held: only those inside the window of the row's last query (the last W - 1 positions)
        assert bool((pos > (last - WINDOW + 1)[:, None]).masked_select(replayed).all())
        assert (replayed.sum(1) <= WINDOW - 1).all()
        # the prompt stays whole: a windowed store's last W - 1 prompt tokens, every row
        assert torch.equal((real & (pos < start[:, None])).sum(1), lengths.clamp(max=WINDOW - 1))
    # after the replay every store holds its prompt window again, nothing replayed
    for view in cache.views:
        held = view.positions()
        assert torch.equal((held < PAD_POSITION).sum(1), lengths.clamp(max=WINDOW - 1))
        assert bool((held < lengths[:, None]).masked_select(held < PAD_POSITION).all())
