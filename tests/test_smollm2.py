"""Integration on the default model: full-cache perplexity equals transformers' on the same windows."""
import math
import os

import pytest
import torch

from kvcompress.cache import FullCache
from kvcompress.engine.loaders import ensure_asset, load
from kvcompress.eval.base import EvalContext
from kvcompress.eval.data import default_data_dir, load_text
from kvcompress.eval.ppl import Perplexity, text_windows


@pytest.fixture(scope="module")
def gguf():
    try:
        return ensure_asset("smollm2-135m", os.environ.get("KVC_MODELS_DIR", "~/.cache/kvcompress/models"))
    except Exception as e:  # no network and no local copy
        pytest.skip(f"SmolLM2 asset unavailable: {e}")


@pytest.mark.slow
def test_wikitext_ppl_equals_transformers(gguf):
    from transformers import AutoModelForCausalLM

    model, tok = load(gguf, "smollm2-135m")
    cache = FullCache()
    cache.setup(model.config.spec())
    ours = Perplexity("wikitext2", window=512, max_windows=2, chunk=128, batch_size=2).run(
        EvalContext(model, tok, cache, default_data_dir(), progress=False))

    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    windows = text_windows(tok, load_text("wikitext2", default_data_dir()), 512, 2)
    with torch.inference_mode():
        loss = hf(windows, labels=windows).loss  # mean over the 2 x 511 predicted tokens
    assert ours["n_tokens"] == 2 * 511
    assert math.isclose(ours["ppl"], math.exp(float(loss)), rel_tol=1e-3)
    assert 5 < ours["ppl"] < 60
