"""FLOP count of one full recipe step (documented in docs/performance.md).

Per token, the active parameters N are: q/k/v/o projections, the dense gated MLP, the router, top-k
experts' gated MLPs, and the tied lm_head (V x H). A matmul with P parameters costs 2P FLOP per token
forward and 4P backward. Attention adds 4 * heads * head_dim * (visible keys) per query per layer forward
(QK^T and AV).

The step = encoder over every clean token (forward + backward, lm_head for the AR loss on every
token) + decoder pass 1 over the canvas (forward only, the self-conditioning MLP included, lm_head on every canvas token, plus the soft
embedding matmul 2 * V * H per canvas token) + decoder pass 2 over the canvas (forward + backward;
lm_head only on the scored block's tokens). Backward = 2 x forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockdiff.model.config import ModelConfig


@dataclass
class StepShape:
    batch: int
    prompt: int  # clean prompt tokens per row
    response: int  # response (canvas) tokens per row, a multiple of canvas_length
    canvas: int  # canvas_length


def layer_params(cfg: ModelConfig, layer: int) -> int:
    H, D = cfg.hidden_size, cfg.head_dims[layer]
    q = H * cfg.num_attention_heads * D
    kv = H * cfg.kv_heads[layer] * D * (1 if cfg.k_eq_v(layer) else 2)
    o = cfg.num_attention_heads * D * H
    dense = 3 * H * cfg.intermediate_size
    router = H * cfg.num_experts
    experts = cfg.top_k_experts * 3 * H * cfg.moe_intermediate_size
    return q + kv + o + dense + router + experts


def active_params(cfg: ModelConfig, with_lm_head: bool = True) -> int:
    n = sum(layer_params(cfg, i) for i in range(cfg.num_layers))
    return n + (cfg.vocab_size * cfg.hidden_size if with_lm_head else 0)


def attention_flops_fwd(cfg: ModelConfig, queries: int, keys_per_query: float) -> float:
    return sum(4 * cfg.num_attention_heads * cfg.head_dims[i] * queries * keys_per_query for i in range(cfg.num_layers))


def step_flops(cfg: ModelConfig, s: StepShape) -> dict[str, float]:
    """FLOP of one full recipe step, by part (the sum is ``total``)."""
    body = active_params(cfg, with_lm_head=False)
    dec = body + 3 * cfg.hidden_size * cfg.intermediate_size  # + the self-conditioning MLP
    head = cfg.vocab_size * cfg.hidden_size
    L = s.prompt + s.response
    enc_tok, can_tok = s.batch * L, s.batch * s.response
    # keys per query: encoder causal ~ L/2; canvas block b sees prompt + b blocks + its own block
    blocks = s.response // s.canvas
    canvas_keys = s.prompt + s.canvas * (blocks - 1) / 2 + s.canvas
    encoder = 3 * (2 * body * enc_tok + 2 * head * enc_tok + attention_flops_fwd(cfg, enc_tok, L / 2))
    pass1 = 2 * dec * can_tok + 2 * head * can_tok + 2 * head * can_tok + attention_flops_fwd(cfg, can_tok, canvas_keys)
    scored = s.batch * s.canvas
    pass2 = 3 * (2 * dec * can_tok + 2 * head * scored + attention_flops_fwd(cfg, can_tok, canvas_keys))
    return {"encoder": encoder, "decoder_pass1": pass1, "decoder_pass2": pass2, "total": encoder + pass1 + pass2}
