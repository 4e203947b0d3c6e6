"""Mixture of experts: the router and the experts held as 3-D tensors.

Tokens are permuted so each expert's rows are contiguous, run through all experts as grouped GEMMs
(``torch._grouped_mm`` on CUDA; a split loop on CPU, where it is the reference), weighted, and
gathered back through the inverse permutation with the K expert outputs summed in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from blockdiff.model.config import ModelConfig
from blockdiff.model.layers import RMSNorm, activation, compute_dtype
from blockdiff.model.quantized import QuantizedWeight


class Router(nn.Module):
    """RMSNorm (no scale) -> x * scale * H^-0.5 -> proj -> fp32 softmax -> top-k -> renormalise
    -> * per_expert_scale[idx]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H, E = config.hidden_size, config.num_experts
        self.top_k = config.top_k_experts
        self.root_size = H**-0.5
        self.norm = RMSNorm(H, config.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(H, E, bias=False)
        self.scale = nn.Parameter(torch.ones(H))
        self.per_expert_scale = nn.Parameter(torch.ones(E))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x) * self.scale * self.root_size
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[index], index


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by expert (counts[e] rows for expert e) times weight[e]^T.

    x [N, in], weight [E, out, in] -> [N, out].
    """
    if x.is_cuda and hasattr(torch, "_grouped_mm"):
        # under autocast the residual stream is fp32 while compute is bf16: cast here, as autocast would
        dtype = compute_dtype(x)
        if dtype == torch.bfloat16:
            return torch._grouped_mm(x.to(dtype), weight.to(dtype).transpose(1, 2), offs=offsets)
    # Reference path (CPU, fp32 GPU): unbind once, so backward stacks the expert grads in one go
    # instead of one full-size zero tensor per indexed expert.
    experts = weight.to(x.dtype).unbind(0)
    outs = [chunk @ experts[e].t() for e, chunk in enumerate(torch.split(x, counts.tolist())) if chunk.shape[0] > 0]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """inverse[order[i]] = i, by one scatter (no second sort)."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def expert_counts(sorted_experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows per expert from the sorted expert ids, without a host sync (``bincount`` on CUDA reads the
    max back to size its output, which stalls the CPU every MoE layer and breaks CUDA-graph capture)."""
    bounds = torch.arange(num_experts + 1, device=sorted_experts.device, dtype=sorted_experts.dtype)
    return torch.diff(torch.searchsorted(sorted_experts, bounds))


class _DequantGroupedLinear(torch.autograd.Function):
    """``grouped_linear`` over a ``QuantizedWeight``: the layer's experts are dequantized to the compute dtype
    just before the grouped GEMM and freed after it, in forward and again in backward (never saved)."""

    @staticmethod
    def forward(ctx, x, weight: QuantizedWeight, counts, offsets):
        dtype = compute_dtype(x)
        ctx.weight, ctx.dtype, ctx.x_dtype = weight, dtype, x.dtype
        ctx.save_for_backward(counts, offsets)
        return grouped_linear(x.to(dtype), weight.dequantize(dtype), counts, offsets)

    @staticmethod
    def backward(ctx, grad):
        counts, offsets = ctx.saved_tensors
        w = ctx.weight.dequantize(ctx.dtype)  # [E, out, in]: grad [N, out] @ w[e] per expert
        return grouped_linear(grad.to(ctx.dtype), w.transpose(1, 2), counts, offsets).to(ctx.x_dtype), None, None, None


def expert_linear(x: torch.Tensor, weight, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``grouped_linear`` over a plain [E, out, in] tensor or a quantized one."""
    if isinstance(weight, QuantizedWeight):
        return _DequantGroupedLinear.apply(x, weight, counts, offsets)
    return grouped_linear(x, weight, counts, offsets)


class Experts(nn.Module):
    """Experts as 3-D tensors. ``dispatcher`` (None by default) is the expert-parallel hook: an object
    installed from outside (``blockdiff.parallel.parallelize``) when this module holds only a slice of the experts.
    Its ``dispatch(rows, counts)`` sends the expert-sorted rows to the ranks owning their experts and
    returns ``(local rows grouped by local expert, per-local-expert counts, ctx)``; ``combine(h, ctx)``
    returns the outputs to the original ranks, in the original row order. None: everything runs here.
    An optional ``announce(counts)`` starts the exchange of counts in the first half of ``forward`` and
    returns a ticket that the second half passes on as ``dispatch(rows, counts, ticket)``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.intermediate = E, I  # num_experts stays the GLOBAL count under EP
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.act = activation(config.hidden_activation)
        self.dispatcher = None
        # gate_up_proj / down_proj may be replaced by frozen ``QuantizedWeight`` modules (blockdiff.lora.quantize)
        # LoRA hook (blockdiff.lora.ExpertLora, installed by apply_lora): a submodule whose
        # ``delta(name, rows, counts, offsets)`` is added to the grouped product of "gate_up_proj" /
        # "down_proj". Its tensors are [E, ...] like the experts', so EP shards them the same way.
        self.adapter = None

    def expert_mlp(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows grouped by expert (counts[e] rows for this module's expert e) -> [N, H]."""
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        gate_up = expert_linear(rows, self.gate_up_proj, counts, offsets)
        if self.adapter is not None:  # LoRA hook
            gate_up = gate_up + self.adapter.delta("gate_up_proj", rows, counts, offsets)
        gate, up = gate_up.chunk(2, dim=-1)
        inner = self.act(gate) * up
        h = expert_linear(inner, self.down_proj, counts, offsets)
        if self.adapter is not None:  # LoRA hook
            h = h + self.adapter.delta("down_proj", inner, counts, offsets)
        return h

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, meanwhile=None):
        """x [T, H], weights/index [T, K] -> [T, H].

        ``meanwhile``: a callable run between the two halves (the layer's dense MLP); the result is then
        ``(out, meanwhile())``. Under expert parallelism the first half starts the exchange of row counts,
        and the second waits on the host for them (the all-to-all of rows needs its split sizes as Python
        ints), so the GPU has the callable's work queued while the host waits. It runs inside this module's
        call, so hooks on it (FSDP's unsharding) cover both halves."""
        pending = self._start(x, weights, index)
        extra = meanwhile() if meanwhile is not None else None
        out = self._finish(pending)
        return out if meanwhile is None else (out, extra)

    def _start(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> "PendingExperts":
        T, K = index.shape
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // K
        counts = expert_counts(flat[order], self.num_experts)
        inverse = inverse_permutation(order)
        # rows in the experts' compute dtype: the permutation and (expert parallel) the exchange move half
        # the bytes under bf16 autocast, where the grouped GEMMs would cast them anyway
        rows = _TokensToRows.apply(x, token, inverse, K, compute_dtype(x))
        ticket = self._announce(counts) if getattr(self.dispatcher, "announce", None) else None
        return PendingExperts(x.dtype, weights.reshape(-1)[order, None], token, inverse, K, rows, counts, ticket)

    def _finish(self, p: "PendingExperts") -> torch.Tensor:
        if self.dispatcher is None:
            h = self.expert_mlp(p.rows, p.counts)
        else:
            h = self._remote_experts(p.rows, p.counts, p.ticket)
        h = h.float() * p.row_weights  # the K expert outputs of a token summed in fp32
        return _RowsToTokens.apply(h, p.token, p.inverse, p.K).to(p.dtype)

    @torch.compiler.disable
    def _announce(self, counts: torch.Tensor):
        return self.dispatcher.announce(counts)

    @torch.compiler.disable
    def _remote_experts(self, rows: torch.Tensor, counts: torch.Tensor, ticket=None) -> torch.Tensor:
        """Expert parallel: rows out to the experts' ranks, through the local experts, and back. Left out of
        ``torch.compile``: the received row count changes every step (static shapes would recompile)."""
        if ticket is None:
            local_rows, local_counts, ctx = self.dispatcher.dispatch(rows, counts)
        else:
            local_rows, local_counts, ctx = self.dispatcher.dispatch(rows, counts, ticket)
        return self.dispatcher.combine(self.expert_mlp(local_rows, local_counts), ctx)


class PendingExperts(NamedTuple):
    """What the first half of ``Experts.forward`` hands to the second."""

    dtype: torch.dtype
    row_weights: torch.Tensor  # [T*K, 1] routing weight of each expert-sorted row
    token: torch.Tensor
    inverse: torch.Tensor
    K: int
    rows: torch.Tensor
    counts: torch.Tensor
    ticket: object  # the dispatcher's started count exchange (None without one)


# The token <-> expert-row permutation. Row i (expert order) holds token ``token[i]``; ``inverse[t*K + k]``
# is the row of token t's k-th expert. Each direction is a gather, and its adjoint is the other direction's
# gather plus a sum over K: no atomic scatter-add (an indexed gather's default backward), no host sync, and
# bit-reproducible results.


class _TokensToRows(torch.autograd.Function):
    """x [T, H] -> rows [T*K, H] in ``dtype``; backward sums the K row gradients of a token in x's dtype."""

    @staticmethod
    def forward(ctx, x, token, inverse, K, dtype):
        ctx.save_for_backward(inverse)
        ctx.K, ctx.x_dtype = K, x.dtype
        return x.to(dtype).index_select(0, token)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _sum_k(grad, inverse, ctx.K, ctx.x_dtype), None, None, None, None


class _RowsToTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, token, inverse, K):
        ctx.save_for_backward(token)
        return _sum_k(rows, inverse, K)

    @staticmethod
    def backward(ctx, grad):
        (token,) = ctx.saved_tensors
        return grad.index_select(0, token), None, None, None


def _sum_k(rows: torch.Tensor, inverse: torch.Tensor, K: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    return rows.index_select(0, inverse).view(inverse.numel() // K, K, -1).sum(1, dtype=dtype)
