"""The analytic part of the memory plan (``blockdiff.plan.estimate``): activations, FSDP buffers, the cross-entropy
chunk and runtime overhead of one training step. Estimates; the per-GPU state (weights, gradients,
optimizer) is read from the parallelized model itself and is exact. docs/parallelism.md gives the formulas.

Shape of a micro-batch (the worst case the data pipeline can produce): ``B`` = train.micro_batch_size
sequences of ``S`` = data.seq_length clean tokens (the encoder pass) and ``R`` = the largest canvas,
``floor((S - 1) / C) * C`` tokens with ``C`` = data.canvas_length (prompt of at least one token, the rest
whole blocks; both decoder passes). Decoder queries attend over ``S + R`` keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockdiff.model.config import ModelConfig

FP32 = 4
GIB = 1024**3
# CUDA context, cuBLAS/NCCL workspaces and communicator buffers: measured order of magnitude on H100/H200
RUNTIME_OVERHEAD = 2 * GIB
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation, as a share of the step's transient memory


@dataclass(frozen=True)
class StepShape:
    micro_batch: int  # B
    seq: int  # S: clean tokens (encoder)
    canvas: int  # R: canvas tokens (decoder passes)
    block: int  # C: canvas_length (tokens scored per example)
    compute_bytes: int  # c: 2 under bf16 compute, 4 in fp32
    ce_chunk: int  # rows per chunk of the fused cross-entropy (objective.ObjectiveSettings.chunk_tokens)
    fused_ce: bool  # the chunk's vocabulary pass is one compiled kernel (CUDA)

    @classmethod
    def of(cls, cfg, compute_bytes: int, ce_chunk: int, fused_ce: bool) -> "StepShape":
        S, C = cfg.data.seq_length, cfg.data.canvas_length
        return cls(cfg.train.micro_batch_size, S, (S - 1) // C * C, C, compute_bytes, ce_chunk, fused_ce)


def _layer_saved(mc: ModelConfig, layer: int, tokens: int, keys: int, c: int) -> int:
    """Bytes one layer saves for backward in a pass with gradients over ``tokens`` queries reading
    ``keys`` keys (``keys > tokens``: the decoder's concatenated [encoder ; canvas] K/V).

    Per token: ~10 hidden-wide tensors (the 7 norms' inputs/outputs, residual sums, o_proj/down_proj
    outputs), q and k/v through projection, norm and rotary (4 each), the dense MLP's gate, up and
    product (3 I), per routed copy (K) the expert input and output rows (2 H) and gate_up + product
    (3 Ie), in the compute dtype; the fp32 router softmax (E) and routing weights (2 K)."""
    H, I, Ie, K, E = (mc.hidden_size, mc.intermediate_size, mc.moe_intermediate_size, mc.top_k_experts,
                      mc.num_experts)
    q = mc.num_attention_heads * mc.head_dims[layer]
    kv = mc.kv_heads[layer] * mc.head_dims[layer]
    per_token = c * (10 * H + 4 * q + 4 * kv + 3 * I + K * (2 * H + 3 * Ie)) + FP32 * (E + 2 * K)
    concat = c * 2 * kv * keys if keys > tokens else 0
    return tokens * per_token + concat


def activation_terms(mc: ModelConfig, s: StepShape, checkpointing: bool, keep_exchanges: bool) -> dict[str, int]:
    """Activation memory of one micro-batch at its largest (the start of backward), by term, in bytes."""
    c, L = s.compute_bytes, mc.num_layers
    Te, Td, Tk = s.micro_batch * s.seq, s.micro_batch * s.canvas, s.micro_batch * (s.seq + s.canvas)
    H, V = mc.hidden_size, mc.vocab_size
    enc = [_layer_saved(mc, i, Te, Te, c) for i in range(L)]
    dec = [_layer_saved(mc, i, Td, Tk, c) for i in range(L)]
    terms: dict[str, int] = {}
    if checkpointing:
        terms["layer inputs (encoder + decoder pass 2)"] = L * c * H * (Te + Td)
        terms["encoder K/V (read by both decoder passes)"] = sum(
            c * 2 * mc.kv_heads[i] * mc.head_dims[i] * Te for i in range(L))
        if keep_exchanges:
            terms["expert exchanges kept for recomputation"] = L * 2 * c * mc.top_k_experts * H * (Te + Td)
        # backward of one layer: its recomputed activations and their gradients
        terms["layer in backward (recomputed + gradients)"] = 2 * max(dec + enc)
    else:
        terms["saved by every layer (encoder + decoder pass 2)"] = sum(enc) + sum(dec)
        terms["layer in backward (gradients)"] = max(dec + enc)
    # the fused CE computes its gradients in forward and keeps them: [V, H] per call (AR, diffusion) and
    # the hidden rows' gradients (AR: every clean token; diffusion: one block per example)
    terms["loss gradients kept from forward"] = 2 * c * V * H + c * H * (Te + s.micro_batch * s.block)
    terms["self-conditioning (soft embeddings + block)"] = c * Td * (5 * H + 3 * mc.intermediate_size)
    return terms


def ce_chunk_bytes(mc: ModelConfig, s: StepShape, rows: int) -> int:
    """One chunk of the fused cross-entropy: the logits and their gradient in the compute dtype, plus the
    fp32 softcap/softmax intermediates of the eager path (three [chunk, V] tensors; the compiled CUDA
    kernel keeps one)."""
    n = min(s.ce_chunk, rows) * mc.vocab_size
    return n * (2 * s.compute_bytes + (1 if s.fused_ce else 3) * FP32)


def fsdp_buffer_terms(units: list[tuple[int, int]], root: tuple[int, int], c: int, world: int,
                      reshard_after_forward: bool) -> dict[str, int]:
    """FSDP2 buffers in a step, in bytes. ``units`` = (gathered elements, trainable elements) per layer
    (its own unit plus its expert unit), ``root`` = the same for the root unit (embedding/LM head, final
    norm, self-conditioning block). One process: the bf16 working copy of the fp32 parameters
    (``precision.working_weights``), passed as the root with no layers."""
    terms: dict[str, int] = {"root unit gathered (embedding / LM head)": c * root[0]}
    if world == 1:
        return terms
    big = max(units, default=(0, 0), key=lambda u: u[0])
    if reshard_after_forward:  # this layer and the prefetched next one
        terms["layer units gathered (current + prefetched)"] = 2 * c * big[0]
    else:  # every layer stays gathered from the encoder pass to its backward
        terms["layer units gathered (all layers)"] = c * sum(u[0] for u in units)
    # backward: the layer's unsharded gradients and their fp32 reduce-scatter input; the root's
    # unsharded gradient accumulates until the end of backward
    terms["layer gradients unsharded + reduce-scatter input"] = (c + FP32) * big[1]
    terms["root gradient unsharded"] = c * root[1]
    return terms


def overhead_bytes(transient: int) -> int:
    """Runtime (CUDA context, libraries, communicators) plus allocator slack over the transient memory."""
    return RUNTIME_OVERHEAD + int(ALLOCATOR_SLACK * transient)
