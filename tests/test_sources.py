"""Where a model's files come from (``engine.loaders.source_for``): the one place a path's kind is decided, and a
GGUF file's fp32 copy written after the first full-precision load only (a tiny GGUF written here)."""
from __future__ import annotations

import torch
from conftest import NoTokenizer, write_gguf

from kvcompress.engine.loaders import ConvertedGGUF, GGUFFile, HFFolder, load_weights, source_for


def test_a_gguf_file_keeps_its_fp32_copy_after_a_full_precision_load(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, 1)
    assert isinstance(source_for(tmp_path), HFFolder)
    source = source_for(path)
    assert isinstance(source, GGUFFile)
    config = source.config("g")
    before = vars(config).copy()
    source.loaded(None, NoTokenizer(), torch.bfloat16)  # a lower precision is never kept
    assert isinstance(source_for(path), GGUFFile) and not (tmp_path / "m.kvc").exists()
    model = load_weights(path, config)
    assert vars(config) == before  # the config given is not modified
    source.loaded(model, NoTokenizer(), torch.float32)
    copy = source_for(path)
    assert isinstance(copy, ConvertedGGUF)
    assert torch.equal(load_weights(path, copy.config("g")).embed.weight, model.embed.weight)
