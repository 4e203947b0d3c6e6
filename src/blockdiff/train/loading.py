"""Building the model a run trains, torchtitan's way: on the ``meta`` device, then parallelized, then each
rank allocates and fills only its own shards.

``build_training_model(cfg, dist)`` from a checkpoint (``model.name_or_path``), on any world size (one
process included):

1. the model on ``meta`` (no memory), LoRA applied (the frozen base cast to bf16 on GPU when
   ``model.dtype: bfloat16``: it never exists in fp32), the router frozen;
2. ``parallel.parallelize`` (FSDP2 + EP + activation checkpointing + compile) on the meta model;
3. ``to_empty`` on this rank's device: only the local shards are allocated (FSDP2's dim-0 ``Shard(0)``
   chunks, padded to equal size; expert tensors first sliced by EP rank, then sharded over ``edp``);
4. every local shard is filled from the safetensors files with exactly its rows: ``Checkpoint.read``
   reads a dim-0 row range through ``safe_open(...).get_slice`` over the memory-mapped file, so a rank
   reads about 1/W of the dense tensors and 1/W of the experts, and holds at most one row slice
   beyond its shard at any moment (the masters are fp32 for the local shard only);
5. what the checkpoint lacks gets the single-process values: the LoRA adapters' init is drawn for the
   WHOLE tensor, one tensor at a time, from the generator state ``apply_lora`` would have drawn it from,
   then sliced (``lora.initial_adapter_values``): identical on every world size; the rotary tables are
   recomputed.

Reading: safetensors slicing rather than ``torch.distributed.checkpoint`` with an HF storage reader. The
slice read needs no collective and no planner, reads each row once, maps our names (the encoder's
``layer_scalar``, LoRA's ``.base``, the expert slice of an EP rank) with the same code the one-process
``load_pretrained`` uses, and reports missing or mis-shaped tensors with the same messages.

Random init (``model.from_config``: demo, benchmarks, tests) builds the full model on every rank and
shards it as before, so its values stay bit-identical to the single-process run.

Each rank logs one INFO line: tensors, bytes read, local shard bytes, seconds.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, Shard

from blockdiff.config.schema import Config
from blockdiff.errors import ConfigError
from blockdiff.lora import adapter_param_names, apply_lora, base_param_name, initial_adapter_values
from blockdiff.lora.quantize import fill_quantized, quantized_weights
from blockdiff.model.config import ModelConfig
from blockdiff.model.diffusion_gemma import DiffusionGemma
from blockdiff.model.hf import io as hf_io, load as hf_load
from blockdiff.model.hf.io import rebuild_rotary
from blockdiff.model.hf.load import CONFIG, Checkpoint, HUB_ID, attach_source, hub_offline
from blockdiff.objective.loss import freeze_router
from blockdiff.parallel.distributed import DistInfo
from blockdiff.parallel.parallelize import parallel_state, parallelize

log = logging.getLogger("blockdiff")


def model_config(cfg: Config) -> ModelConfig:
    """The text-model config of a run, from ``model.from_config`` or the checkpoint's config.json alone
    (a local dir, or only config.json fetched for a hub id), at ``model.num_layers`` depth."""
    if cfg.model.from_config is not None:  # as build_model builds it
        try:
            return ModelConfig.from_hf(hf_load.as_hf_config(_from_config_kwargs(cfg)))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot build the model config: {e}", field="model.from_config") from None
    name = cfg.model.name_or_path
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / hf_load.CONFIG).is_file():
            raise ConfigError(f"{path} holds no {hf_load.CONFIG} (the run's architecture is read from it)",
                              field="model.name_or_path")
        ckpt_dir = path
    else:
        ckpt_dir = _hub_config_dir(name)
    try:
        mc = ModelConfig.from_hf(hf_load.read_hf_config(ckpt_dir))
    except ValueError as e:
        raise ConfigError(str(e), file=ckpt_dir / hf_load.CONFIG) from None
    return hf_load.reduce_depth(mc, cfg.model.num_layers)


def _hub_config_dir(name: str) -> Path:
    """The directory holding only config.json of a hub model (downloaded, or from the HF cache)."""
    if not HUB_ID.match(name):
        raise ConfigError(f"{name}: no such model directory (and not a hub id like 'org/name')",
                          field="model.name_or_path")
    from huggingface_hub import hf_hub_download  # only a hub id needs it

    try:
        return Path(hf_hub_download(name, CONFIG, local_files_only=hub_offline())).parent
    except Exception as e:  # offline, unknown repo, gated: one line, whatever the hub library raised
        raise ConfigError(f"cannot fetch {CONFIG} of {name} ({type(e).__name__}); pass a local directory that "
                          f"holds it", field="model.name_or_path") from None


def _from_config_kwargs(cfg: Config) -> dict:
    kwargs = dict(cfg.model.from_config)
    if cfg.model.num_layers:
        kwargs["text_config"] = {**kwargs.get("text_config", {}), "num_hidden_layers": cfg.model.num_layers}
    return kwargs


def build_model(cfg: Config, device: torch.device):
    """The plain (unsharded, adapter-free) fp32 model of the run on ``device`` (export, tests, tools)."""
    if cfg.model.from_config is not None:
        return hf_io.from_config(_from_config_kwargs(cfg), dtype=torch.float32, device=device,
                                 attn_backend=cfg.model.attn_backend, seed=cfg.train.seed)
    return hf_io.load_pretrained(cfg.model.name_or_path, dtype=torch.float32, device=device,
                                 attn_backend=cfg.model.attn_backend, num_layers=cfg.model.num_layers)


def _prepare(model, cfg: Config, device: torch.device) -> None:
    """LoRA (base frozen, adapters trainable) and the frozen router, as the run asks."""
    if cfg.lora.enabled:
        # the frozen base is stored in bf16 on GPU (adapters stay fp32 masters)
        bf16_base = device.type == "cuda" and cfg.model.dtype == "bfloat16"
        apply_lora(model, cfg.lora, base_dtype=torch.bfloat16 if bf16_base else None)
        if cfg.lora.base_quantization != "none":  # on meta: empty containers, filled by fill_local_shards
            from blockdiff.lora.quantize import quantize_frozen_base_

            quantize_frozen_base_(model, cfg.lora.base_quantization)
    if cfg.objective.freeze_router:
        freeze_router(model)


def build_training_model(cfg: Config, dist: DistInfo):
    """The model this rank trains: LoRA and the frozen router applied, parallelized, weights in place."""
    if cfg.model.from_config is not None:  # random init: built whole on every rank, then sharded
        model = build_model(cfg, dist.device)
        _prepare(model, cfg, dist.device)
        return parallelize(model, cfg, dist)
    t0 = time.perf_counter()
    with Checkpoint(cfg.model.name_or_path) as ckpt:
        config = ckpt.model_config(cfg.model.num_layers)
        with torch.device("meta"):
            model = DiffusionGemma(config, attn_backend=cfg.model.attn_backend)
        adapter_rng = _rng_state(dist.device)  # what apply_lora draws the adapters' init from on a real device
        _prepare(model, cfg, dist.device)
        model = parallelize(model, cfg, dist)
        model.to_empty(device=dist.device)
        stats = fill_local_shards(model, ckpt, dist.device, adapter_rng)
        attach_source(model, ckpt)
    stats.seconds = time.perf_counter() - t0
    model._blockdiff_load = stats
    log.info("rank %d: loaded %d tensors in %.1f s: %.3f GiB read of the checkpoint's %.3f GiB, local shard "
             "%.3f GiB", dist.rank, stats.tensors, stats.seconds, stats.bytes_read / 2**30,
             stats.checkpoint_bytes / 2**30, stats.resident_bytes / 2**30)
    return model


# ---------------------------------------------------------------------------------------- filling shards


@dataclass
class LoadStats:
    tensors: int = 0
    bytes_read: int = 0  # tensor bytes this rank read from the checkpoint files
    checkpoint_bytes: int = 0  # stored bytes of the checkpoint tensors the model holds (all ranks together)
    resident_bytes: int = 0  # bytes of this rank's parameter and buffer storage (its shard)
    seconds: float = 0.0


def local_rows(model, name: str, t: torch.Tensor) -> tuple[int, int] | None:
    """Dim-0 rows [start, stop) of the WHOLE tensor (the checkpoint's layout) that ``t`` holds on this rank;
    None when it holds all of it. FSDP2's ``Shard(0)`` gives mesh rank i the i-th ``ceil(n / size)`` rows;
    an EP rank's expert tensors start at its first global expert (``parallelize``)."""
    st = parallel_state(model)
    if st is None or not isinstance(t, DTensor):
        return None
    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise NotImplementedError(f"{name}: placement {t.placements} on a {t.device_mesh.ndim}-D mesh")
    n, parts = t.shape[0], t.device_mesh.size()
    chunk = math.ceil(n / parts)
    start = min(t.device_mesh.get_local_rank() * chunk, n)
    stop = min(start + chunk, n)
    if t.to_local().shape[0] != stop - start:
        raise RuntimeError(f"{name}: local shard has {t.to_local().shape[0]} rows, expected {stop - start}")
    offset = st.expert_offset if name in st.expert_names else 0
    return offset + start, offset + stop


def global_shape(model, name: str, t: torch.Tensor) -> tuple[int, ...]:
    """The whole tensor's shape: expert tensors of an EP rank count all experts."""
    st = parallel_state(model)
    if st is not None and name in st.expert_names:
        return (t.shape[0] * st.ep, *t.shape[1:])
    return tuple(t.shape)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def fill_local_shards(model, ckpt, device: torch.device, adapter_rng=None) -> LoadStats:
    """Fill every local shard of ``model`` (allocated, uninitialised): checkpoint tensors row by row from
    ``ckpt``, LoRA adapters with their single-process init (drawn from ``adapter_rng``), rotary tables."""
    targets = model.state_dict(keep_vars=True)  # persistent tensors: the checkpoint's and the adapters'
    adapters = adapter_param_names(model)
    plain = {base_param_name(n, model): n for n in targets if n not in adapters}
    quantized = quantized_weights(model)  # frozen base quantized as it is read (not in the state dict)
    stored = ckpt.text_tensors([*plain, *quantized], model.config.num_layers)
    stats = LoadStats(checkpoint_bytes=ckpt.stored_bytes(stored.values()))
    st = parallel_state(model)
    if quantized:  # replicated over data-parallel ranks; expert tensors hold this EP rank's experts
        def read_rows(name, rows):
            q = quantized[name]
            return ckpt.read(stored[name], (q.shape[0] * (st.ep if expert(name) else 1), *q.shape[1:]), rows)

        expert = lambda name: st is not None and name in st.expert_names  # noqa: E731
        stats.tensors += fill_quantized(model, read_rows, device,
                                        first_row=lambda name: st.expert_offset if expert(name) else 0)
    for ours, hf_name in stored.items():
        if ours in quantized:
            continue
        name = plain[ours]
        t = targets[name]
        rows = local_rows(model, name, t)
        _local(t).copy_(ckpt.read(hf_name, global_shape(model, name, t), rows))  # casts to the param's dtype
        stats.tensors += 1
    if adapters:
        if adapter_rng is not None:
            _set_rng_state(adapter_rng, device)
        for name, value in initial_adapter_values(model, device):  # one whole tensor at a time
            rows = local_rows(model, name, targets[name])
            _local(targets[name]).copy_(value if rows is None else value[rows[0]:rows[1]])
            del value  # before the generator draws the next one
    rebuild_rotary(model, device)
    stats.bytes_read = ckpt.bytes_read
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        s = _local(t).untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    stats.resident_bytes = sum(storages.values())
    return stats


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
