"""Model hyper-parameters for the Llama family, read from a HF config.json or GGUF metadata."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvcompress.cache.base import ModelSpec

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int = 2048
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections
    output_bias: bool = False  # o projection (Llama's attention_bias covers it; Qwen2's doesn't)
    mlp_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    name: str = "model"
    arch: str = "llama"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_hf(cls, cfg: dict, name: str = "model") -> ModelConfig:
        arch = cfg.get("model_type", "?")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r} ({cfg.get('architectures')}); "
                f"kvcompress runs the Llama family: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; only 'silu' (SwiGLU)")
        heads = cfg["num_attention_heads"]
        rope_params = cfg.get("rope_parameters") or {}
        scaled = rope_params.get("rope_type", "default") != "default"
        scaling = cfg.get("rope_scaling") or (rope_params if scaled else None)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position=cfg.get("max_position_embeddings", 2048),
            rms_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta") or rope_params.get("rope_theta", 10000.0),
            rope_scaling=dict(scaling) if scaling else None,
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=arch == "qwen2" or cfg.get("attention_bias", False),
            output_bias=arch in ("llama", "mistral") and cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            qk_norm=arch == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            name=name,
            arch=arch,
        )

    def spec(self) -> ModelSpec:
        return ModelSpec(
            name=self.name,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position=self.max_position,
        )
