"""bf16 working weights on one device: the single-GPU twin of FSDP2's mixed-precision policy.

Under FSDP2 (``parallel.parallelize``, world size > 1) each unit all-gathers its fp32 master shards
as bf16 once per forward: every matmul then reads bf16 weights, gradients flow back through that one
cast and land in fp32. On one GPU there is no all-gather, and plain autocast casts each fp32 weight
again at every use: once per pass (encoder, decoder pass 1, decoder pass 2), once per loss chunk for
the 262k x 2816 tied embedding, and again in recomputation. The profile put 21% of the step there.

``working_weights(model, dtype)`` casts every fp32 floating parameter once, with autograd, and puts
the casts in the parameters' slots for the duration of the context; the forward AND the backward
(activation-checkpoint recomputation reads the slots again) run inside it. Gradients accumulate on
the bf16 working copy across passes and reach the fp32 ``param.grad`` through one cast, as under
FSDP2, so one GPU and many compute with the same numerics. On exit the fp32 parameters are back.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .parallel import is_sharded


@contextlib.contextmanager
def working_weights(model: nn.Module, dtype: torch.dtype):
    """Within the context, ``model``'s fp32 parameters read as one autograd-tracked cast to ``dtype``."""
    if dtype == torch.float32:
        yield
        return
    slots = [(mod, name, p) for mod in model.modules() for name, p in mod._parameters.items()
             if p is not None and p.dtype == torch.float32]
    casts: dict[int, torch.Tensor] = {}  # one cast per parameter, also when a parameter is shared (tied)
    try:
        for mod, name, p in slots:
            if id(p) not in casts:
                casts[id(p)] = p.to(dtype) if p.requires_grad else p.detach().to(dtype)
            # write the slot directly: nn.Module.__setattr__ only accepts Parameters for a parameter name
            mod._parameters[name] = casts[id(p)]
        yield
    finally:
        for mod, name, p in slots:
            mod._parameters[name] = p


def compute_context(model: nn.Module, device: torch.device, dtype_name: str):
    """What the train step (forward + backward) runs inside: bf16 working weights on one CUDA device when
    ``model.dtype: bfloat16`` and the model is not FSDP-sharded (FSDP2 casts on its own); else nothing."""
    if device.type == "cuda" and dtype_name == "bfloat16" and not is_sharded(model):
        return working_weights(model, torch.bfloat16)
    return contextlib.nullcontext()
