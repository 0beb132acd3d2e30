"""Shared fixtures: tiny random Llama models (native + transformers reference) and the stories260K model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvcompress.cache import ModelSpec
from kvcompress.engine.config import ModelConfig
from kvcompress.engine.loaders import _to_native, load_tokenizer, load_weights, read_config
from kvcompress.engine.model import Transformer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K" / "hf"

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
        pytest.skip(f"{STORIES} not found")
    return load_weights(STORIES, read_config(STORIES, "stories260k")), load_tokenizer(STORIES)


@pytest.fixture(scope="session")
def story_tokens(stories):
    text = (SHARED / "data" / "tinystories" / "TinyStoriesV2-GPT4-valid.first100.txt").read_text()
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
    from kvcompress.cache import ComposedCache

    cache = ComposedCache(storage, policy, layout)
    cache.setup(model if isinstance(model, ModelSpec) else spec_of(model))
    cache.reset(batch)
    return cache
