"""Why per-token int4 keys break on the Qwen2.5 models: their key projections carry large biases in a few channels.

    .venv/bin/python results/transfer/key_bias.py

Reads each Qwen GGUF's ``blk.N.attn_k.bias`` (f32 in the file) and prints the largest |bias| over every layer and
channel, the median over layers of each layer's largest, and the median |bias|. storage=int4 codes each token's
keys in groups of 64 channels with the step (max - min) / (2^4 - 1), so one channel near the largest bias sets a
step that rounds the group's ordinary channels (|k| of order 1) to one level; per-channel key codes (KIVI, KVQuant)
give that channel its own range.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader

MODELS = Path("~/.cache/kvcompress/models").expanduser()  # where the presets put the files (README: Models)

for path in sorted(MODELS.glob("qwen*.gguf")):
    per_layer = [np.abs(np.asarray(t.data, dtype=np.float32)) for t in GGUFReader(path).tensors
                 if t.name.endswith("attn_k.bias")]
    if not per_layer:
        continue
    top = [float(a.max()) for a in per_layer]
    print(f"{path.name}: {len(per_layer)} layers; max |k bias| {max(top):.1f} (layer {int(np.argmax(top))}), "
          f"median over layers of the layer's max {np.median(top):.1f}, median |k bias| "
          f"{float(np.median(np.concatenate(per_layer))):.2f}")
