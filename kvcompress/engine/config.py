"""Model hyper-parameters for the Llama family and Gemma 3, read from a HF config.json or GGUF metadata."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvcompress.cache.base import ModelSpec

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma3_text")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


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
    hidden_act: str = "silu"  # of the gated MLP: SwiGLU, or GELU-tanh (GeGLU, Gemma)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w) in fp32, then casts: Gemma's (1 + w); 0 = Llama's
    post_norms: bool = False  # Gemma 3: norms after attention and after the MLP too (before each residual add)
    embed_scale: float | None = None  # embeddings times this (Gemma: sqrt(hidden_size), in the weights' dtype)
    query_scale: float | None = None  # attention scores times this instead of head_dim ** -0.5 (Gemma)
    final_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    layer_windows: list[int | None] | None = None  # per layer: its sliding window (None: global attention)
    local_rope_theta: float | None = None  # RoPE base of the sliding-window layers when theirs differs (Gemma 3)
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
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r}; supported: {', '.join(ACTIVATIONS)}")
        if cfg.get("attn_logit_softcapping"):
            raise ValueError("attn_logit_softcapping is not supported (attention belongs to the cache, which "
                             "computes plain softmax attention); Gemma 3 has none")
        heads = cfg["num_attention_heads"]
        rope_params = cfg.get("rope_parameters") or {}
        gemma = arch == "gemma3_text"
        if gemma:  # per layer type: {"full_attention": {...}, "sliding_attention": {...}}
            local = rope_params.get("sliding_attention") or {}
            rope_params = rope_params.get("full_attention") or {}
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
            tie_embeddings=cfg.get("tie_word_embeddings", gemma),
            attention_bias=arch == "qwen2" or cfg.get("attention_bias", False),
            output_bias=arch in ("llama", "mistral") and cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            qk_norm=arch == "qwen3" or gemma,
            hidden_act=act,
            norm_offset=1.0 if gemma else 0.0,
            post_norms=gemma,
            embed_scale=cfg["hidden_size"] ** 0.5 if gemma else None,
            query_scale=cfg.get("query_pre_attn_scalar", 256) ** -0.5 if gemma else None,
            final_softcap=cfg.get("final_logit_softcapping"),
            layer_windows=hf_layer_windows(cfg, arch),
            local_rope_theta=(local.get("rope_theta") or cfg.get("rope_local_base_freq", 10000.0)) if gemma else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            name=name,
            arch=arch,
        )

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    def spec(self) -> ModelSpec:
        return ModelSpec(
            name=self.name,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position=self.max_position,
            windows=tuple(self.layer_windows) if self.layer_windows and any(self.layer_windows) else None,
        )


def hf_layer_windows(cfg: dict, arch: str) -> list[int | None] | None:
    """Per layer, its sliding window as transformers decides it: ``layer_types`` when given; Gemma 3 every layer
    but each 6th (``sliding_window_pattern``); Mistral every layer; Qwen2 layers from ``max_window_layers`` on when
    ``use_sliding_window``. None when no layer slides."""
    window, n = cfg.get("sliding_window"), cfg["num_hidden_layers"]
    if not window or (arch == "qwen2" and not cfg.get("use_sliding_window")):
        return None
    types = cfg.get("layer_types")
    if types is None and arch == "gemma3_text":
        pattern = cfg.get("sliding_window_pattern", 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    elif types is None and arch == "mistral":
        types = ["sliding_attention"] * n
    elif types is None and arch == "qwen2" and cfg.get("use_sliding_window"):
        first = cfg.get("max_window_layers", n)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    windows = [window if t == "sliding_attention" else None for t in types or []]
    return windows if any(windows) else None
