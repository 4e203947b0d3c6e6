"""Training checkpoints: atomic, safetensors + JSON only (nothing is ever unpickled).

Layout of a run directory::

    checkpoints/step_00000100/{model.safetensors, optimizer.safetensors, meta.json}
    checkpoints/latest          # text file naming the newest COMPLETE checkpoint

A checkpoint is written into a hidden temp directory, every file fsynced, then renamed into place;
only then is ``latest`` replaced (write temp + fsync + rename). A crash at any moment leaves ``latest``
naming a complete checkpoint (or absent). Old checkpoints rotate by keep-last-K.

Sharded runs (``blockdiff.parallel.parallelize``, world size > 1) write ``torch.distributed.checkpoint`` (DCP)
checkpoints in the same layout: ``step_N/{__*_*.distcp, .metadata, meta.json}``. Every rank writes
its own shards into the shared hidden temp directory (no gathering to one rank); after a barrier rank 0
writes meta.json, fsyncs, renames and only then moves ``latest``. Tensors are saved in their GLOBAL
layout (expert slices as [E, ...] DTensors), so a checkpoint loads on any world size / ep (DCP
reshards). Optimizer state is keyed by parameter name as well. A single-process checkpoint loads into a
sharded model and a sharded one into a single process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import distribute_tensor

from blockdiff.errors import CheckpointError
from blockdiff.fsutil import fsync_path, fsync_tree
from blockdiff.lora import checkpoint_state, has_lora, trainable_state_dict
from blockdiff.parallel.parallelize import global_view, is_dtensor, is_sharded, reshard_all

FORMAT = "blockdiff-train-checkpoint-v1"
DCP_FORMAT = "blockdiff-train-checkpoint-dcp-v1"


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state keyed by parameter name (stable across runs, unlike optimizer indices)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                out[f"{names[id(p)]}::{key}"] = t.detach().to("cpu").contiguous()
    return out


def load_optimizer_tensors(model, optimizer, tensors: dict[str, torch.Tensor], file: str) -> None:
    params = dict(model.named_parameters())
    state: dict[str, dict] = {}
    for full, t in tensors.items():
        name, key = full.split("::", 1)
        if name not in params:
            raise CheckpointError(f"optimizer state for unknown parameter '{name}'", file=file)
        state.setdefault(name, {})[key] = t
    for group in optimizer.param_groups:
        # AdamW keeps "step" on the CPU, except fused / capturable AdamW, which reads it on the device
        step_on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            name = next(n for n, q in params.items() if q is p)
            if name in state:
                optimizer.state[p] = {k: v.to(p.device) if k != "step" or step_on_device else v
                                      for k, v in state[name].items()}


def save_checkpoint(run_dir, step: int, model, optimizer, meta: dict, keep_last: int = 2) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".step_{step:08d}.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        own, extra = checkpoint_state(model)  # a LoRA model stores its adapters only, never the frozen base
        state = {k: v.detach().to("cpu").contiguous() for k, v in own.items()}
        save_file(state, str(tmp / "model.safetensors"))
        save_file(optimizer_tensors(model, optimizer), str(tmp / "optimizer.safetensors"))
        with open(tmp / "meta.json", "w") as f:
            json.dump({"format": FORMAT, "step": step, **meta, **extra}, f, indent=1)
        fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(ckpt_root)
    except (OSError, SafetensorError) as e:  # safetensors reports I/O errors (disk full, ...) as SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint ({getattr(e, 'strerror', None) or e}); the previous "
                              "checkpoint is intact", file=str(final)) from None
    try:
        write_atomic_text(ckpt_root / "latest", final.name + "\n")
    except OSError as e:
        raise CheckpointError(f"could not update the 'latest' pointer ({e.strerror or e}); it still names the "
                              "previous checkpoint", file=str(ckpt_root / "latest")) from None
    rotate(ckpt_root, keep_last)
    return final


def rotate(ckpt_root: Path, keep_last: int) -> None:
    done = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".step_*.tmp-*"):  # left by a crash mid-save
        if stale.name.split("-")[-1] != str(os.getpid()):
            shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "meta.json").exists():
        raise CheckpointError("'latest' names a checkpoint that is missing or incomplete", file=str(path))
    return path


def load_checkpoint(path, model, optimizer=None) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable checkpoint metadata: {e}", file=str(path / "meta.json")) from None
    if meta.get("format") == DCP_FORMAT or is_sharded(model):
        if meta.get("format") not in (FORMAT, DCP_FORMAT):
            raise CheckpointError(f"not a blockdiff training checkpoint (format {meta.get('format')!r})",
                                  file=str(path / "meta.json"))
        if meta.get("adapters_only") and not has_lora(model):
            raise CheckpointError("this checkpoint holds LoRA adapters only: apply_lora to the base model before "
                                  "loading it", file=str(path / "meta.json"), field="adapters_only")
        _load_into(path, meta, model, optimizer)
        return meta
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"not a blockdiff training checkpoint (format {meta.get('format')!r})",
                              file=str(path / "meta.json"))
    model_file = str(path / "model.safetensors")
    try:
        state = load_file(model_file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupted or unreadable tensor file: {e}", file=model_file) from None
    adapters_only = bool(meta.get("adapters_only"))
    if adapters_only:  # LoRA run: the frozen base comes from the base model, the checkpoint has the adapters
        if not has_lora(model):
            raise CheckpointError("this checkpoint holds LoRA adapters only: apply_lora to the base model before "
                                  "loading it", file=str(path / "meta.json"), field="adapters_only")
        own = trainable_state_dict(model)
    else:
        own = model.state_dict()
    for name, t in state.items():
        if name not in own:
            raise CheckpointError("checkpoint holds a tensor this model does not have", file=model_file, field=name)
        if tuple(t.shape) != tuple(own[name].shape):
            raise CheckpointError(f"shape {list(t.shape)} but the model expects {list(own[name].shape)} "
                                  "(a checkpoint of another model?)", file=model_file, field=name)
    missing = [n for n in own if n not in state]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}", file=model_file)
    model.load_state_dict(state, strict=not adapters_only)
    if optimizer is not None:
        opt_file = str(path / "optimizer.safetensors")
        try:
            tensors = load_file(opt_file)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"corrupted or unreadable tensor file: {e}", file=opt_file) from None
        load_optimizer_tensors(model, optimizer, tensors, opt_file)
    return meta


# ---------------------------------------------------------------------------------------- sharded (DCP)


def _init_optimizer_state(model, optimizer) -> None:
    """Materialise AdamW state for every param (a step with zero grads and lr 0), so DCP has targets."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p not in optimizer.state]
    if not params:
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()  # decoupled weight decay is lr * wd = 0: params unchanged
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    for p in params:
        p.grad = None


def _dcp_state(model, optimizer) -> dict:
    """name -> tensor in the global layout (DTensors share storage with params / optimizer state)."""
    if is_sharded(model):
        reshard_all(model)
    # a LoRA model stores its adapters only, never the frozen base (as save_checkpoint does)
    keep = {n for n, p in model.named_parameters() if p.requires_grad} if has_lora(model) else None
    out = {}
    for name, t in model.state_dict().items():
        if keep is None or name in keep:
            out[f"model.{name}"] = global_view(model, name, t)
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        out[f"optim.{names[id(p)]}.{key}"] = global_view(model, names[id(p)], value)
    return out


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_sharded_checkpoint(run_dir, step: int, model, optimizer, meta: dict, keep_last: int = 2) -> Path:
    """Collective: every rank calls it. DCP save into a temp dir, then rank 0 publishes it atomically."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".step_{step:08d}.tmp-dcp"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    error = None
    try:
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(tmp))
    except Exception as e:  # noqa: BLE001  (reported below, after every rank got here)
        error = e
    failed = torch.tensor([1.0 if error is not None else 0.0])
    if torch.distributed.is_initialized():
        dev = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        failed = failed.to(dev)
        torch.distributed.all_reduce(failed)
    if float(failed) > 0:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write sharded checkpoint ({error or 'on another rank'}); the previous "
                              "checkpoint is intact", file=str(final))
    if rank == 0:
        try:
            with open(tmp / "meta.json", "w") as f:
                extra = {"adapters_only": True} if has_lora(model) else {}
                json.dump({"format": DCP_FORMAT, "step": step, **meta, **extra}, f, indent=1)
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(ckpt_root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not publish checkpoint ({e.strerror or e}); the previous checkpoint is "
                                  "intact", file=str(final)) from None
        write_atomic_text(ckpt_root / "latest", final.name + "\n")
        rotate(ckpt_root, keep_last)
    _barrier()
    return final


def _load_into(path: Path, meta: dict, model, optimizer) -> None:
    """Load a DCP checkpoint (any world size / ep) or a single-process one into a (sharded) model."""
    if optimizer is not None:
        _init_optimizer_state(model, optimizer)
    state = _dcp_state(model, optimizer)
    if meta.get("format") == DCP_FORMAT:
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot load sharded checkpoint: {str(e).splitlines()[0][:500]}",
                                  file=str(path)) from None
        return
    # single-process safetensors checkpoint -> every rank reads the file and copies its own shard
    files = {"model": path / "model.safetensors", "optim": path / "optimizer.safetensors"}
    loaded = {}
    for kind, f in files.items():
        if kind == "optim" and optimizer is None:
            continue
        try:
            for k, v in load_file(str(f)).items():
                loaded[f"model.{k}" if kind == "model" else "optim." + k.replace("::", ".")] = v
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"corrupted or unreadable tensor file: {e}", file=str(f)) from None
    with torch.no_grad():
        for key, target in state.items():
            if key not in loaded:
                raise CheckpointError("checkpoint lacks a tensor this model has", file=str(path), field=key)
            src = loaded[key]
            if tuple(src.shape) != tuple(target.shape):
                raise CheckpointError(f"shape {list(src.shape)} but the model expects {list(target.shape)}",
                                      file=str(path), field=key)
            if is_dtensor(target):
                piece = distribute_tensor(src.to(target.device_mesh.device_type), target.device_mesh,
                                          target.placements, src_data_rank=None)
                target.to_local().copy_(piece.to_local())
            else:
                target.copy_(src)
