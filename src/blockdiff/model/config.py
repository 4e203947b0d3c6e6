"""The text-model configuration blockdiff runs on.

Parsed from transformers' ``DiffusionGemmaConfig`` so field semantics (per-layer head dims, K == V on
full layers, rope parameters, sliding window) are exactly the reference's; flattened into a small
frozen dataclass the model code can read without touching transformers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from blockdiff.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"

# the attention kernels: auto (flex on CUDA, sdpa elsewhere), sdpa, flex
AttnBackend = Literal["auto", "sdpa", "flex"]
ATTN_BACKENDS: tuple[str, ...] = get_args(AttnBackend)


def check_attn_backend(name) -> None:
    """Refuse an attention backend the model cannot run (the config's YAML type check says the same)."""
    if name not in ATTN_BACKENDS:
        raise ConfigError(f"must be {', '.join(ATTN_BACKENDS[:-1])} or {ATTN_BACKENDS[-1]} (got {name!r})",
                          field="attn_backend")


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    kind: str = "default"  # "default" or "proportional"
    partial_rotary_factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    layer_types: tuple[str, ...]
    head_dims: tuple[int, ...]
    kv_heads: tuple[int, ...]
    sliding_window: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    rope: dict[str, RopeSpec] = field(default_factory=dict)
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    hidden_activation: str = "gelu_pytorch_tanh"
    canvas_length: int = 256
    max_position_embeddings: int = 262144
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        n = len(self.layer_types)
        if not (len(self.head_dims) == len(self.kv_heads) == n):
            raise ValueError("model config: layer_types, head_dims and kv_heads must have one entry per layer")
        for i, t in enumerate(self.layer_types):
            if t not in (SLIDING, FULL):
                raise ValueError(f"model config: layer_types[{i}] = {t!r}, expected {SLIDING!r} or {FULL!r}")
            if self.num_attention_heads % self.kv_heads[i]:
                raise ValueError(
                    f"model config: layer {i}: num_attention_heads {self.num_attention_heads} is not a multiple "
                    f"of its {self.kv_heads[i]} key/value heads"
                )
        if not 0 < self.top_k_experts <= self.num_experts:
            raise ValueError(f"model config: top_k_experts {self.top_k_experts} not in 1..{self.num_experts}")
        for t in set(self.layer_types):
            if t not in self.rope:
                raise ValueError(f"model config: no rope parameters for layer type {t!r}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def k_eq_v(self, layer: int) -> bool:
        """Full-attention layers have no v_proj: values are the (v-normed) raw keys."""
        return self.layer_types[layer] == FULL

    # ---- conversion from / to transformers ------------------------------------------------------

    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModelConfig":
        """Build from a transformers ``DiffusionGemmaConfig`` (or its text config plus canvas_length)."""
        text = getattr(hf_config, "text_config", hf_config)
        canvas = getattr(hf_config, "canvas_length", None) or 256
        n = text.num_hidden_layers
        layer_types = tuple(text.layer_types[:n])
        per_layer = text.per_layer_config
        head_dims = tuple(int(per_layer[i].head_dim) for i in range(n))
        kv_heads = tuple(int(per_layer[i].num_key_value_heads) for i in range(n))
        rope = {}
        for t, p in (text.rope_parameters or {}).items():
            if p is None:
                continue
            rope[t] = RopeSpec(
                theta=float(p["rope_theta"]),
                kind=str(p.get("rope_type", "default")),
                partial_rotary_factor=float(p.get("partial_rotary_factor", 1.0)),
            )
        for t, spec in rope.items():
            if spec.kind not in ("default", "proportional"):
                raise ValueError(f"model config: rope_type {spec.kind!r} for {t} is not supported")
        if getattr(text, "attention_bias", False):
            raise ValueError("model config: attention_bias=True is not supported (DiffusionGemma has none)")
        eos = text.eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0]
        return cls(
            vocab_size=int(text.vocab_size),
            hidden_size=int(text.hidden_size),
            intermediate_size=int(text.intermediate_size),
            num_attention_heads=int(text.num_attention_heads),
            layer_types=layer_types,
            head_dims=head_dims,
            kv_heads=kv_heads,
            sliding_window=int(text.sliding_window),
            num_experts=int(text.num_experts),
            top_k_experts=int(text.top_k_experts),
            moe_intermediate_size=int(text.moe_intermediate_size),
            rope=rope,
            rms_norm_eps=float(text.rms_norm_eps),
            final_logit_softcapping=text.final_logit_softcapping,
            hidden_activation=str(text.hidden_activation),
            canvas_length=int(canvas),
            max_position_embeddings=int(text.max_position_embeddings),
            pad_token_id=int(text.pad_token_id if text.pad_token_id is not None else 0),
            eos_token_id=int(eos if eos is not None else 1),
            bos_token_id=int(text.bos_token_id if text.bos_token_id is not None else 2),
            initializer_range=float(getattr(text, "initializer_range", 0.02)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hf_config_dict(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int,
    global_head_dim: int,
    num_global_key_value_heads: int,
    sliding_window: int,
    num_experts: int,
    top_k_experts: int,
    moe_intermediate_size: int,
    canvas_length: int = 256,
    max_position_embeddings: int = 262144,
    vision_config: dict | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``transformers.DiffusionGemmaConfig`` (text + a minimal vision tower).

    The vision tower is carried through checkpoints but never run; a tiny one keeps random-init
    checkpoints small.
    """
    vision = vision_config or dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8,
    )
    return dict(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads, head_dim=head_dim, global_head_dim=global_head_dim,
            num_global_key_value_heads=num_global_key_value_heads, sliding_window=sliding_window,
            num_experts=num_experts, top_k_experts=top_k_experts, moe_intermediate_size=moe_intermediate_size,
            max_position_embeddings=max_position_embeddings,
        ),
        vision_config=vision,
        canvas_length=canvas_length,
    )


# The released google/diffusiongemma-26B-A4B-it text shapes (facts file), for building real-shape
# models from config with fewer layers.
REAL_SHAPES = dict(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
    sliding_window=1024, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
    canvas_length=256, max_position_embeddings=262144,
)
