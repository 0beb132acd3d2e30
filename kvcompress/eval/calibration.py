"""Calibration data for strategies that need it (low-rank projections, layer similarity).

Implements ``kvcompress.cache.base.CalibrationContext``: the cache sees tensors and an NLL
oracle, never the engine.
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kvcompress.cache import FullCache
from kvcompress.cache.base import KVCache
from kvcompress.engine.generate import forward_chunks
from kvcompress.engine.model import Transformer
from kvcompress.eval.data import load_text
from kvcompress.eval.ppl import text_windows, window_nll

SAMPLES_PER_TENSOR = 4096


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap hash of the weights: every tensor's name, shape, dtype, sum and a strided sample of its bytes.

    Two checkpoints of one architecture (or one checkpoint in two dtypes) get different fingerprints.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        sample = flat[::step].contiguous().cpu()
        total = float(flat.sum(dtype=torch.float64)) if flat.is_floating_point() else int(flat.sum())
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{total!r}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def safe_name(text: str) -> str:
    """A file-name-safe short form of a model or dataset name (a dataset may be a path)."""
    stem = Path(str(text)).stem if ("/" in str(text) or "\\" in str(text)) else str(text)
    return re.sub(r"[^\w.+-]", "_", stem)[:40] or "x"


class _Recorder(FullCache):
    """A full cache that also keeps every layer's pre-RoPE keys and values."""

    def reset(self, batch_size: int) -> None:
        super().reset(batch_size)
        self.samples: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(self.spec.num_layers)]

    def append(self, layer, k, v, pos, rope):
        self.samples[layer].append((k.clone(), v.clone(), pos.clone()))
        super().append(layer, k, v, pos, rope)


class Calibration:
    """``tokens`` tokens of ``dataset`` in windows of ``window``, disjoint from evaluation text by choice
    of dataset (default TinyStories while evaluation defaults to WikiText-2)."""

    def __init__(self, model: Transformer, tokenizer, data_dir: Path, dataset: str = "tinystories",
                 tokens: int = 4096, window: int = 512, cache_dir: str | Path = "~/.cache/kvcompress/calibration",
                 chunk: int = 64, progress: bool = True):
        self.model, self.tokenizer, self.chunk, self.progress = model, tokenizer, chunk, progress
        self.rope = model.rope  # lets a cache calibrate on post-RoPE keys (lowrank keys=post_rope)
        n = max(1, math.ceil(tokens / window))
        try:
            self.windows = text_windows(tokenizer, load_text(dataset, data_dir), window, n).to(model.device)
        except ValueError as e:  # a too-short text names the setting, not only the token count
            raise ValueError(f"calibration.dataset={dataset!r} (calibration.window={window}): {e}") from e
        self.cache_dir = str(Path(cache_dir).expanduser())
        h = hashlib.sha256(weights_fingerprint(model).encode())
        h.update(self.windows.cpu().numpy().tobytes())
        h.update(f"chunk={chunk}".encode())
        # saved calibrations (projections, layer similarity) are keyed by the weights, the text and the settings
        self.key = f"{safe_name(model.config.name)}-{safe_name(dataset)}-{self.windows.numel()}tok-{h.hexdigest()[:16]}"
        self._samples: list[tuple[Tensor, Tensor, Tensor]] | None = None

    @torch.inference_mode()
    def kv_samples(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per layer: pre-RoPE keys and values (1, Hkv, N, D) and positions (1, N), all windows joined."""
        if self._samples is None:
            rec = _Recorder()
            rec.setup(self.model.config.spec())
            per_layer = [[] for _ in range(self.model.config.num_layers)]
            for w in tqdm(self.windows.split(1), desc="calibration kv samples", disable=not self.progress,
                          leave=False):
                rec.reset(1)
                forward_chunks(self.model, w, rec)
                for layer, parts in enumerate(rec.samples):
                    per_layer[layer].extend(parts)
            self._samples = [
                (torch.cat([k for k, _, _ in parts], 2), torch.cat([v for _, v, _ in parts], 2),
                 torch.cat([p for _, _, p in parts], 1))
                for parts in per_layer
            ]
        return self._samples

    def retrieval_nll(self, cache: KVCache) -> float:
        """Mean NLL of recalling random spans planted in the calibration windows (synthetic passkey prompts)."""
        from kvcompress.eval.retrieval_probe import retrieval_nll

        return retrieval_nll(self.model, self.windows, cache, self.chunk)

    def nll(self, cache: KVCache) -> float:
        """Mean next-token NLL of the calibration windows with ``cache`` in the loop."""
        total, count = 0.0, 0
        for w in tqdm(self.windows.split(4), desc="calibration nll", disable=not self.progress, leave=False):
            s, n, _ = window_nll(self.model, w, cache, self.chunk)
            total, count = total + s, count + n
        return total / count
