"""Self-conditioning soft embeddings through the tied 262k-vocabulary embedding, chunked, with its gradient.

``soft_embeddings(hidden, weight, cap, scale)`` returns ``softmax(softcap(hidden @ W^T)) @ W * scale``: the
decoder's self-conditioning input from pass 1's hidden states. As in the reference (transformers computes
it inside the forward from the detached pass-1 logits), the tied embedding ``W`` gets a gradient through
the second matmul and the hidden states get none.

Forward, per chunk of rows: the head matmul, one fused softcap / fp32 softmax pass (``torch.compile`` on
CUDA) giving the probabilities ``P`` in the compute dtype, and ``P @ W``. Backward: ``dW = P^T @ (dS *
scale)``, with ``P`` recomputed chunk by chunk from the saved hidden states ([N, H], what pass 1 produced)
instead of kept ([N, V]: 2 GiB in bf16 for 4096 canvas tokens at the real vocabulary), at the cost of one
more head matmul per chunk. No [N, V] tensor outlives its chunk. A frozen embedding (LoRA) saves nothing
and records no backward. Under FSDP2 ``weight`` is the root unit's unsharded parameter (read through
``model.embed_tokens``, see ``parallel._root_class``): its gradient lands there, as the tied head's does,
and is reduced with it.
"""

from __future__ import annotations

import torch

from blockdiff.compiled import CompiledOrEager


def _probabilities(hidden: torch.Tensor, weight: torch.Tensor, cap: float) -> torch.Tensor:
    """softmax(softcap(hidden @ W^T)) of one chunk: fp32 softcap and softmax, returned in W's dtype."""
    z = (hidden @ weight.t()).float()
    if cap:
        z = cap * torch.tanh(z / cap)
    return torch.softmax(z, dim=-1).to(weight.dtype)


# rows per chunk vary (the last chunk, the self-conditioned token count): dynamic row count, one compile
_probabilities_compiled = CompiledOrEager(_probabilities, dynamic=None)


class _SoftEmbeddings(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, cap, scale, chunk, compile, grad_enabled):
        # explicit compute dtype (autocast's when on, else the weight's, as the reference casts P to it) and
        # autocast off inside, in forward and backward alike
        dev = hidden.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        with torch.autocast(dev, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            out = torch.empty(h.shape[0], w.shape[1], dtype=dtype, device=h.device)
            for s in range(0, h.shape[0], chunk):
                torch.mm(_probabilities_compiled(compile, h[s:s + chunk], w, cap), w, out=out[s:s + chunk])
            # the scale rounded to the compute dtype, as the reference's embed_scale buffer is
            scale_t = torch.tensor(scale, dtype=dtype, device=h.device)
            out *= scale_t
        # needs_input_grad ignores no_grad mode: the caller passes whether grad mode was on
        if grad_enabled and ctx.needs_input_grad[1]:
            ctx.save_for_backward(h, weight)  # the weight itself (alive anyway), cast again in backward
            ctx.cap, ctx.chunk, ctx.compile, ctx.scale_t = cap, chunk, compile, scale_t
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(h.dtype)
            g = grad_out.to(h.dtype) * ctx.scale_t
            grad_w = None
            for s in range(0, h.shape[0], ctx.chunk):
                p = _probabilities_compiled(ctx.compile, h[s:s + ctx.chunk], w, ctx.cap)
                # summed over chunks in the compute dtype, as autograd sums a reused weight's grads
                grad_w = p.t() @ g[s:s + ctx.chunk] if grad_w is None else grad_w.addmm_(p.t(), g[s:s + ctx.chunk])
            if grad_w is None:  # no rows
                grad_w = torch.zeros_like(w)
        return None, grad_w.to(weight.dtype), None, None, None, None, None


def soft_embeddings(hidden: torch.Tensor, weight: torch.Tensor, cap: float | None, scale: float,
                    chunk: int = 1024, compile: bool | None = None) -> torch.Tensor:
    """See the module docstring. hidden [N, H] (no gradient flows into it), weight [V, H] -> [N, H] in the
    compute dtype. ``compile`` (default: on CUDA) fuses each chunk's vocabulary pass."""
    if compile is None:
        compile = hidden.is_cuda
    return _SoftEmbeddings.apply(hidden.detach(), weight, float(cap or 0.0), float(scale), chunk, compile,
                                 torch.is_grad_enabled())
