"""The FLOP formula against a hand count for a tiny config (docs/performance.md uses it for MFU)."""

import transformers

from blockdiff.train.flops import StepShape, active_params, step_flops
from blockdiff.model.config import ModelConfig, hf_config_dict


def tiny():
    return ModelConfig.from_hf(transformers.DiffusionGemmaConfig(**hf_config_dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1, sliding_window=6,
        num_experts=4, top_k_experts=2, moe_intermediate_size=16, canvas_length=8, max_position_embeddings=64)))


def test_active_params_hand_count():
    # sliding layer: q 32*4*8 + k,v 2*(32*2*8) + o 4*8*32 + dense 3*32*48 + router 32*4 + top-2 experts 2*3*32*16
    sliding = 1024 + 1024 + 1024 + 4608 + 128 + 3072
    # full layer: head_dim 16, one K(=V) head, no v_proj
    full = 32 * 4 * 16 + 32 * 1 * 16 + 4 * 16 * 32 + 4608 + 128 + 3072
    assert (sliding, full) == (10880, 12416)
    assert active_params(tiny(), with_lm_head=False) == 5 * sliding + full
    assert active_params(tiny()) == 5 * sliding + full + 128 * 32


def test_step_flops_hand_count():
    body, head = 66816, 128 * 32
    dec = body + 3 * 32 * 48  # the decoder also runs the self-conditioning MLP
    attn = 5 * (4 * 4 * 8) + 4 * 4 * 16  # 4 * heads * head_dim summed over layers, per (query, key)
    # batch 1, prompt 4, one 8-token block: encoder 12 tokens with ~6 keys each; canvas sees 4 + 8 keys
    encoder = 3 * (2 * body * 12 + 2 * head * 12 + attn * 12 * 6)
    pass1 = 2 * dec * 8 + 2 * head * 8 + 2 * head * 8 + attn * 8 * 12  # + soft-embedding matmul
    pass2 = 3 * (2 * dec * 8 + 2 * head * 8 + attn * 8 * 12)
    got = step_flops(tiny(), StepShape(batch=1, prompt=4, response=8, canvas=8))
    assert got["encoder"] == encoder and got["decoder_pass1"] == pass1 and got["decoder_pass2"] == pass2
    assert got["total"] == encoder + pass1 + pass2 == 10542080
