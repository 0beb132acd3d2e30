"""Issue 16's policies (AdaKV, Expected Attention, KVzip, DuoAttention, KeyDiff, ChunkKV, CaM): a budget above the
prompt is ``policy=none`` exactly, kept counts are the budget per row and head, batch rows are independent, and
each score on a tiny hand-built example is what the paper's formula gives."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import spec_of, tiny_model
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kvcompress import presets
from kvcompress.cache import PAD_POSITION, ComposedCache, ModelSpec
from kvcompress.cache.policy.adakv import AdaKV
from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.cam import merge_values
from kvcompress.cache.policy.chunkkv import ChunkKV, chunk_priority
from kvcompress.cache.policy.duo_attention import DuoAttention
from kvcompress.cache.policy.expected_attention import ExpectedAttention, expected_logits
from kvcompress.cache.policy.keydiff import KeyDiff
from kvcompress.cache.policy.kvzip import KVzip
from kvcompress.cache.policy.score import Candidates
from kvcompress.cache.storage.dense import DenseStore
from kvcompress.engine.generate import prefill
from kvcompress.engine.rope import RotaryEmbedding
from kvcompress.eval.retrieval_probe import planted, retrieval_nll

CONF = Path(__file__).resolve().parents[1] / "conf" / "policy"
NEW = ["adakv", "chunkkv", "keydiff", "expected_attention", "kvzip", "duo_attention", "cam"]
SMALL = {"adakv": dict(recent=4, scorer=dict(window=4)), "chunkkv": dict(recent=4, chunk=4, scorer=dict(window=4)),
         "duo_attention": dict(probe_recent=4),
         "kvzip": dict(scope="layer")}  # one selection per layer (the global default: tests/test_budgets.py)


class Identity:
    """A rotary embedding that rotates nothing (hand-built examples)."""

    def rotate(self, x, pos):
        return x

    def cos_sin(self, pos, dtype):
        return torch.ones((*pos.shape, 2), dtype=dtype), torch.zeros((*pos.shape, 2), dtype=dtype)


class Probe:
    """A calibration context with the synthetic passkey probe on the tiny model's random tokens."""

    def __init__(self, model, tmp):
        self.model, self.key, self.cache_dir, self.progress = model, "tiny-probe", str(tmp), False
        self.windows = torch.randint(0, 97, (2, 96), generator=torch.Generator().manual_seed(0))
        self.calls = 0

    def retrieval_nll(self, cache):
        self.calls += 1
        return retrieval_nll(self.model, self.windows, cache, chunk=16)


def load(name: str, **settings):
    """conf/policy/<name>.yaml as ``kvc policy=<name>`` composes it (base/ and scorer defaults resolved)."""
    return instantiate(OmegaConf.merge(presets.load(CONF / f"{name}.yaml"), SMALL.get(name, {}), settings),
                       _convert_="all")


def test_every_policy_yaml_reads_as_hydra_composes_it():
    """The shared settings live once (conf/policy/base/); code that reads a preset outside a Hydra run (record
    settings, a run's effective preset, the contract suite) sees exactly what ``kvc policy=<name>`` composes, and
    the bases are not choices."""
    from hydra import compose, initialize_config_dir

    from kvcompress.job import presets as job_presets
    from kvcompress.records import preset

    names = presets.names("policy")
    assert "base" not in names and {"h2o", "adakv", "streaming", "none"} <= set(names)
    with initialize_config_dir(config_dir=str(presets.CONF_DIR), version_base=None):
        for name in names:
            composed = OmegaConf.to_container(compose("config", [f"policy={name}"]).policy, resolve=False)
            assert presets.settings("policy", name) == composed == job_presets("policy")[name], name
            assert preset("policy", name) == {k: v for k, v in composed.items() if k != "_target_"}, name
    shared = set(OmegaConf.load(CONF / "base" / "keep.yaml"))
    for name in names:  # every eviction policy extends the base instead of repeating it
        own = set(OmegaConf.load(CONF / f"{name}.yaml")) - {"defaults"}
        assert name == "none" or shared <= set(presets.settings("policy", name)) and not shared <= own, name


def test_a_preset_defaults_entry_outside_the_read_forms_is_refused(tmp_path):
    (tmp_path / "mine.yaml").write_text("defaults:\n  - other@elsewhere\n  - _self_\nbudget: 8\n")
    with pytest.raises(ValueError, match="only '@_here_' packages"):
        presets.load(tmp_path / "mine.yaml")


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_model(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)


def cache_of(model, policy, tmp_path):
    cache = ComposedCache(DenseStore(), policy)
    cache.setup(spec_of(model))
    cache.calibrate(Probe(model, tmp_path))
    return cache


def run(model, cache, prompts, steps=6):
    """Prefill (the engine's, replay included) then greedy-free decode of fixed tokens: all logits."""
    cache.reset(len(prompts))
    last, pos = prefill(model, prompts, cache, chunk=8)
    out = [last]
    with torch.inference_mode():
        for t in range(steps):
            tok = torch.full((len(prompts), 1), 5 + t)
            out.append(model(tok, pos[:, None] + t, cache)[:, -1])
    return torch.stack(out, 1)


def prompts(seed, lengths=(40, 40)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", NEW)
def test_budget_above_prompt_is_none(model, tmp_path, name):
    ref = run(model, cache_of(model, None, tmp_path), prompts(0))
    cache = cache_of(model, load(name, budget=10_000, when="prefill"), tmp_path)
    assert torch.equal(run(model, cache, prompts(0)), ref) and cache.policy.evictions == 0


@pytest.mark.parametrize("name", NEW)
def test_kept_counts_and_rows_independent(model, tmp_path, name):
    cache = cache_of(model, load(name, budget=16, when="prefill"), tmp_path)
    out = run(model, cache, prompts(1, (40, 33)), steps=1)  # compressed before the first decode step attends
    real = [(v.positions()[:, None] if v.positions().dim() == 2 else v.positions()) < PAD_POSITION
            for v in cache.stores()]
    counts = torch.stack([r.sum(-1) for r in real])  # (layers, B, heads); the budget includes the decode token
    if name == "duo_attention":  # R retrieval heads keep every token, the others sinks + recent
        n, window = counts[:, 0].numel(), 4 + 4  # seen: 40 + 1 and 33 + 1 (the decode token); R from the fullest
        r = math.floor(n * (16 - window) / (41 - window))
        assert counts.sum((0, 2)).tolist() == [r * 41 + (n - r) * window, r * 34 + (n - r) * window]
    elif name == "adakv":
        assert (counts.sum(-1) == 16 * 2).all() and (counts >= int(0.2 * 16)).all()
    else:
        assert (counts == 16).all()
    if name == "kvzip":
        assert cache.memory_report()["replay_tokens"] == 73  # the second prefill, recorded
    other = prompts(1, (40, 33))
    other[1] = prompts(2, (37,))[0]
    again = run(model, cache_of(model, load(name, budget=16, when="prefill"), tmp_path), other, steps=1)
    torch.testing.assert_close(again[0], out[0], rtol=0, atol=1e-5)


def test_kvzip_replay_leaves_the_prompt(model, tmp_path):
    """Budget above the prompt but below max_position: the replay runs and is dropped again; nothing is evicted."""
    ref = run(model, cache_of(model, None, tmp_path), prompts(3, (40, 31)))
    cache = cache_of(model, load("kvzip", budget=100), tmp_path)
    out = run(model, cache, prompts(3, (40, 31)))
    assert cache.replayed == 71 and cache.policy.evictions == 0
    torch.testing.assert_close(out, ref, rtol=0, atol=5e-5)  # weights from an explicit softmax: rounding only


def spec(heads=1, kv_heads=1, d=2) -> ModelSpec:
    return ModelSpec("hand", 1, heads, kv_heads, d, 1000)


def store_of(k, v=None):
    s = DenseStore()
    s.append(k, torch.ones_like(k) if v is None else v, torch.arange(k.shape[2])[None].expand(k.shape[0], -1),
             Identity())
    return s


def candidates(store, owner: int = 0):
    """A store's tokens as a score sees them (no state): what ``EvictionPolicy.evict`` passes."""
    return Candidates(owner, store.positions()[:, None], None, 1, lambda: store.read()[:2])


def test_keydiff_scores_by_hand():
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])[None, None]
    pol = KeyDiff(budget=2)
    pol.check(spec(), DenseStore())
    anchor = torch.tensor([1 + 1 / math.sqrt(2), 1 + 1 / math.sqrt(2)]) / 3  # mean of the unit keys
    want = [-(float(x @ anchor) / (float(x.norm()) * float(anchor.norm()))) for x in k[0, 0]]
    got = pol.score(candidates(store_of(k)))
    torch.testing.assert_close(got[0, 0], torch.tensor(want))


def test_expected_attention_by_hand():
    """Queries [1,0] and [3,2]: mu = [2,1], Sigma = [[1,1],[1,1]]; z_i = mu.k/sqrt2 + k^T Sigma k / 4."""
    pol = ExpectedAttention(budget=2, sinks=0, future=3)
    pol.check(spec(), DenseStore())
    pol.reset(1, [0])
    q = torch.tensor([[1.0, 0.0], [3.0, 2.0]])[None, None]
    pol.observe_queries(0, q, torch.arange(2)[None], Identity())
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])[None, None]
    v = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])[None, None]
    z = torch.tensor([2 / math.sqrt(2) + 1 / 4, 1 / math.sqrt(2) + 1 / 4, 1 / math.sqrt(2) + 0.0])
    want = z.softmax(0) * torch.tensor([5.0, 1.0, 2.0])
    torch.testing.assert_close(pol.score(candidates(store_of(k, v)))[0, 0], want)


def test_expected_attention_rope_average():
    """The averaged rotation applied to mu equals the mean of mu rotated at each future position."""
    rope = RotaryEmbedding(8, 10000.0, None, 4096)
    pol = ExpectedAttention(budget=2, sinks=0, future=5)
    pol.rope = rope
    rot = pol.rope_mean(torch.tensor([7]), 8)
    mu = torch.randn(8)
    rotated = rope.rotate(mu.expand(1, 1, 5, 8), torch.arange(7, 12)[None]).mean(2)[0, 0]
    torch.testing.assert_close(rot[0] @ mu, rotated)
    s1, s2, n = mu[None, None], torch.zeros(1, 1, 8, 8), torch.ones(1)
    k = torch.randn(1, 1, 3, 8)
    torch.testing.assert_close(expected_logits(k, n, s1, s2 + mu[:, None] * mu, rot, True)[0, 0],
                               (k[0, 0] @ rotated) / math.sqrt(8))  # zero covariance: the mean term alone


def test_kvzip_scores_are_max_attention():
    pol = KVzip(budget=2, sinks=0)
    pol.check(spec(heads=2, kv_heads=1), DenseStore())
    pol.reset(1, [0])
    w = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], [[0.2, 0.6, 0.2], [0.3, 0.3, 0.4]]])[None]
    pol.observe(0, w, torch.arange(3)[None])
    torch.testing.assert_close(pol.state[0][0, 0], torch.tensor([0.5, 0.6, 0.8]))


def test_chunk_priority_keeps_whole_chunks():
    s = torch.tensor([1.0, 1.0, 5.0, 0.0, 0.0, 0.5])[None, None]  # chunk sums 2, 5, 0.5
    prio = chunk_priority(s, 2)
    assert set(prio.topk(2).indices[0, 0].tolist()) == {2, 3}
    assert set(prio.topk(4).indices[0, 0].tolist()) == {0, 1, 2, 3}
    assert prio.topk(5).indices[0, 0].tolist()[-1] == 5  # the remainder takes the next chunk's best token


class Fixed(EvictionPolicy):
    def __init__(self, scores):
        super().__init__(budget=1)
        self.fixed = scores

    def score(self, c):
        return self.fixed


def test_adakv_budgets_by_hand():
    """Head 0 scores 9 8 7 6, head 1 scores 1 0 0 0, budget 2 per head: alpha 0.5 keeps each head's best one, the
    other two go to head 0 (8, 7 beat head 1's 0s)."""
    pol = AdaKV(Fixed(torch.tensor([[[9.0, 8, 7, 6], [1, 0, 0, 0]]])), budget=2, alpha=0.5)
    pol.check(spec(heads=2, kv_heads=2), DenseStore())
    pol.reset(1, [0])
    store = store_of(torch.randn(1, 2, 4, 2))
    pol.evict(0, store)
    pos = store.positions()
    assert [[p for p in row if p < PAD_POSITION] for row in pos[0].tolist()] == [[0, 1, 2], [0]]
    assert pol.report()["padding_fraction"] == pytest.approx(2 / 6)


def test_cam_merge_by_hand():
    """Kept slots 1 and 3, window 1: slot 0 (A 2) merges into slot 1 (A 4) with p = 1/2; slot 2 (A 1) into 3 (A 1)."""
    v = torch.tensor([[1.0, 0], [0, 1], [2, 2], [0, 0]])[None, None]
    out = merge_values(v, torch.tensor([[[2.0, 4, 1, 1]]]), torch.arange(4)[None, None], torch.tensor([[1, 3]]), 1)
    torch.testing.assert_close(out[0, 0], torch.tensor([[1.0, 0], [0.5, 1], [2, 2], [2, 2]]))
    normalized = merge_values(v, torch.tensor([[[2.0, 4, 1, 1]]]), torch.arange(4)[None, None],
                              torch.tensor([[1, 3]]), 1, normalize=True)  # weights 1 and p: (v_j + p v_e) / (1 + p)
    torch.testing.assert_close(normalized[0, 0], torch.tensor([[1.0, 0], [0.5 / 1.5, 1 / 1.5], [2, 2], [1, 1]]))


def test_duo_calibrates_once_and_reuses(model, tmp_path):
    ctx = Probe(model, tmp_path)
    pol = DuoAttention(budget=16, probe_recent=4)
    cache = ComposedCache(DenseStore(), pol)
    cache.setup(spec_of(model))
    with pytest.raises(ValueError, match="cache_for"):  # its probes are built by the composed cache
        pol.calibrate(ctx)
    cache.calibrate(ctx)
    assert ctx.calls == 1 + 4 * 2 and pol.head_scores.shape == (4, 2)
    again = DuoAttention(budget=16, probe_recent=4)
    cache = ComposedCache(DenseStore(), again)
    cache.setup(spec_of(model))
    cache.calibrate(ctx)
    assert ctx.calls == 9 and torch.equal(again.head_scores, pol.head_scores)


def test_planted_prompts():
    w = torch.arange(200).view(2, 100)
    tokens, first = planted(w, span=6, cue=2)
    assert tokens.shape == (2, 106) and first == 102
    assert torch.equal(tokens[0, 15:21], tokens[0, 100:]) and torch.equal(tokens[1, 45:51], tokens[1, 100:])


@pytest.mark.parametrize("name,setting,allowed", [("adakv", dict(alpha=2.0), "policy.alpha"),
                                                  ("chunkkv", dict(chunk=0), "policy.chunk"),
                                                  ("expected_attention", dict(future=0), "policy.future"),
                                                  ("cam", dict(window=0), "policy.window"),
                                                  ("duo_attention", dict(probe_recent=0), "policy.probe_recent"),
                                                  ("adakv", dict(scorer="h2o"), "policy.scorer")])
def test_bad_settings_name_themselves(name, setting, allowed):
    with pytest.raises(Exception, match=allowed.replace(".", r"\.")):
        load(name, **setting)


@pytest.mark.parametrize("when", ["decode", "prefill"])
def test_tova_in_a_padded_batch_scores_each_rows_last_real_query(model, tmp_path, when):
    """A right-padded row's last query in a prefill chunk is padding (its weights come zeroed): TOVA scores that
    row with its own last real query, so each row of a padded batch keeps what it keeps alone."""
    from kvcompress.cache.policy.tova import TOVA

    rows = prompts(3, (40, 29))  # chunk 8: row 1 ends at 29, mid-chunk; its last chunk holds no real query
    both = run(model, cache_of(model, TOVA(budget=12, when=when), tmp_path), rows)
    for i, row in enumerate(rows):
        alone = run(model, cache_of(model, TOVA(budget=12, when=when), tmp_path), [row])
        torch.testing.assert_close(both[i], alone[0], rtol=1e-5, atol=1e-5)


def test_a_wrapped_scorer_is_not_gated_by_its_own_budget():
    """Under a wrapper the scorer's eviction settings are unused: a wrapped Expected Attention whose own (default)
    budget no store reaches still collects query statistics, and scores by them (it once collected none)."""
    pol = ChunkKV(ExpectedAttention(sinks=0, future=3, budget=4096), budget=2, chunk=1)
    pol.check(spec(), DenseStore())
    pol.reset(1, [0])
    pol.observe_queries(0, torch.tensor([[1.0, 0.0], [3.0, 2.0]])[None, None], torch.arange(2)[None], Identity())
    assert pol.scorer.never_evicts and pol.tensors()
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])[None, None]
    assert pol.score(candidates(store_of(k))).std() > 0  # not the all-zero score of no statistics
