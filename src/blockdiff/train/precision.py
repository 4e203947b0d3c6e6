"""bf16 working weights on one device: the single-GPU twin of FSDP2's mixed-precision policy.

Under FSDP2 (``parallel.parallelize``, world size > 1) each unit all-gathers its fp32 master shards
as bf16 once per forward: every matmul then reads bf16 weights, gradients flow back through that one
cast and land in fp32. On one GPU there is no all-gather, and plain autocast casts each fp32 weight
again at every use: once per pass (encoder, decoder pass 1, decoder pass 2), once per loss chunk for
the 262k x 2816 tied embedding, and again in recomputation. The profile put 21% of the step there.

Two ways to put bf16 weights in the parameters' slots for the forward AND the backward (activation-
checkpoint recomputation reads the slots again); on exit the fp32 parameters are back:

- ``working_weights(model, dtype)`` casts every fp32 floating parameter once per micro-batch, with
  autograd: gradients accumulate on the cast across passes and reach the fp32 ``param.grad`` through one
  cast, as under FSDP2.
- ``PersistentWorkingWeights`` keeps one bf16 copy per fp32 parameter across steps, written by the
  optimizer in the same pass that updates the master (``master_adamw.MasterAdamW``): no cast pass per
  step, and the gradients stay bf16 on the copies (the optimizer reads them there). With several
  micro-batches per step they are summed into the master's fp32 ``.grad`` between micro-batches.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from blockdiff.parallel.parallelize import is_sharded


def _fp32_slots(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    return [(mod, name, p) for mod in model.modules() for name, p in mod._parameters.items()
            if p is not None and p.dtype == torch.float32]


@contextlib.contextmanager
def _slots_hold(slots, tensors: dict[int, torch.Tensor]):
    """Put ``tensors[id(p)]`` in every slot of ``slots`` for the duration; the parameters come back on exit."""
    try:
        for mod, name, p in slots:
            # write the slot directly: nn.Module.__setattr__ only accepts Parameters for a parameter name
            mod._parameters[name] = tensors[id(p)]
        yield
    finally:
        for mod, name, p in slots:
            mod._parameters[name] = p


@contextlib.contextmanager
def working_weights(model: nn.Module, dtype: torch.dtype):
    """Within the context, ``model``'s fp32 parameters read as one autograd-tracked cast to ``dtype``."""
    if dtype == torch.float32:
        yield
        return
    slots = _fp32_slots(model)
    casts: dict[int, torch.Tensor] = {}  # one cast per parameter, also when a parameter is shared (tied)
    for _, _, p in slots:
        if id(p) not in casts:
            casts[id(p)] = p.to(dtype) if p.requires_grad else p.detach().to(dtype)
    with _slots_hold(slots, casts):
        yield


class PersistentWorkingWeights:
    """One ``dtype`` copy of each fp32 parameter of ``model``, kept across steps (tied parameters share one).
    A trainable parameter's copy is a leaf that requires grad: backward leaves the bf16 gradient on it.

    Invariant: each copy equals its master cast to ``dtype``. The optimizer keeps it when it updates the
    masters (and calls ``mark_current``); any other in-place change of a master (``load_state_dict``, a
    checkpoint load) bumps the master's version counter, and the copy is derived again on the next use."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.slots = _fp32_slots(model)
        self.masters = list({id(p): p for _, _, p in self.slots}.values())
        self.copies: dict[int, torch.Tensor] = {}
        self._versions: dict[int, int] = {}  # master -> its version counter when its copy was last derived
        for p in self.masters:
            self.copies[id(p)] = p.detach().to(dtype).requires_grad_(p.requires_grad)
        self.mark_current(self.masters)

    def of(self, p: torch.Tensor) -> torch.Tensor:
        return self.copies[id(p)]

    def mark_current(self, masters) -> None:
        """The copies of ``masters`` equal them as they are now."""
        for p in masters:
            self._versions[id(p)] = p._version

    @torch.no_grad()
    def refresh(self) -> None:
        """Derive again the copies of masters changed in place since they were last current."""
        stale = [p for p in self.masters if p._version != self._versions[id(p)]]
        for p in stale:
            self.copies[id(p)].copy_(p)
        self.mark_current(stale)

    def fold_grads(self, into_existing_only: bool = False) -> None:
        """Move the bf16 gradients on the copies into the masters' fp32 ``.grad`` (summed in fp32): what
        happens between two micro-batches of one step. ``into_existing_only``: only where a master already
        holds an fp32 sum (the last micro-batch of several); a single micro-batch's gradients stay bf16."""
        for p in self.masters:
            w = self.copies[id(p)]
            if w.grad is None or (into_existing_only and p.grad is None):
                continue
            if p.grad is None:
                p.grad = w.grad.float()
            else:
                p.grad.add_(w.grad)
            w.grad = None

    def grad_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """``p``'s gradient: its fp32 ``.grad`` if it has one (several micro-batches, ``fold_grads`` first),
        else the bf16 gradient on its copy."""
        return p.grad if p.grad is not None else self.copies[id(p)].grad

    def clear_grads(self, set_to_none: bool = True) -> None:
        for w in self.copies.values():
            if w.grad is not None:
                if set_to_none:
                    w.grad = None
                else:
                    w.grad.zero_()

    @contextlib.contextmanager
    def swapped_in(self):
        """The forward + backward of one micro-batch: the copies in the parameters' slots. Gradients left by
        an earlier micro-batch of the step are folded into fp32 first, so micro-batches sum in fp32."""
        self.refresh()
        self.fold_grads()
        with _slots_hold(self.slots, self.copies):
            yield


def bf16_autocast(device: torch.device, dtype_name: str):
    """The forward's CUDA autocast to bf16 under ``model.dtype: bfloat16`` (off elsewhere): what the train step,
    the RL update and sampling during a run compute in, inside ``compute_context``."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and dtype_name == "bfloat16")


def compute_context(model: nn.Module, device: torch.device, dtype_name: str, optimizer=None):
    """What the train step (forward + backward) runs inside. An optimizer that keeps persistent working
    copies (``master_adamw.MasterAdamW``) supplies them; else bf16 casts per micro-batch on one CUDA device
    when ``model.dtype: bfloat16`` and the model is not FSDP-sharded (FSDP2 casts on its own); else nothing."""
    working = getattr(optimizer, "working", None)
    if working is not None:
        return working.swapped_in()
    if device.type == "cuda" and dtype_name == "bfloat16" and not is_sharded(model):
        return working_weights(model, torch.bfloat16)
    return contextlib.nullcontext()
