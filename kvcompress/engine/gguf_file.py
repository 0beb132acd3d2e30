"""GGUF files of the llama, qwen2 and gemma3 architectures: hyper-parameters from the metadata, and the tensors
dequantised one at a time under their Hugging Face names (``gguf.quants.dequantize``: K-quants, Q4/Q5/Q8, F16...).

llama.cpp's converter interleaves llama's q/k rows (undone here) and stores Gemma's norm weights as 1 + w
(transformers subtracts the 1 again, and so do we, so both add it back the same way).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from kvcompress.engine.config import ModelConfig

GGUF_ARCHITECTURES = ("llama", "qwen2", "gemma3")
GEMMA_SLIDING_PATTERN = 6  # transformers' default when a GGUF file states none: every 6th layer is global
GEMMA_QUERY_PRE_ATTN_SCALAR = 256  # transformers' Gemma3TextConfig default (GGUF does not store it)

GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
GEMMA_LAYER_NAMES = {**LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm",
                     "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}


def gguf_reader(path: Path):
    """A ``GGUFReader``; a truncated or corrupt file is a ValueError naming it and saying what to do."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # numpy reshape / struct / memmap errors name no file
        raise ValueError(f"GGUF file {path} is truncated or corrupt ({type(e).__name__}: {e}); delete it and download "
                         "it again (an embedded model is fetched again on the next run)") from e


def metadata(reader) -> dict:
    """Every field but the vocabulary tables (large, and read by the tokenizer loader instead)."""
    skip = ("tokenizer.ggml.token", "tokenizer.ggml.merges", "tokenizer.ggml.scores")
    return {k: v.contents() for k, v in reader.fields.items() if not k.startswith(skip)}


def gguf_config(path: Path, name: str) -> ModelConfig:
    reader = gguf_reader(path)
    f = metadata(reader)
    arch = f["general.architecture"]
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; kvcompress reads {', '.join(GGUF_ARCHITECTURES)}")
    a = lambda key, default=None: f.get(f"{arch}.{key}", default)  # noqa: E731
    heads, hidden, layers = a("attention.head_count"), a("embedding_length"), a("block_count")
    gemma = arch == "gemma3"
    window = a("attention.sliding_window") if gemma else None
    tensors = {t.name for t in reader.tensors}
    return ModelConfig(
        vocab_size=a("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].contents()),
        hidden_size=hidden,
        intermediate_size=a("feed_forward_length"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=a("attention.head_count_kv", heads),
        head_dim=a("attention.key_length") or a("rope.dimension_count") or hidden // heads,
        max_position=a("context_length", 2048),
        rms_eps=a("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=a("rope.freq_base", 10000.0),
        tie_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        hidden_act="gelu_pytorch_tanh" if gemma else "silu",
        norm_offset=1.0 if gemma else 0.0,
        post_norms=gemma,
        embed_scale=hidden**0.5 if gemma else None,
        query_scale=GEMMA_QUERY_PRE_ATTN_SCALAR**-0.5 if gemma else None,
        final_softcap=a("final_logit_softcapping"),
        layer_windows=[window if (i + 1) % GEMMA_SLIDING_PATTERN else None for i in range(layers)] if window else None,
        local_rope_theta=a("rope.freq_base_swa", 10000.0) if gemma else None,
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
        name=name,
        arch={"gemma3": "gemma3_text"}.get(arch, arch),
    )


def _unpermute(w: Tensor, heads: int) -> Tensor:
    """Undo llama.cpp's q/k row interleaving (llama GGUF) to get the rotate-half layout."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(path: Path, c: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """(HF name, fp32 tensor) one at a time, dequantised from the file's memory map (never all at once)."""
    from gguf.quants import dequantize

    gemma = c.arch == "gemma3_text"
    per_layer = GEMMA_LAYER_NAMES if gemma else LAYER_NAMES
    for t in gguf_reader(path).tensors:
        try:
            array = dequantize(t.data, t.tensor_type)
            w = torch.from_numpy(array if array.flags.writeable else array.copy())
        except Exception as e:
            raise ValueError(f"GGUF file {path}: tensor {t.name} is unreadable ({type(e).__name__}: {e}); the file "
                             "is truncated or corrupt: delete it and download it again") from e
        base, kind = t.name.rsplit(".", 1)
        if gemma and base.endswith("norm"):
            w = w - 1.0
        if base.startswith("blk."):
            _, i, part = base.split(".", 2)
            if part not in per_layer:
                raise ValueError(f"GGUF file {path}: unknown tensor {t.name} for architecture {c.arch}")
            if c.arch == "llama" and part in ("attn_q", "attn_k"):
                w = _unpermute(w, c.num_heads if part == "attn_q" else c.num_kv_heads)
            yield f"model.layers.{i}.{per_layer[part]}.{kind}", w
        elif base in GLOBAL_NAMES:
            yield f"{GLOBAL_NAMES[base]}.{kind}", w


def chat_template(path: Path) -> str | None:
    field = gguf_reader(path).fields.get("tokenizer.chat_template")
    return field.contents() if field is not None else None
