"""The contract checks (see the package docstring): building a combination from instances, nodes or YAMLs, driving
it on a tiny random Llama, and the invariants. Plain functions raising AssertionError: call them from any test."""
from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kvcompress.cache.base import PAD_POSITION, ModelSpec
from kvcompress.cache.composed import ComposedCache
from kvcompress.cache.layout.base import Layout
from kvcompress.cache.policy.base import EvictionPolicy, Policy
from kvcompress.cache.policy.captured import StaticEvictionCache, slot_addressable
from kvcompress.cache.storage.dense import DenseStore
from kvcompress.engine.config import ModelConfig
from kvcompress.engine.model import Transformer
from kvcompress.engine.session import Session, positions_like
from kvcompress.presets import load  # a YAML with its defaults list resolved (the suite's loader, re-exported)

CONF = Path(__file__).resolve().parents[2] / "conf"  # kvcompress's own YAMLs (the built-in companions)
AXES = ("storage", "policy", "layout")
IDENTITY = {"storage": DenseStore, "policy": Policy, "layout": Layout}
# per axis, a built-in setting doing real work on a 48-token text: check_method composes a method with each in turn
COMPANIONS = {"storage": {"_target_": "kvcompress.cache.storage.quant.store.QuantizedStore", "bits": 4,
                          "group_size": 16},
              "policy": {"_target_": "kvcompress.cache.policy.h2o.H2O", "budget": 0.5},
              "layout": {"_target_": "kvcompress.cache.layout.cla.CLA", "group_size": 2}}
TINY = dict(model_type="llama", vocab_size=97, hidden_size=128, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")
PROMPT, LENGTH, CHUNK = 40, 48, 8  # a 40-token prompt prefilled in chunks of 8, then 8 decode steps


class Axes:
    """One combination: an instance, a node or a YAML per axis (None: the identity), built fresh for every cache."""

    def __init__(self, storage: Any = None, policy: Any = None, layout: Any = None):
        self.specs = {"storage": storage, "policy": policy, "layout": layout}

    def make(self, axis: str, **settings):
        return make(self.specs[axis], axis, **settings)

    def replace(self, **specs) -> Axes:
        return Axes(**{**self.specs, **specs})

    def __repr__(self) -> str:
        return " x ".join(f"{a}={describe(s)}" for a, s in self.specs.items())


def describe(spec: Any) -> str:
    if spec is None:
        return "identity"
    if isinstance(spec, (dict, DictConfig)):
        return str(spec.get("_target_", "?")).rsplit(".", 1)[-1]
    return spec if isinstance(spec, str) else type(spec).__name__


def make(spec: Any, axis: str, **settings):
    """A fresh instance of an axis: ``spec`` None (the identity), an instance (deep-copied; ``settings`` set as
    attributes), a node with ``_target_``, a YAML path, or a built-in name (``conf/<axis>/<name>.yaml``)."""
    if spec is None:
        return IDENTITY[axis](**settings)
    if isinstance(spec, (str, Path)):
        path = Path(spec) if str(spec).endswith(".yaml") else CONF / axis / f"{spec}.yaml"
        if not path.is_file():
            choices = sorted(p.stem for p in (CONF / axis).glob("*.yaml"))
            raise ValueError(f"{axis}={spec}: no such YAML; built-in choices: {', '.join(choices)}")
        spec = load(path)
    if isinstance(spec, (dict, DictConfig)):
        return instantiate(OmegaConf.merge(spec, settings), _convert_="all")
    obj = copy.deepcopy(spec)
    for name, value in settings.items():
        setattr(obj, name, value)
    return obj


def tiny_model(seed: int = 0) -> Transformer:
    """A random 4-layer Llama (GQA: 4 query heads over 2 KV heads, head_dim 32, vocabulary 97), fp32, CPU."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Transformer(ModelConfig.from_hf(TINY, "tiny-random")).eval()
        for norm in (m for n, m in model.named_modules() if n.endswith("norm")):
            norm.weight.data.add_(torch.randn_like(norm.weight) * 0.1)  # not all ones: norms are exercised
    return model


def tokens(seed: int, batch: int = 2, n: int = LENGTH, vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


class RandomCalibration:
    """A calibration context without an engine: random K/V samples (latent storages), a random DuoAttention probe."""

    def __init__(self, spec: ModelSpec, cache_dir: str | Path):
        self.spec, self.cache_dir, self.key, self.progress, self.rope = spec, str(cache_dir), "tiny-random", False, None

    def retrieval_nll(self, cache) -> float:
        self.calls = getattr(self, "calls", 0) + 1
        return float(torch.rand((), generator=torch.Generator().manual_seed(self.calls)))

    def kv_samples(self):
        g = torch.Generator().manual_seed(0)
        shape = (1, self.spec.num_kv_heads, 256, self.spec.head_dim)
        return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.arange(256)[None])
                for _ in range(self.spec.num_layers)]


def build(model: Transformer, axes: Axes, calibration_dir: str | Path | None = None, **settings) -> ComposedCache:
    """The composed cache, set up and calibrated; ``settings``: per axis, settings over the spec's
    (``policy={"budget": 100}``)."""
    parts = {a: axes.make(a, **settings.get(a, {})) for a in AXES}
    cache = ComposedCache(**parts)
    spec = model.config.spec()
    cache.setup(spec)
    with tempfile.TemporaryDirectory() as tmp:
        cache.calibrate(RandomCalibration(spec, calibration_dir or tmp))
    return cache


@torch.inference_mode()
def drive(model: Transformer, cache, toks: torch.Tensor, prompt: int = PROMPT, chunk: int = CHUNK,
          short: torch.Tensor | None = None) -> torch.Tensor:
    """Every logit of ``toks`` through the engine session every evaluation uses: the first ``prompt`` tokens in chunks
    (scored, then replayed if the cache asks: KVzip), the prompt boundary, then the rest decoded one token a step.
    ``short`` (B,): each row's prompt is that many tokens shorter, right-padded (``PAD_POSITION``), and its decode
    continues from its own end, as the engine batches prompts of different lengths."""
    short = torch.zeros(toks.shape[0], dtype=torch.long) if short is None else short
    session = Session(model, cache, chunk=chunk).start(toks.shape[0])
    head = toks[:, :prompt]
    pos = positions_like(head)
    pos = torch.where(pos < prompt - short[:, None], pos, PAD_POSITION)
    out = [session.score(head, pos=pos)]
    session.replay(head, pos, chunk)
    cache.end_prompt()
    out += [session.step(toks[:, t], t - short)[:, None] for t in range(prompt, toks.shape[1])]
    return torch.cat(out, 1)


# -- the invariants ------------------------------------------------------------------------------------------------
def declared_refusal(cache: ComposedCache) -> str | None:
    """What the axes declare this combination cannot do (checked after ``reset``: a layout's views are built then):
    a policy keeping uneven heads over a store that cannot pad heads, or rewriting values a store cannot write."""
    policy = cache.policy
    if not isinstance(policy, EvictionPolicy):
        return None
    if policy.uneven_heads and not all(v.pads_heads for v in cache.stores()):
        return "different number of tokens per KV head"
    if policy.rewrites_values and not all(v.values_writable for v in cache.stores()):
        return "rewrite values"
    return None


def check_refusal(error: ValueError, axes: Axes) -> str:
    """A refusal names the setting it is about (``layout=...``, ``policy.per_head``, ``storage.per_head``...)."""
    assert re.search(r"(storage|policy|layout)[.=]", str(error)), f"{axes}: refusal names no setting: {error}"
    return f"refused: {error}"


def refusal(axes: Axes, model: Transformer, calibration_dir=None) -> tuple[str, str] | None:
    """What the axes declare impossible, as (where, words the error must hold): the layout's ``check_storage``
    ("layout", before weights load); a policy keeping uneven heads (or ``per_head``) over a storage without ragged
    heads, or rewriting values a storage cannot write ("setup"); the same over a layout's views ("eviction")."""
    spec = model.config.spec()
    storage, policy, layout = (axes.make(a) for a in AXES)
    try:
        layout.check(spec)
        layout.check_storage(storage)
    except ValueError as e:
        return "layout", str(e)
    if isinstance(policy, EvictionPolicy):
        if (policy.per_head or policy.uneven_heads) and spec.num_kv_heads > 1 and not storage.ragged_heads:
            return "setup", "KV head"
        if policy.rewrites_values and not storage.values_writable:
            return "setup", "values"
    cache = build(model, axes, calibration_dir)
    cache.reset(2)
    why = declared_refusal(cache)
    return None if why is None else ("eviction", why)


def check_combination(axes: Axes, model: Transformer | None = None, calibration_dir=None) -> str:
    """The invariants of one combination; returns "ran" or "refused: <why>" (a refusal the axes declare, raised
    as a ValueError that names the setting, before weights load, at setup or at the first eviction)."""
    model = model or tiny_model()
    storage, policy = axes.make("storage"), axes.make("policy")
    refused = refusal(axes, model, calibration_dir)
    if refused is not None:
        where, words = refused
        try:
            if where == "layout":
                raise ValueError(words)
            drive(model, build(model, axes, calibration_dir), tokens(0))
        except ValueError as e:
            assert words in str(e), f"{axes}: refused for another reason than declared ({words}): {e}"
            return check_refusal(e, axes)
        raise AssertionError(f"{axes}: the axes declare this combination impossible ({words}) but it ran")
    cache = build(model, axes, calibration_dir)
    toks = tokens(0)
    out = drive(model, cache, toks)
    assert torch.isfinite(out).all(), f"{axes}: non-finite logits"
    # exact accounting: real tensors, and no saving faked with views of a larger buffer
    held = cache.kv_bytes()
    assert held == sum(t.nbytes for t in cache.tensors()), f"{axes}: kv_bytes is not the tensors' bytes"
    assert 0 < held <= cache.kv_bytes_allocated(), f"{axes}: kv_bytes above the allocation"
    check_positions(cache, toks.shape[1], axes)
    check_rows_independent(model, axes, out, calibration_dir, storage, policy)
    for a in AXES:
        if type(axes.make(a)) is not IDENTITY[a]:
            check_saves(model, axes, a, cache, toks, calibration_dir)
    return "ran"


def check_positions(cache: ComposedCache, length: int, axes: Axes) -> None:
    """Positions are never renumbered: every held position was appended, none twice in a row (or head)."""
    for view in cache.stores():
        pos = view.positions()
        pos = pos[:, None] if pos.dim() == 2 else pos
        for row in pos.flatten(0, 1).tolist():
            real = [p for p in row if p < PAD_POSITION]
            assert len(real) == len(set(real)) and all(0 <= p < length for p in real), \
                f"{axes}: positions renumbered or repeated: {real}"


def check_rows_independent(model, axes: Axes, out, calibration_dir, storage, policy) -> None:
    """Row 0's logits do not depend on row 1, even when row 1 is other tokens and a shorter prompt (padded: the
    rows then hold different counts). A policy keeping uneven heads pads every head to the batch's fullest
    head: the slot count is shared by the rows, so a storage that quantizes groups of tokens, or rounds differently
    at another matmul shape, sees the other row; exact independence is asserted for dense storage there."""
    if isinstance(policy, EvictionPolicy) and policy.uneven_heads and type(storage) is not DenseStore:
        return
    other = tokens(0)
    other[1] = tokens(1)[1]
    again = drive(model, build(model, axes, calibration_dir), other, short=torch.tensor([0, 5]))
    torch.testing.assert_close(again[0], out[0], rtol=0, atol=1e-5, msg=lambda m: f"{axes}: rows interact: {m}")


def check_saves(model, axes: Axes, axis: str, cache: ComposedCache, toks, calibration_dir) -> None:
    """A real setting on ``axis`` holds fewer bytes and allocates fewer than that axis's identity (a layout sharing
    a calibration across layers, xKV, holds the same per-token bytes with a smaller calibration)."""
    plain_axes = axes.replace(**{axis: None})
    try:
        plain = build(model, plain_axes, calibration_dir)
    except ValueError:
        return  # the identity there is refused (a layout needing a storage that calibrates): nothing to compare
    drive(model, plain, toks)
    held, base = cache.kv_bytes(), plain.kv_bytes()
    if held == base and cache.calibration_bytes() < plain.calibration_bytes():
        return
    assert held < base, f"{axes}: {axis} saves nothing ({held} bytes against {base})"
    assert cache.kv_bytes_allocated() < plain.kv_bytes_allocated(), f"{axes}: {axis} frees no allocation"


def check_policy_identity(axes: Axes, model: Transformer | None = None, calibration_dir=None) -> None:
    """A budget no store reaches is no policy, bit for bit and with no eviction; with dense storage, a budget above
    this text but below the model's length keeps scores (attention weights computed beside the output, never
    instead of it) and still equals no policy bit for bit."""
    model = model or tiny_model()
    toks = tokens(2)
    ref = drive(model, build(model, axes.replace(policy=None), calibration_dir), toks)
    budgets = [10_000] + ([100] if type(axes.make("storage")) is DenseStore else [])
    for budget in budgets:
        cache = build(model, axes, calibration_dir, policy={"budget": budget})
        out = drive(model, cache, toks)
        assert cache.policy.evictions == 0, f"{axes}: budget {budget} evicted"
        assert torch.equal(out, ref), f"{axes}: budget {budget} is not the identity: " \
                                      f"{float((out - ref).abs().max()):.3g} max logit difference"


def check_static_form(axes: Axes, model: Transformer | None = None, calibration_dir=None, capacity: int = LENGTH
                      ) -> bool:
    """The captured (static-capacity) form, where the combination has one, gives the eager cache's logits over a
    chunked prefill and decode. A storage's own form (no eviction) equals them bit for bit: untraced, the written
    slots are attended with the eager arithmetic. Under eviction the survivors sit in other slots, so attention
    sums in another order and codes can round the other way on that fp noise: within 1e-3 (one fp8 e4m3 code step
    is 1/16 of its value; a user's fp8 store + H2O moved one logit by 1.2e-4). A policy declaring ``captured``
    has one over every storage whose captured form is slot-addressable (a codec in fixed slots) under the identity
    layout (``when=decode``, no ``per_head``, ``rerotate`` or query statistics). No token repeats in a
    row: a repeated token ties with itself on key scores, and eager ``topk`` and the captured form's stable sort may
    keep different copies (both right). Returns whether there was one."""
    model = model or tiny_model()
    cache = build(model, axes, calibration_dir)
    static = cache.static_form(capacity)
    policy = cache.policy
    if isinstance(policy, EvictionPolicy) and policy.captured and slot_addressable(cache.storage.static_form(1)) \
            and type(cache.layout) is Layout and policy.when == "decode" \
            and not (policy.per_head or policy.rerotate or policy.wants_queries):
        assert static is not None, f"{axes}: the policy declares captured but has no captured form"
    if static is None:
        return False
    static.setup(model.config.spec())
    g = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    toks = torch.stack([torch.randperm(vocab, generator=g)[:LENGTH] for _ in range(2)])
    captured, eager = drive(model, static, toks), drive(model, cache, toks)
    if not isinstance(static, StaticEvictionCache):
        assert torch.equal(captured, eager), f"{axes}: captured form is not eager bit for bit: " \
                                             f"{float((captured - eager).abs().max()):.3g} max logit difference"
    torch.testing.assert_close(captured, eager, rtol=1e-3, atol=1e-3,
                               msg=lambda m: f"{axes}: captured form differs from eager: {m}")
    return True


def check_method(storage: Any = None, policy: Any = None, layout: Any = None, model: Transformer | None = None
                 ) -> dict[str, str]:
    """Every check, for the given axes over the identity of the others, then with each other axis's built-in
    ``COMPANIONS`` setting in turn; returns each combination's outcome ("ran", "ran, captured" or "refused: ...")."""
    given = {"storage": storage, "policy": policy, "layout": layout}
    if all(v is None for v in given.values()):
        raise ValueError("check_method needs at least one of storage=, policy=, layout=")
    model = model or tiny_model()
    others = [a for a in AXES if given[a] is None]
    combos = [Axes(**given)] + [Axes(**{**given, a: COMPANIONS[a]}) for a in others]  # one real companion at a time
    outcomes = {}
    with tempfile.TemporaryDirectory() as calibration_dir:
        for axes in combos:
            outcome = check_combination(axes, model, calibration_dir)
            if outcome == "ran":
                if isinstance(axes.make("policy"), EvictionPolicy):
                    check_policy_identity(axes, model, calibration_dir)
                if check_static_form(axes, model, calibration_dir):
                    outcome += ", captured"
            outcomes[repr(axes)] = outcome
    return outcomes
