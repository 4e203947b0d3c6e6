"""Parallelism applied from outside the plain model: FSDP2, expert parallelism, activation
checkpointing, compile. The model file imports nothing distributed; everything is installed here.

Layout (``W`` ranks, ``ep`` dividing W and the number of experts E):

- data parallel over all W ranks (mesh ``dp``). Every non-expert parameter is sharded by FSDP2
  (``fully_shard``) over all W ranks: one FSDP unit per transformer ``Layer`` and one root unit (embedding,
  final norm, self-conditioning block).
- expert parallel: ranks ``[g*ep, (g+1)*ep)`` form an EP group; EP rank r keeps experts
  ``[r*E/ep, (r+1)*E/ep)`` (the 3-D expert params are sliced). The router runs replicated; the
  expert-sorted token rows go to the rank owning their expert with ``all_to_all_single`` (counts are
  exchanged first: uneven splits, no padding) and come back the same way (autograd through both).
  The local expert params then form their own FSDP unit sharded over the W/ep ranks that hold the same
  experts (mesh dim ``edp`` of the 2-D mesh ``(ep, edp)``).
- gradients are SUMMED over ranks (the loss is already divided by the global token counts):
  every FSDP unit gets ``set_gradient_divide_factor(1.0)`` and sum-only collectives.
- ep = 1: no dispatcher, experts are ordinary params of their layer's unit.

Mixed precision: fp32 master params; bf16 all-gather/compute on CUDA when ``model.dtype: bfloat16``;
fp32 gradient reduction.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as tdist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Shard
from torch.utils.checkpoint import checkpoint as _checkpoint

from blockdiff.config.schema import check_expert_parallel
from blockdiff.parallel.distributed import DistInfo
from blockdiff.parallel.experts import exchange_stash_contexts, shard_experts


# ---------------------------------------------------------------------------------------- layer wrappers


def _ac_forward(inner, *args, **kwargs):
    return _checkpoint(inner, *args, use_reentrant=False, **kwargs)


def _ac_forward_keeping_exchanges(inner, *args, **kwargs):
    return _checkpoint(inner, *args, use_reentrant=False, context_fn=exchange_stash_contexts, **kwargs)


def apply_activation_checkpointing(model, keep_expert_exchanges: bool = False) -> None:
    """Recompute each Layer in backward (non-reentrant). The layer returns its K/V functionally, so the
    encoder K/V the decoder reads is an ordinary output: recomputation neither duplicates nor drops it.
    ``keep_expert_exchanges`` (expert parallel): the recomputation replays the forward's all-to-all
    results instead of exchanging again (see ``blockdiff.parallel.experts``)."""
    wrapper = _ac_forward_keeping_exchanges if keep_expert_exchanges else _ac_forward
    for layer in model.layers:
        layer.forward = functools.partial(wrapper, layer.forward)


def apply_compile(model) -> None:
    """torch.compile per layer with static shapes: a few sequence lengths occur per run (encoder, decoder
    passes, padded to multiples of 128 on CUDA); dynamic shapes broke inductor's flex_attention lowering
    (torch 2.11: "CantSplit")."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for layer in model.layers:
        layer.forward = torch.compile(layer.forward, dynamic=False)


# ---------------------------------------------------------------------------------------- parallelize


class ParallelState:
    """What parallelize did; kept on the model as ``_blockdiff_parallel`` for checkpoints/export."""

    def __init__(self, world_size, ep, dp_mesh=None, ep_mesh=None):
        self.world_size, self.ep, self.dp_mesh, self.ep_mesh = world_size, ep, dp_mesh, ep_mesh


def parallel_state(model) -> ParallelState | None:
    return getattr(model, "_blockdiff_parallel", None)


def is_sharded(model) -> bool:
    return parallel_state(model) is not None


def fsdp_modules(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def begin_step(model, first: bool) -> None:
    """Start the step's first parameter all-gathers (root: embedding and head; the first layer) without
    waiting: they run while the host prepares the step's batches. FSDP's pre-forward waits for them.
    Not before the ``first`` step of a process: FSDP sets up its streams in the first forward."""
    if is_sharded(model) and not first:
        for unit in (model, model.layers[0]):
            unit.unshard(async_op=True)


def reshard_all(model) -> None:
    """Put every FSDP unit in its sharded state (params registered as DTensor shards)."""
    for m in fsdp_modules(model):
        m.reshard()


def _root_class(cls):
    """Subclass of the FSDP root class: every ``embed_tokens`` access first runs the root unit's FSDP
    pre/post-forward through the argument-less ``_blockdiff_root_enter`` (registered as an FSDP forward
    method), which lazily initialises FSDP and all-gathers the root params (a no-op when unsharded).

    Why not register ``encode``/``decode`` themselves: the objective reads ``model.embed_tokens.weight``
    (the tied LM head) outside them, and FSDP would hook the decoder's cache inputs, running the root's
    post-backward (reduce-scatter + reshard) before the encoder's and the LM head's gradients arrive.
    With no inputs and no outputs the root unit is reduced once, in FSDP's final backward callback. Its
    params stay unsharded from first use until then (root units never reshard after forward)."""

    def _blockdiff_root_enter(self, _unused):
        return None

    def embed_tokens(self):
        # one non-tensor argument: FSDP's CUDA root pre-forward indexes its (moved) args tuple
        self._blockdiff_root_enter(0)
        return self._modules["embed_tokens"]

    return type(cls.__name__, (cls,), {"embed_tokens": property(embed_tokens),
                                       "_blockdiff_root_enter": _blockdiff_root_enter})


def parallelize(model, cfg, dist: DistInfo):
    """Return the model to train (on ``dist.device``), sharded when ``dist.world_size > 1``.

    A model on the ``meta`` device stays there (FSDP2 shards meta tensors too): ``blockdiff.train.loading``
    then allocates each rank's local shards (``to_empty``) and fills them from the checkpoint."""
    p = cfg.parallel
    check_expert_parallel(p.ep, world_size=dist.world_size, num_experts=model.config.num_experts)
    if not _on_meta(model):
        model = model.to(dist.device)
    if p.activation_checkpointing:
        apply_activation_checkpointing(model, keep_expert_exchanges=p.ep > 1 and not p.recompute_expert_exchanges)
    if p.compile:
        apply_compile(model)
    if dist.world_size == 1:
        return model

    W, ep, dev = dist.world_size, p.ep, dist.device.type
    dp_mesh = init_device_mesh(dev, (W,), mesh_dim_names=("dp",))
    ep_mesh = None
    if ep > 1:
        # mesh[j, i] = i * ep + j: the "ep" dim groups consecutive ranks, "edp" strides across groups
        grid = torch.arange(W).view(W // ep, ep).t().contiguous()
        ep_mesh = DeviceMesh(dev, grid, mesh_dim_names=("ep", "edp"))
        expert_names, expert_offset = shard_experts(model, ep_mesh.get_group("ep"), dist.rank % ep, ep)

    bf16 = dist.device.type == "cuda" and cfg.model.dtype == "bfloat16"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    for layer in model.layers:
        if ep > 1:
            fully_shard(layer.experts, mesh=ep_mesh["edp"], mp_policy=mp, reshard_after_forward=p.reshard_after_forward)
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=p.reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    # each layer's forward first starts the next layer's all-gather: it runs behind this layer's compute
    # instead of waiting for the host to reach the next layer (the MoE's split-size reads hold it back)
    for layer, nxt in zip(model.layers, model.layers[1:]):
        layer.set_modules_to_forward_prefetch([nxt])
    model.__class__ = _root_class(type(model))
    register_fsdp_forward_method(model, "_blockdiff_root_enter")
    for m in fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)  # SUM over ranks: the loss is normalised by global counts
        if hasattr(m, "set_force_sum_reduction_for_comms"):
            m.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no AVG/PREMUL_SUM)
        if hasattr(m, "set_reduce_scatter_unused_params"):
            m.set_reduce_scatter_unused_params(True, recurse=False)  # a rank whose experts got no tokens
    model._blockdiff_parallel = ParallelState(W, ep, dp_mesh, ep_mesh)
    model._blockdiff_parallel.expert_names = expert_names if ep > 1 else set()
    model._blockdiff_parallel.expert_offset = expert_offset if ep > 1 else 0  # first global expert of this rank
    return model


def _on_meta(model) -> bool:
    return next(model.parameters()).is_meta


# ---------------------------------------------------------------------------------------- global views


def global_view(model, name: str, t):
    """The tensor as a DTensor with its GLOBAL shape (for DCP checkpoints; gathers use ``full_tensor``).

    Non-expert params are FSDP DTensors already global. Local expert slices (ep > 1) are FSDP DTensors
    over ``edp`` with shape [E/ep, ...]; viewed on the 2-D (ep, edp) mesh with (Shard(0), Shard(0)) they
    are the [E, ...] tensor (same storage, no copy)."""
    st = parallel_state(model)
    if st is None or st.ep == 1 or name not in st.expert_names or not is_dtensor(t):
        return t
    local = t.to_local()
    shape = (t.shape[0] * st.ep, *t.shape[1:])
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(local, st.ep_mesh, [Shard(0), Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=stride)


def full_tensor(model, name: str, t) -> torch.Tensor:
    """The whole tensor on every rank (a collective). Local expert slices (ep > 1) are gathered over
    ``edp`` by FSDP's DTensor, then across the EP group (EP rank r holds the r-th block of experts).
    Not ``global_view(...).full_tensor()``: torch 2.11's redistribute tries to flatten the (ep, edp) mesh
    and raises "Mesh dim indices should be in ascending order" on GPUs."""
    if not is_dtensor(t):
        return t
    full = t.full_tensor()
    st = parallel_state(model)
    if st is None or st.ep == 1 or name not in st.expert_names:
        return full
    parts = [torch.empty_like(full) for _ in range(st.ep)]
    tdist.all_gather(parts, full.contiguous(), group=st.ep_mesh.get_group("ep"))
    return torch.cat(parts)


def is_dtensor(t) -> bool:
    return isinstance(t, DTensor)


# ---------------------------------------------------------------------------------------- grad clipping


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, apply: bool = True) -> torch.Tensor:
    """Global-norm clipping; returns the norm before clipping. Sharded grads: every element of every
    DTensor grad lives on exactly one rank (dense params sharded over all ranks, each expert on one EP
    rank and sharded over edp), so the squared norm is the world-sum of local squares. ``apply=False``
    only computes the norm (a fused optimizer step applies the factor, see ``clip_divisor``)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [g.to_local() for g in grads if is_dtensor(g)]
    plain = [g for g in grads if not is_dtensor(g)]
    dev = (sharded or plain)[0].device
    sq = torch.zeros((), dtype=torch.float32, device=dev)
    if sharded:
        sq += _sum_of_squares(sharded)
        tdist.all_reduce(sq)
    if plain:  # replicated (or everything, unsharded): counted once
        sq += _sum_of_squares(plain)
    total = sq.sqrt()
    if apply:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(sharded + plain, coef)
    return total


def _sum_of_squares(grads) -> torch.Tensor:
    # low-precision grads (MasterAdamW's, on the bf16 working copies) are reduced in fp32
    kw = {} if all(g.dtype == torch.float32 for g in grads) else {"dtype": torch.float32}
    return torch.stack(torch._foreach_norm(grads, 2.0, **kw)).float().pow(2).sum()


def clip_divisor(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What clipping divides the grads by: 1 / min(1, max_norm / (norm + 1e-6)). Given to a fused AdamW
    as ``grad_scale``, its kernel clips while it reads the grads (one pass over them fewer)."""
    return torch.clamp((total_norm + 1e-6) / max_norm, min=1.0)


def clip_gradients(params, optimizer, max_norm: float) -> torch.Tensor:
    """The training step's clipping; returns the global grad norm. ``max_norm <= 0``: no clipping. A fused
    AdamW (the trainer's) gets the factor as ``grad_scale`` and clips inside its kernel; any other optimizer
    gets the grads scaled here. An optimizer that keeps the gradients elsewhere (``MasterAdamW``: on the bf16
    working copies) names the tensors that hold them."""
    fused = bool(optimizer.defaults.get("fused"))
    holders = optimizer.grad_holders(params) if hasattr(optimizer, "grad_holders") else params
    norm = clip_grad_norm_(holders, max_norm, apply=max_norm > 0 and not fused)
    if fused:
        optimizer.grad_scale = clip_divisor(norm, max_norm) if max_norm > 0 else None
    return norm


def param_groups_by_mesh(params) -> list[dict]:
    """Optimizer parameter groups, one per device mesh (plain tensors: one group), in first-seen order:
    a fused optimizer kernel takes the DTensors of one mesh only."""
    groups: dict = {}
    for p in params:
        groups.setdefault(p.device_mesh if is_dtensor(p) else None, []).append(p)
    return [{"params": ps} for ps in groups.values()]
