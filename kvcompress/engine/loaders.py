"""Load weights into the native engine: a local HF folder, a GGUF file, an embedded asset, or the Hub.

A source type per kind of files (``source_for``): a HF checkpoint folder, a GGUF file, or the fp32 copy of a GGUF
file made on its first load (later loads read it in ~1 s instead of dequantising again). ``read_config`` reads
only the hyper-parameters, so bad settings are refused before weights load. Weights stream one tensor at a time
into the model's dtype: a load never holds two full copies of the weights.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from kvcompress.engine.assets import ASSETS, MODELS_DIR, ensure_asset, sha256
from kvcompress.engine.config import ModelConfig
from kvcompress.engine.gguf_file import chat_template, gguf_config, gguf_reader, gguf_tensors
from kvcompress.engine.model import Transformer

__all__ = ["DTYPES", "ensure_asset", "gguf_reader", "load", "load_tokenizer", "load_weights", "read_config",
           "resolve_source", "source_for"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_source(source: str, models_dir: str | Path = MODELS_DIR) -> Path:
    """A local folder or .gguf file for ``source``: an asset name, a path, or a Hub id (online)."""
    if source in ASSETS:
        return ensure_asset(source, models_dir)
    path = Path(source).expanduser()
    if path.exists():
        return path
    if source.startswith((".", "/", "~")) or source.endswith(".gguf"):
        raise FileNotFoundError(f"model path {source!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as e:  # offline, unknown repo, ...
        raise RuntimeError(
            f"could not fetch {source!r} from the Hugging Face Hub ({type(e).__name__}). "
            "Offline, pass a local path: a HF checkpoint folder or a .gguf file."
        ) from e


# A GGUF file is parsed and dequantised once; later loads read this fp32 copy beside it (~1 s, not ~13 s).
# The copy records what it was made from (size, mtime, sha256 of the .gguf): a changed .gguf is converted again.
SOURCE_FILE = "source.json"


def _converted_dir(path: Path) -> Path:
    return path.with_suffix(".kvc")


def source_stamp(path: Path, sha: str | None = None) -> dict:
    st = path.stat()
    return {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha or sha256(path)}


def conversion_is_fresh(path: Path, conv: Path) -> bool:
    """The conversion ``conv`` was made from the current ``path``: same size and mtime, or (after a copy or a
    touch) the same sha256, in which case the stamp is refreshed."""
    try:
        made = json.loads((conv / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False  # no stamp (an older kvcompress): unknown source, convert again
    st = path.stat()
    if made.get("size") == st.st_size and made.get("mtime_ns") == st.st_mtime_ns:
        return True
    if made.get("size") != st.st_size or made.get("sha256") != sha256(path):
        return False
    (conv / SOURCE_FILE).write_text(json.dumps(source_stamp(path, made["sha256"])))
    return True


def _converted(path: Path) -> Path:
    """The fp32 copy of a .gguf; a stale one (the .gguf changed since) is removed, with a message."""
    conv = _converted_dir(path)
    if conv.exists() and not conversion_is_fresh(path, conv):
        print(f"[kvcompress] {path} changed since {conv} was made from it; converting it again", file=sys.stderr)
        trash = Path(tempfile.mkdtemp(dir=conv.parent, prefix=".kvc-stale-"))
        try:
            os.rename(conv, trash / conv.name)
        except OSError:  # another process removed it first
            pass
        shutil.rmtree(trash, ignore_errors=True)
    return conv


def write_safetensors(file: Path, tensors: dict[str, Tensor]) -> None:
    """A safetensors file written one tensor at a time (``safetensors.torch.save_file`` first serialises every
    tensor to bytes: a second full copy of the weights in memory)."""
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    header, offset = {}, 0
    for k, v in tensors.items():
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + v.nbytes]}
        offset += v.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for v in tensors.values():
            f.write(memoryview(v.detach().contiguous().cpu().view(torch.uint8).flatten().numpy()))


def _save_converted(path: Path, model: Transformer, tokenizer) -> None:
    target = _converted(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".kvc-"))
    sd = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and model.config.tie_embeddings)}
    write_safetensors(tmp / "model.safetensors", sd)
    (tmp / "kvc_config.json").write_text(json.dumps(dataclasses.asdict(model.config)))
    tokenizer.save_pretrained(tmp / "tokenizer")
    (tmp / SOURCE_FILE).write_text(json.dumps(source_stamp(path)))
    try:
        os.rename(tmp, target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)


# -- HF names -> the engine's fused layout, streamed ------------------------------------------------------------
def native_parts(c: ModelConfig) -> dict[str, list[str]]:
    """Per engine parameter, the HF parameters it is made of (concatenated in this order)."""
    parts = {"embed.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not c.tie_embeddings:
        parts["lm_head.weight"] = ["lm_head.weight"]
    norms = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    if c.post_norms:  # Gemma 3: post_attention_layernorm is the norm after attention
        norms = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                 "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"}
    for i in range(c.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        parts[q + "attn.wqkv.weight"] = [f"{p}self_attn.{n}_proj.weight" for n in "qkv"]
        if c.attention_bias:
            parts[q + "attn.wqkv.bias"] = [f"{p}self_attn.{n}_proj.bias" for n in "qkv"]
        parts[q + "attn.wo.weight"] = [f"{p}self_attn.o_proj.weight"]
        if c.output_bias:
            parts[q + "attn.wo.bias"] = [f"{p}self_attn.o_proj.bias"]
        if c.qk_norm:
            parts[q + "attn.q_norm.weight"] = [f"{p}self_attn.q_norm.weight"]
            parts[q + "attn.k_norm.weight"] = [f"{p}self_attn.k_norm.weight"]
        for kind in ("weight", "bias") if c.mlp_bias else ("weight",):
            parts[f"{q}mlp.w13.{kind}"] = [f"{p}mlp.gate_proj.{kind}", f"{p}mlp.up_proj.{kind}"]
            parts[f"{q}mlp.w2.{kind}"] = [f"{p}mlp.down_proj.{kind}"]
        for native, hf in norms.items():
            parts[f"{q}{native}.weight"] = [f"{p}{hf}.weight"]
    return parts


def stream_native(tensors: Iterator[tuple[str, Tensor]], c: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """Engine parameters from HF-named tensors, each emitted as soon as its parts arrived (a fused q/k/v waits
    for its three parts only), so at most one layer's parts wait at a time. HF tensors the engine does not use
    (rotary buffers, a tied lm_head) are skipped; a missing one is an error naming it."""
    parts = native_parts(c)
    wanted = {hf: native for native, hfs in parts.items() for hf in hfs}
    pending: dict[str, Tensor] = {}
    for name, t in tensors:
        native = wanted.get(name)
        if native is None:
            continue
        pending[name] = t
        if all(hf in pending for hf in parts[native]):
            ready = [pending.pop(hf) for hf in parts[native]]
            yield native, ready[0] if len(ready) == 1 else torch.cat(ready)
            del parts[native]
    if parts:
        missing = sorted(hf for hfs in parts.values() for hf in hfs if hf not in pending)
        raise ValueError(f"checkpoint lacks {len(missing)} tensors the {c.arch} model needs: {', '.join(missing[:6])}")


def _to_native(sd: dict[str, Tensor], c: ModelConfig) -> dict[str, Tensor]:
    """A whole HF state dict in the engine's layout (tests build models from transformers' this way)."""
    out = dict(stream_native(iter(sd.items()), c))
    if c.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


# -- sources: where a model's config, tensors and tokenizer come from --------------------------------------------
class Source:
    """A model's files: ``config(name)``, ``native_tensors(config)``, ``tokenizer()``; ``loaded`` runs after a
    complete load (a GGUF file writes its fp32 copy there)."""

    def __init__(self, path: Path):
        self.path = path

    def loaded(self, model: Transformer, tokenizer, dtype: torch.dtype) -> None:
        """Nothing to keep, except for a GGUF file."""


class HFFolder(Source):
    def config(self, name: str) -> ModelConfig:
        cfg_file = self.path / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{self.path} has no config.json: not a Hugging Face checkpoint folder")
        return ModelConfig.from_hf(json.loads(cfg_file.read_text()), name)

    def native_tensors(self, c: ModelConfig) -> Iterator[tuple[str, Tensor]]:
        return stream_native(self._tensors(), c)

    def _tensors(self) -> Iterator[tuple[str, Tensor]]:
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            from safetensors import safe_open

            for f in files:
                with safe_open(f, "pt") as st:
                    for k in st.keys():
                        yield k, st.get_tensor(k)
            return
        bins = sorted(self.path.glob("pytorch_model*.bin"))
        if not bins:
            raise FileNotFoundError(f"{self.path} has no *.safetensors or pytorch_model*.bin weights")
        for f in bins:
            yield from torch.load(f, map_location="cpu", weights_only=True, mmap=True).items()

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path))


class GGUFFile(Source):
    """A .gguf file, parsed and dequantised; the first fp32 load writes the copy later loads read
    (``ConvertedGGUF``)."""

    def loaded(self, model: Transformer, tokenizer, dtype: torch.dtype) -> None:
        if dtype == torch.float32:
            _save_converted(self.path, model, tokenizer)

    def config(self, name: str) -> ModelConfig:
        return gguf_config(self.path, name)

    def native_tensors(self, c: ModelConfig) -> Iterator[tuple[str, Tensor]]:
        return stream_native(gguf_tensors(self.path, c), c)

    def tokenizer(self):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        template = chat_template(self.path)
        if template and not getattr(tok, "chat_template", None):
            tok.chat_template = template
        return tok


class ConvertedGGUF(Source):
    """The fp32 copy of a GGUF file, beside it (``<name>.kvc/``), stamped with what it was made from."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.folder = _converted_dir(path)

    def config(self, name: str) -> ModelConfig:
        return ModelConfig(**{**json.loads((self.folder / "kvc_config.json").read_text()), "name": name})

    def native_tensors(self, c: ModelConfig) -> Iterator[tuple[str, Tensor]]:
        from safetensors import safe_open

        with safe_open(self.folder / "model.safetensors", "pt") as st:
            for k in st.keys():
                yield k, st.get_tensor(k)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.folder / "tokenizer"))


def source_for(path: Path) -> Source:
    """The one place a path's kind is decided: a .gguf file (its fp32 copy when a fresh one exists), else a folder."""
    if path.suffix != ".gguf":
        return HFFolder(path)
    return ConvertedGGUF(path) if (_converted(path) / "kvc_config.json").exists() else GGUFFile(path)


def read_config(path: Path, name: str = "model") -> ModelConfig:
    return source_for(path).config(name)


def load_weights(path: Path, c: ModelConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Transformer:
    """The model for config ``c`` (not modified) with the weights at ``path``, each tensor cast as it arrives."""
    with torch.device("meta"):
        model = Transformer(c)
    native = {k: v.to(device=device, dtype=dtype) for k, v in source_for(path).native_tensors(c)}
    if c.tie_embeddings:
        native.pop("lm_head.weight", None)
    model.load_state_dict(native, strict=not c.tie_embeddings, assign=True)
    model.tie_weights()
    return model.eval()


def load(path: Path, name: str = "model", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Model and tokenizer; the first load of a GGUF file also writes its fast fp32 copy."""
    source = source_for(path)
    model = load_weights(path, source.config(name), device, dtype)
    tokenizer = load_tokenizer(path)
    source.loaded(model, tokenizer, dtype)
    return model, tokenizer


def load_tokenizer(path: Path):
    tok = source_for(path).tokenizer()
    tok.model_max_length = 1 << 30  # we window texts ourselves; silence the length warning
    return tok


if __name__ == "__main__":  # python -m kvcompress.engine.loaders smollm2-135m  -> fetch and print its path
    print(ensure_asset(sys.argv[1], os.environ.get("KVC_MODELS_DIR", MODELS_DIR)))
