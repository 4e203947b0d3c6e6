"""Memory plan of a training run before anything is loaded: ``blockdiff plan`` and the check ``train``
runs first.

The model is built on the meta device (only ``config.json`` is read, never a weight), LoRA and the frozen
router are applied as training does, and ``parallel.parallelize`` shards it for rank r of N under torch's
fake process group, one rank at a time. The per-GPU state is then read from the parallelized parameters
themselves (the local shards' shapes and allocated storage, FSDP2's padding included), so weights,
gradients and optimizer states are exact; activations, FSDP buffers and overhead come from the analytic
model in ``memory_model`` (estimates).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
from torch.distributed.tensor import DTensor

from blockdiff.config.schema import Config, apply_world_size
from blockdiff.errors import ConfigError
from blockdiff.model.config import ModelConfig
from blockdiff.model.diffusion_gemma import DiffusionGemma
from blockdiff.model.quantized import CHUNK_ELEMENTS, QuantizedWeight
from blockdiff.objective.loss import ObjectiveSettings
from blockdiff.parallel.distributed import DistInfo
from blockdiff.parallel.parallelize import fsdp_modules, parallelize, param_groups_by_mesh
from blockdiff.plan.memory_model import (FP32, GIB, StepShape, activation_terms, ce_chunk_bytes, fsdp_buffer_terms,
                                         overhead_bytes)
from blockdiff.train.loading import _prepare, model_config

log = logging.getLogger("blockdiff")


# ---------------------------------------------------------------------------------------- the model on meta


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int):
    """Rank ``rank`` of ``world_size`` under torch's fake process group (collectives do nothing)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # torch's test utility: only the plan needs it

    tdist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        tdist.destroy_process_group()


def meta_model(cfg: Config, mc: ModelConfig, rank: int, world_size: int, device_type: str):
    """The model of rank ``rank`` as training builds it (LoRA, frozen router, parallelize), on meta.
    World size > 1: call inside ``fake_process_group``."""
    with torch.device("meta"):
        model = DiffusionGemma(mc, attn_backend=cfg.model.attn_backend)
    _prepare(model, cfg, torch.device(device_type))  # LoRA (+ quantized base) and the frozen router, as training
    run = copy.copy(cfg)
    run.parallel = dataclasses.replace(cfg.parallel, compile=False)  # compiling changes no tensor
    # the mesh lives on the CPU: the fake process group needs no device, and no parameter moves off meta
    return parallelize(model, run, DistInfo(rank, world_size, rank, torch.device("cpu")))


# ---------------------------------------------------------------------------------------- per-rank state


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _allocated(t: torch.Tensor) -> int:
    """Bytes allocated for a parameter's local shard: FSDP2 allocates the padded shard (every rank the
    same rows), of which the local tensor is a view."""
    return _local(t).untyped_storage().nbytes()


@dataclass
class Unit:
    name: str  # module path ("" = root)
    mesh_size: int
    gathered: int  # elements all-gathered (padded over the mesh)
    trainable: int  # of which trainable
    params: list[str] = field(default_factory=list)


@dataclass
class RankState:
    """Exact per-GPU state of one rank, read from its parallelized parameters."""

    rank: int
    params: int  # elements held (local shards, tied parameters once)
    weights: int  # bytes allocated for them
    weights_by_dtype: dict[str, int]  # the same bytes by storage dtype ("float32", "bfloat16")
    grads: int  # bytes of gradients after backward (trainable only, FSDP2's padded reduce-scatter output)
    optimizer: int  # bytes of AdamW state: exp_avg + exp_avg_sq (local shards) + one fp32 step per tensor
    fp32_params: int  # elements of fp32 parameters (one process: what the bf16 working copy casts)
    shapes: dict[str, tuple[int, ...]]  # local shape by parameter name
    units: list[Unit]
    param_groups: list[dict]  # the trainer's AdamW groups: {"mesh": dims or None, "params": names}
    largest_tensor: int  # elements of the largest full (global) parameter
    quantized: int = 0  # bytes of the quantized frozen base (lora.base_quantization; included in weights)
    largest_quantized: int = 0  # elements of the largest local quantized tensor (dequantized one at a time)


def rank_state(model, rank: int) -> RankState:
    named = dict(model.named_parameters())  # unique tensors: the tied embedding once
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    names = {id(p): n for n, p in named.items()}
    state = RankState(
        rank=rank,
        params=sum(_local(p).numel() for p in named.values()),
        weights=sum(_allocated(p) for p in named.values()),
        weights_by_dtype={},
        grads=sum(_allocated(p) for p in trainable.values()),
        optimizer=sum(2 * _local(p).numel() * p.element_size() + FP32 for p in trainable.values()),
        fp32_params=sum(p.numel() for p in named.values() if p.dtype == torch.float32),
        shapes={n: tuple(_local(p).shape) for n, p in named.items()},
        units=[],
        param_groups=[{"mesh": list(g["params"][0].device_mesh.mesh_dim_names)
                       if hasattr(g["params"][0], "device_mesh") else None,
                       "params": [names[id(p)] for p in g["params"]]}
                      for g in param_groups_by_mesh(list(trainable.values()))],
        largest_tensor=max(p.numel() for p in named.values()),
    )
    quantized = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    for q in quantized:  # replicated buffers (an EP rank's experts only): counted as allocated
        state.params += math.prod(q.shape)
        state.quantized += q.nbytes
        state.largest_quantized = max(state.largest_quantized, math.prod(q.shape))
    state.weights += state.quantized
    for t in [*named.values(), *(b for q in quantized for b in q.buffers())]:
        key = str(t.dtype).removeprefix("torch.")
        state.weights_by_dtype[key] = state.weights_by_dtype.get(key, 0) + _allocated(t)
    modules = {id(m): n for n, m in model.named_modules()}
    for unit in fsdp_modules(model):
        nested = {id(p) for sub in fsdp_modules(unit) if sub is not unit for p in sub.parameters()}
        own = [p for p in unit.parameters() if id(p) not in nested]
        size = own[0].device_mesh.size() if own else 1
        gathered = sum(_allocated(p) // p.element_size() * size for p in own)
        state.units.append(Unit(modules[id(unit)], size, gathered,
                                sum(_allocated(p) // p.element_size() * size for p in own if p.requires_grad),
                                [names[id(p)] for p in own]))
    return state


_SIMULATED: dict[str, tuple[ModelConfig, list[RankState]]] = {}


def simulate(cfg: Config, world_size: int, device_type: str = "cuda",
             ranks: list[int] | None = None) -> tuple[ModelConfig, list[RankState]]:
    """Per-rank state of ``cfg`` on ``world_size`` GPUs (``ranks``: a subset), meta tensors only.
    Kept per process by (config, world size, device type, ranks): a rank takes ~0.5 s at full depth."""
    key = json.dumps([cfg.to_dict(), world_size, device_type, ranks], sort_keys=True, default=str)
    if key not in _SIMULATED:
        _SIMULATED[key] = _simulate(cfg, world_size, device_type, ranks)
    return _SIMULATED[key]


def _simulate(cfg, world_size, device_type, ranks):
    mc = model_config(cfg)
    if world_size == 1:
        return mc, [rank_state(meta_model(cfg, mc, 0, 1, device_type), 0)]
    if tdist.is_initialized():
        raise ConfigError("a memory plan of several ranks needs a process without a process group "
                          "(it simulates each rank under a fake one)")
    states = []
    for r in ranks if ranks is not None else range(world_size):
        with fake_process_group(r, world_size):
            states.append(rank_state(meta_model(cfg, mc, r, world_size, device_type), r))
    return mc, states


# ---------------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Per-GPU figures of the most loaded rank, in bytes (``as_json``: GiB). ``exact`` names the state
    figures read from the parallelized model; everything else is ``memory_model``'s estimate."""

    gpus: int
    gpu_memory: int
    ep: int
    lora: bool
    checkpointing: bool
    compute_dtype: str
    shape: StepShape
    total_params: int  # text model, all ranks together
    state: RankState  # the rank with the largest state
    ranks: list[RankState]
    gathered_unit: tuple[str, int]  # (name, bytes in the compute dtype) of the largest layer all-gather
    activations: dict[str, int]  # terms at the config's activation checkpointing
    activations_other: int  # the same total with checkpointing toggled
    fsdp_buffers: dict[str, int]
    ce_chunk: int
    load_in_flight: int  # one checkpoint tensor being read (bf16) while the shards fill
    overhead: int
    peak_load: int
    peak_step: int
    dequantized: int = 0  # one quantized tensor dequantized to the compute dtype, plus a chunk's fp32 temporaries
    rl_draws: int = 0  # blockdiff rl: ELBO rows per completion in a micro-batch (0: a training run)
    reference: int = 0  # blockdiff rl, full fine-tuning with rl.kl_beta > 0: the frozen copy of the weights

    exact = ("params_per_gpu", "weights_gib", "grads_gib", "optimizer_gib", "gathered_unit_gib")

    @property
    def fits(self) -> bool:
        return max(self.peak_load, self.peak_step) <= self.gpu_memory

    @property
    def headroom(self) -> int:
        return self.gpu_memory - max(self.peak_load, self.peak_step)

    def as_json(self) -> dict:
        g = lambda b: round(b / GIB, 3)  # noqa: E731
        act = sum(self.activations.values())
        ac_on, ac_off = (act, self.activations_other) if self.checkpointing else (self.activations_other, act)
        return {
            "gpus": self.gpus, "gpu_memory_gib": g(self.gpu_memory), "ep": self.ep, "lora": self.lora,
            "activation_checkpointing": self.checkpointing, "compute_dtype": self.compute_dtype,
            "micro_batch": self.shape.micro_batch, "seq_length": self.shape.seq, "canvas_tokens": self.shape.canvas,
            "total_params": self.total_params, "params_per_gpu": self.state.params,
            "weights_gib": g(self.state.weights), "grads_gib": g(self.state.grads),
            "optimizer_gib": g(self.state.optimizer),
            "gathered_unit": self.gathered_unit[0], "gathered_unit_gib": g(self.gathered_unit[1]),
            "fsdp_buffers_gib": g(sum(self.fsdp_buffers.values())),
            "activations_gib": g(act), "activations_ac_gib": g(ac_on), "activations_no_ac_gib": g(ac_off),
            "ce_chunk_gib": g(self.ce_chunk), "overhead_gib": g(self.overhead),
            "base_quantization_gib": g(self.state.quantized), "dequantized_gib": g(self.dequantized),
            "rl": bool(self.rl_draws), "reference_copy_gib": g(self.reference),
            "peak_load_gib": g(self.peak_load), "peak_step_gib": g(self.peak_step),
            "peak_gib": g(max(self.peak_load, self.peak_step)), "fits": self.fits, "headroom_gib": g(self.headroom),
            "exact": list(self.exact),
            "ranks": [{"rank": s.rank, "params": s.params, "weights_bytes": s.weights, "grads_bytes": s.grads,
                       "optimizer_bytes": s.optimizer} for s in self.ranks],
        }


def _compute_bytes(cfg: Config, device_type: str) -> int:
    return 2 if device_type == "cuda" and cfg.model.dtype == "bfloat16" else FP32


def make_plan(cfg: Config, gpus: int, gpu_memory_gib: float, device_type: str = "cuda", rl: bool = False) -> Plan:
    """The memory plan of ``cfg`` on ``gpus`` GPUs of ``gpu_memory_gib`` GiB each. ``rl``: of ``blockdiff rl``'s
    update, whose micro-batch holds ``train.micro_batch_size`` completions of ``rl.elbo_draws`` rows each, plus
    the frozen reference copy of full fine-tuning with a KL term (LoRA's reference is the adapter-off base).
    The rollouts run without gradients and are not counted."""
    run = copy.deepcopy(cfg)
    apply_world_size(run, gpus)  # the layout checks training makes (ep divides the world, batch sizes)
    mc, ranks = simulate(run, gpus, device_type)
    state = max(ranks, key=lambda s: s.weights + s.grads + s.optimizer)
    draws = run.rl.elbo_draws if rl else 0
    if rl:
        run.train.micro_batch_size *= draws
    reference = state.weights if rl and run.rl.kl_beta > 0 and not run.lora.enabled else 0
    c = _compute_bytes(run, device_type)
    p = run.parallel
    chunk = ObjectiveSettings.from_config(run.objective).chunk_tokens
    shape = StepShape.of(run, c, chunk, fused_ce=device_type == "cuda")

    # gathered per layer: its own unit and its experts' unit (ep > 1) are all-gathered together
    layers: dict[str, list[int]] = {}
    root = (0, 0)
    for u in state.units:
        if u.name == "":
            root = (u.gathered, u.trainable)
        else:
            key = ".".join(u.name.split(".")[:2])
            acc = layers.setdefault(key, [0, 0])
            acc[0], acc[1] = acc[0] + u.gathered, acc[1] + u.trainable
    if gpus == 1 and c < FP32:  # one GPU under bf16: the working copy of every fp32 parameter
        root = (state.fp32_params, 0)
    buffers = fsdp_buffer_terms([tuple(v) for v in layers.values()], root, c, gpus, p.reshard_after_forward)
    big = max(layers.items(), key=lambda kv: kv[1][0], default=("", [0, 0]))
    keep = p.ep > 1 and not p.recompute_expert_exchanges
    acts = activation_terms(mc, shape, p.activation_checkpointing, keep)
    other = sum(activation_terms(mc, shape, not p.activation_checkpointing, keep).values())
    ce = ce_chunk_bytes(mc, shape, rows=shape.micro_batch * max(shape.seq, shape.block))

    # forward (grads freed by the previous step's zero_grad): saved activations, the root unit, the CE chunk;
    # backward: everything saved plus the layer in backward, all FSDP buffers and the gradients
    in_backward = sum(v for k, v in acts.items() if k.startswith("layer in backward"))
    # a quantized base: one tensor at a time is dequantized (forward, recomputation and backward alike)
    dequantized = c * state.largest_quantized + 4 * FP32 * min(state.largest_quantized, CHUNK_ELEMENTS) \
        if state.quantized else 0
    forward = sum(acts.values()) - in_backward + buffers["root unit gathered (embedding / LM head)"] + ce + dequantized
    backward = sum(acts.values()) + sum(buffers.values()) + state.grads + dequantized
    transient = max(forward, backward)
    overhead = overhead_bytes(transient)
    in_flight = state.largest_tensor * 2  # the checkpoint's bf16 tensor being sliced into the local shard
    return Plan(
        gpus=gpus, gpu_memory=int(gpu_memory_gib * GIB), ep=p.ep, lora=run.lora.enabled,
        checkpointing=p.activation_checkpointing, compute_dtype="bfloat16" if c == 2 else "float32", shape=shape,
        total_params=_total_params(mc), state=state, ranks=ranks, gathered_unit=(big[0], c * big[1][0]),
        activations=acts, activations_other=other, fsdp_buffers=buffers, ce_chunk=ce, load_in_flight=in_flight,
        overhead=overhead, peak_load=state.weights + reference + in_flight + overhead_bytes(0),
        peak_step=state.weights + reference + state.optimizer + transient + overhead, dequantized=dequantized,
        rl_draws=draws, reference=reference,
    )


def _total_params(mc: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in DiffusionGemma(mc).parameters())
