"""Softcapped cross-entropy through the tied 262k-vocabulary head, fused and chunked.

``linear_softcap_ce_sum(hidden, weight, targets, token_weight, cap)`` returns
``sum_i token_weight[i] * CE(cap * tanh(hidden[i] @ weight^T / cap), targets[i])``. Per chunk of rows
it runs the head matmul once, then one fused pass (``torch.compile`` on CUDA) gives the loss and the
gradient of the logits, which two matmuls turn into the gradients of the hidden rows and of the weight
right away. Backward only scales them by the incoming scalar. No [N, V] tensor outlives its chunk, no
fp32 logits are materialised, and nothing is recomputed (the plain autograd version recomputed the
chunk's logits in backward and walked five elementwise passes over them).
"""

from __future__ import annotations

import torch

from blockdiff.compiled import CompiledOrEager


def _ce_chunk(logits: torch.Tensor, targets: torch.Tensor, token_weight: torch.Tensor, cap: float,
              need_grad: bool):
    """Loss sum of one chunk and (if ``need_grad``) d loss / d logits in the logits' dtype."""
    z = logits.float()
    if cap:
        squashed = torch.tanh(z / cap)
        z = cap * squashed
    lse = torch.logsumexp(z, dim=-1)
    picked = z.gather(1, targets[:, None]).squeeze(1)
    loss = ((lse - picked) * token_weight).sum()
    if not need_grad:
        return loss, None
    is_target = torch.arange(z.shape[-1], device=z.device)[None, :] == targets[:, None]
    grad = (torch.exp(z - lse[:, None]) - is_target.float()) * token_weight[:, None]
    if cap:
        grad = grad * (1 - squashed * squashed)
    return loss, grad.to(logits.dtype)


# rows per chunk vary (the last chunk, the scored-token count): dynamic row count, one compile
_ce_chunk_compiled = CompiledOrEager(_ce_chunk, dynamic=None)


class _LinearSoftcapCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weight, cap, chunk, compile, grad_enabled):
        # explicit compute dtype (autocast's when on, as F.linear would use) and autocast off inside:
        # the gradient matmuls write into preallocated buffers
        dev = hidden.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        # needs_input_grad ignores no_grad mode: the caller passes whether grad mode was on
        want_h, want_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(dev, enabled=False):
            w = weight.to(dtype)
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s:s + chunk].to(dtype)
                loss, d = _ce_chunk_compiled(compile, h @ w.t(), targets[s:s + chunk],
                                             token_weight[s:s + chunk].float(), cap, want_h or want_w)
                total += loss
                if want_h:
                    grad_h[s:s + chunk] = d @ w
                if want_w:  # summed over chunks in the compute dtype, as autograd sums a reused weight's grads
                    grad_w = d.t() @ h if grad_w is None else grad_w.addmm_(d.t(), h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out.to(grad_w.dtype)).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def linear_softcap_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          token_weight: torch.Tensor, cap: float | None, chunk: int = 1024,
                          compile: bool | None = None) -> torch.Tensor:
    """See the module docstring. hidden [N, H], weight [V, H], targets [N], token_weight [N] -> fp32 scalar.
    ``compile`` (default: on CUDA) fuses each chunk's vocabulary pass with ``torch.compile``."""
    if compile is None:
        compile = hidden.is_cuda
    return _LinearSoftcapCE.apply(hidden, weight, targets, token_weight, float(cap or 0.0), chunk, compile,
                                  torch.is_grad_enabled())
