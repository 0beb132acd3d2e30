"""Shared fixtures: tiny random Llama models (native + transformers reference) and the stories260K model.

Tests that read ``../shared`` (the stories260K checkpoint, the texts under ``shared/data``) skip with a reason
when it is absent (``KVC_SHARED_DIR`` points elsewhere): use the ``shared`` / ``stories`` fixtures or
``needs_shared``; a test that still trips over a missing shared file is turned into a skip by the hooks below.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvcompress.cache import ComposedCache, ModelSpec
from kvcompress.cache.layout.cla import CLA
from kvcompress.cache.layout.minicache import MiniCache
from kvcompress.engine.config import ModelConfig
from kvcompress.engine.generate import forward_chunks, prefill
from kvcompress.engine.loaders import _to_native, load_tokenizer, load_weights, read_config
from kvcompress.engine.model import Transformer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KVC_SHARED_DIR") or REPO.parent / "shared").expanduser()
STORIES = SHARED / "models" / "stories260K" / "hf"
SHARED_REASON = f"needs the shared data and models in {SHARED} (../shared beside the repo, or set KVC_SHARED_DIR)"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=SHARED_REASON)
SHARED_MARKERS = ("stories260k", "STORIES", "SHARED", "default_data_dir", "shared/")


@functools.cache
def _module_uses_shared(path: str) -> bool:
    try:
        text = Path(path).read_text()
    except OSError:
        return False
    return any(m in text for m in SHARED_MARKERS)


def _missing_shared(exc: BaseException, item) -> bool:
    """With the shared folder absent: an error that names a path under it, or any failure of a test whose module
    uses it (a kvc subprocess on stories260K fails with an assertion on its records, which names no path)."""
    if SHARED.is_dir() or isinstance(exc, (pytest.skip.Exception, KeyboardInterrupt)):
        return False
    return str(SHARED) in str(exc) or _module_uses_shared(str(item.path))


def _skip_if_shared_missing(item):
    try:
        return (yield)
    except BaseException as e:
        if _missing_shared(e, item):
            pytest.skip(f"{SHARED_REASON}: {type(e).__name__}: {str(e)[:200]}")
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _skip_if_shared_missing(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _skip_if_shared_missing(item))


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared folder (data/, models/); skips the test when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(SHARED_REASON)
    return SHARED


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model on a shared CPU: one thread is fastest (restored after the module). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = dict(
    model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False, hidden_act="silu",
)


def tiny_pair(seed: int = 0, **overrides) -> tuple[Transformer, torch.nn.Module]:
    """A random tiny model in the engine and the same weights in transformers (fp32, eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**TINY, **overrides}
    torch.manual_seed(seed)
    hf_cfg = AutoConfig.for_model(**cfg)
    hf = AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():  # random norms and biases, so the test also checks they are wired right
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    c = ModelConfig.from_hf(cfg, "tiny")
    with torch.device("meta"):
        model = Transformer(c)
    sd = _to_native(hf.state_dict(), c)
    if c.tie_embeddings:
        sd.pop("lm_head.weight")
    model.load_state_dict(sd, strict=not c.tie_embeddings, assign=True)
    model.tie_weights()
    return model.eval(), hf


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    return tiny_pair(seed, **overrides)[0]


def spec_of(model: Transformer) -> ModelSpec:
    return model.config.spec()


@pytest.fixture(scope="session")
def stories():
    """(model, tokenizer) for the 260K-parameter trained stories model."""
    if not STORIES.exists():
        pytest.skip(f"{STORIES} not found: {SHARED_REASON}")
    return load_weights(STORIES, read_config(STORIES, "stories260k")), load_tokenizer(STORIES)


@pytest.fixture(scope="session")
def story_tokens(stories, shared):
    text = (shared / "data" / "tinystories" / "TinyStoriesV2-GPT4-valid.first100.txt").read_text()
    return torch.tensor([stories[1](text).input_ids[:1024]])


class NoRotary:
    """A rotary embedding that rotates nothing: for driving stores and caches by hand."""

    def rotate(self, x, pos):
        return x

    def cos_sin(self, pos, dtype):
        shape = (*pos.shape, 1)
        return torch.ones(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


def compose(model, storage=None, policy=None, layout=None, batch: int = 1):
    """``ComposedCache(storage, policy, layout)`` (identity on any axis left None), set up for ``model`` (a
    Transformer or a ModelSpec) and reset for ``batch`` rows, e.g.
    ``compose(model, storage=DenseStore(), policy=H2O(budget=8), layout=CLA(group_size=2), batch=2)``."""
    cache = ComposedCache(storage, policy, layout)
    cache.setup(model if isinstance(model, ModelSpec) else spec_of(model))
    cache.reset(batch)
    return cache


def triton_interpreted() -> bool | None:
    """None: no triton; else whether its kernels run in the interpreter in this process (``TRITON_INTERPRET=1``
    takes effect only if set before triton is first imported: the kernel test modules set it at their top)."""
    try:
        import triton.language as tl
    except ImportError:
        return None
    return type(tl.sum).__name__ == "InterpretedFunction"


def static_prefill(model, cache, tokens):
    """Set ``cache`` up for ``model``, reset it to the batch and prefill ``tokens`` (B, T) in one forward."""
    from kvcompress.engine.generate import positions_like

    cache.setup(spec_of(model))
    cache.reset(tokens.shape[0])
    return model(tokens, positions_like(tokens), cache)


def greedy_steps(model, cache, nxt, start: int, n: int, step=None):
    """``n`` single-token steps from token ``nxt`` (B, 1) at position ``start``, each feeding its own argmax;
    ``step(model, tokens, pos, cache)`` runs a step (default: the eager forward). Logits (B, n, V)."""
    out = []
    for i in range(n):
        logits = (step or (lambda m, t, p, c: m(t, p, c)))(model, nxt, torch.full_like(nxt, start + i), cache)
        out.append(logits.clone())
        nxt = logits[:, -1:].argmax(-1)
    return torch.cat(out, 1)


def assert_graph_replay_equals_eager(model, eager, graphed, tokens, n: int = 4) -> None:
    """Prefill ``tokens`` (B, T) into two equal static caches, capture ``graphed``'s decode step as a CUDA graph and
    check ``n`` greedy steps of its replay against ``eager``'s steps."""
    from kvcompress.engine.static import CapturedDecode

    static_prefill(model, eager, tokens)
    nxt = static_prefill(model, graphed, tokens)[:, -1:].argmax(-1)
    step = CapturedDecode(model, graphed, tokens.shape[0])
    assert step.captured
    T = tokens.shape[1]
    got = greedy_steps(model, graphed, nxt, T, n, lambda m, t, p, c: step(t, p))
    torch.testing.assert_close(got, greedy_steps(model, eager, nxt, T, n), atol=1e-5, rtol=1e-5)


def triton_tests_in_a_subprocess(path: str) -> None:
    """Run the ``triton`` tests of the file at ``path`` under ``TRITON_INTERPRET=1`` in a fresh interpreter (for when
    triton was imported before the variable could take effect) and require that none was skipped."""
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, "-k", "triton"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " skipped" not in run.stdout.splitlines()[-1], run.stdout[-1000:]


# -- the kvc app, run as a user runs it (tiny stories260K settings; results and Hydra outputs under ``tmp``) --------
PNG = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file (a written plot)
FAST = ["model=stories260k", "eval.dataset=tinystories", "eval.window=64", "eval.max_windows=2", "progress=false"]


def kvc(tmp: Path, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``kvc <args>`` in a subprocess with its records in ``tmp/results`` and Hydra's folders under ``tmp``."""
    cmd = [sys.executable, "-m", "kvcompress.run", *args, f"results_dir={tmp}/results", f"hydra.run.dir={tmp}/run",
           f"hydra.sweep.dir={tmp}/sweep"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def records(tmp: Path) -> list[dict]:
    """The records ``kvc`` appended under ``tmp/results``."""
    return [json.loads(line) for line in (tmp / "results" / "records.jsonl").read_text().splitlines()]


# -- a tiny GGUF file (test_failures, test_sources) --------------------------------------------------
def write_gguf(path: Path, seed: int) -> None:
    """A tiny random llama GGUF (fp32 tensors, no tokenizer): 2 layers, hidden 16, 2 heads, 1 kv head."""
    import gguf

    g = torch.Generator().manual_seed(seed)
    hidden, layers, heads, kv, ff, vocab = 16, 2, 2, 1, 24, 32
    dim = hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_context_length, 64), (w.add_embedding_length, hidden), (w.add_block_count, layers),
                   (w.add_feed_forward_length, ff), (w.add_head_count, heads), (w.add_head_count_kv, kv),
                   (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, vocab)):
        add(v)
    t = lambda *shape: torch.randn(*shape, generator=g).numpy()
    w.add_tensor("token_embd.weight", t(vocab, hidden))
    w.add_tensor("output_norm.weight", t(hidden))
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv * dim, hidden), "attn_v": (kv * dim, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ff, hidden), "ffn_up": (ff, hidden),
              "ffn_down": (hidden, ff), "attn_norm": (hidden,), "ffn_norm": (hidden,)}
    for i in range(layers):
        for name, shape in shapes.items():
            w.add_tensor(f"blk.{i}.{name}.weight", t(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class NoTokenizer:
    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True)


# -- sharing layouts (test_cla, test_minicache, test_sharing) -----------------------------------------------
def ready(cache, model, batch: int = 1):
    """``cache`` set up for ``model`` (a Transformer) and reset for ``batch`` rows."""
    cache.setup(spec_of(model))
    cache.reset(batch)
    return cache


def cla(storage=None, policy=None, **kw):
    return ComposedCache(storage, policy, CLA(**kw))


def minicache(storage=None, policy=None, **kw):
    return ComposedCache(storage, policy, MiniCache(**kw))


def random_tokens(batch: int = 2, n: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def prompt(n: int, seed: int) -> list[int]:
    return random_tokens(1, n, seed=seed)[0].tolist()


def run_chunks(model, cache, toks, chunk):
    """Logits of ``toks`` fed ``chunk`` tokens at a time with ``cache`` (set up and reset here) in the loop."""
    return forward_chunks(model, toks, ready(cache, model, toks.shape[0]), chunk)


def decode_steps(model, cache, prompts, steps=3):
    """Right-padded prompts prefilled in chunks of 6, then greedy decode: the logits of every step."""
    cache = ready(cache, model, len(prompts))
    logits, pos = prefill(model, prompts, cache, chunk=6)
    out = [logits]
    for _ in range(steps):
        logits = model(logits.argmax(-1)[:, None], pos[:, None], cache)[:, -1]
        out.append(logits)
        pos = pos + 1
    return out
