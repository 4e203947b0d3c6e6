"""AdamW over fp32 masters that writes their bf16 working copies in the same pass: one GPU, bf16.

On one CUDA device with ``model.dtype: bfloat16`` the forward and backward read persistent bf16 copies
of the fp32 masters (``precision.PersistentWorkingWeights``) and leave bf16 gradients on them.
``MasterAdamW`` then updates each tensor in one elementwise pass (``adamw_update_``): it reads the fp32
master, the bf16 gradient, exp_avg and exp_avg_sq, and writes the master, both moments and the bf16 copy,
28 bytes per parameter. The per-micro-batch weight cast, the fp32 gradient tensors and their cast from
bf16 are gone (torch's fused AdamW over fp32 grads plus those passes: ~44 bytes per parameter). With
several micro-batches per step the bf16 gradients are summed into fp32 ``.grad`` between micro-batches
(``PersistentWorkingWeights.fold_grads``) and the update reads those (30 bytes per parameter).

The math is torch.optim.AdamW's in fp32: decoupled weight decay, bias correction, the group's ``lr``
as the scheduler sets it, the gradient divided by ``grad_scale`` (clipping, ``parallel.clip_gradients``)
and a non-zero ``found_inf`` leaving every tensor bit for bit as it was (no host read of the flag).
The state is AdamW's (exp_avg, exp_avg_sq, step per parameter), so checkpoints are interchangeable
with torch's AdamW and with sharded runs; the working copies are derived from the masters on load.
"""

from __future__ import annotations

import math

import torch

from blockdiff.compiled import CompiledOrEager
from blockdiff.parallel.parallelize import is_sharded, param_groups_by_mesh
from blockdiff.train.precision import PersistentWorkingWeights


def adamw_update_(param, grad, exp_avg, exp_avg_sq, working, step, lr, grad_divisor, found_inf,
                  beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step of one (flattened) tensor, in place: ``param``, ``exp_avg``, ``exp_avg_sq`` fp32,
    ``grad`` bf16 or fp32, ``working`` gets the new master in its dtype. ``step`` already counts this step;
    ``step``, ``lr``, ``grad_divisor``, ``found_inf`` are 0-d tensors (no recompile when they change).
    Plain elementwise math: on CUDA torch.compile makes it one kernel."""
    g = grad.float() / grad_divisor
    m = exp_avg.lerp(g, 1 - beta1)
    v = exp_avg_sq * beta2 + (1 - beta2) * g * g
    # 1 - beta ** step as -expm1(step * log(beta)): no cancellation in fp32 at small steps
    bc1 = -torch.expm1(step * math.log(beta1)) if beta1 > 0 else 1.0
    bc2_sqrt = torch.sqrt(-torch.expm1(step * math.log(beta2))) if beta2 > 0 else 1.0
    p = param * (1 - lr * weight_decay) - (lr / bc1) * m / (v.sqrt() / bc2_sqrt + eps)
    skip = found_inf != 0
    p = torch.where(skip, param, p)
    exp_avg.copy_(torch.where(skip, exp_avg, m))
    exp_avg_sq.copy_(torch.where(skip, exp_avg_sq, v))
    working.copy_(p)
    param.copy_(p)


# dynamic shapes over 1-D views: one compiled kernel serves every parameter
_update = CompiledOrEager(adamw_update_, dynamic=True)


def _device_scalar(x, device: torch.device) -> torch.Tensor:
    """0-d fp32 tensor on ``device``; a host number goes through pinned memory without waiting."""
    if torch.is_tensor(x):
        return x.to(device=device, dtype=torch.float32)
    t = torch.tensor(float(x), dtype=torch.float32)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class MasterAdamW(torch.optim.Optimizer):
    """AdamW over ``params`` (fp32 masters of ``model``) that keeps their ``dtype`` working copies
    (``self.working``) current. Drive it like the trainer drives torch's fused AdamW: forward + backward
    inside ``precision.compute_context(..., optimizer)``, ``parallel.clip_gradients`` (it sets
    ``grad_scale``), ``found_inf`` for the non-finite skip, ``step``, ``zero_grad``. ``fused`` is set in
    the defaults: it takes ``grad_scale`` and keeps ``step`` on the parameters' device, as fused AdamW."""

    def __init__(self, model, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=True))
        self.working = PersistentWorkingWeights(model, dtype)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32 or id(p) not in self.working.copies or not p.is_contiguous():
                    raise ValueError("MasterAdamW updates contiguous fp32 parameters of the model it is given; "
                                     f"got one of dtype {p.dtype}, shape {list(p.shape)}")
        self._constants: dict = {}

    def _constant(self, value: float, device: torch.device) -> torch.Tensor:
        key = (value, device)
        if key not in self._constants:
            self._constants[key] = torch.tensor(value, dtype=torch.float32, device=device)
        return self._constants[key]

    def grad_holders(self, params) -> list[torch.Tensor]:
        """The tensors whose ``.grad`` is each parameter's gradient (``parallel.clip_gradients`` reads them):
        the bf16 working copy after one micro-batch, the fp32 master after several."""
        self.working.fold_grads(into_existing_only=True)
        return [p if p.grad is not None else self.working.of(p) for p in params]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.working.fold_grads(into_existing_only=True)
        divisor, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group in self.param_groups:
            live = [(p, self.working.grad_of(p)) for p in group["params"]]
            live = [(p, g) for p, g in live if g is not None]  # no gradient: no update, as torch's AdamW
            if not live:
                continue
            device = live[0][0].device
            lr = _device_scalar(group["lr"], device)
            div = divisor if divisor is not None else self._constant(1.0, device)
            inf = found_inf.to(torch.float32) if found_inf is not None else self._constant(0.0, device)
            for p, _ in live:
                if not self.state[p]:
                    self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                     "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            # a skipped step does not count: step + (1 - found_inf)
            torch._foreach_add_([self.state[p]["step"] for p, _ in live], 1 - inf if found_inf is not None else 1.0)
            beta1, beta2 = group["betas"]
            for p, g in live:
                s = self.state[p]
                _update(p.is_cuda, p.detach().view(-1), g.detach().reshape(-1), s["exp_avg"].view(-1),
                        s["exp_avg_sq"].view(-1), self.working.of(p).detach().view(-1), s["step"], lr, div, inf,
                        beta1, beta2, group["eps"], group["weight_decay"])
            self.working.mark_current([p for p, _ in live])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.working.clear_grads(set_to_none)


def uses_master_adamw(model, device: torch.device, dtype_name: str, enabled: bool = True) -> bool:
    """MasterAdamW trains a model on one CUDA device in bf16 (``optimizer.master_update``); CPU and FSDP2 runs
    keep torch's AdamW."""
    return enabled and device.type == "cuda" and dtype_name == "bfloat16" and not is_sharded(model)


def build_optimizer(model, params, o, device: torch.device, dtype_name: str) -> torch.optim.Optimizer:
    """The trainer's AdamW (``o``: the ``optimizer`` config section). One CUDA device in bf16 with
    ``optimizer.master_update``: MasterAdamW.
    Else torch's fused AdamW (CPU and CUDA): one kernel per parameter group, clipping (``grad_scale``) and
    the skip of a non-finite step (``found_inf``) inside it; a group per device mesh, since expert params
    (ep > 1) live on another mesh than the rest and one fused call over DTensors of two meshes fails.
    Checkpoints key the state by parameter name, so the grouping may differ between world sizes."""
    if uses_master_adamw(model, device, dtype_name, o.master_update):
        return MasterAdamW(model, params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    return torch.optim.AdamW(param_groups_by_mesh(params), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay, fused=True)
