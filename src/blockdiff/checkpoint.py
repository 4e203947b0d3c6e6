"""Training checkpoints: atomic, safetensors + JSON only (nothing is ever unpickled).

Layout of a run directory::

    checkpoints/step_00000100/{model.safetensors, optimizer.safetensors, meta.json}
    checkpoints/latest          # text file naming the newest COMPLETE checkpoint

A checkpoint is written into a hidden temp directory, every file fsynced, then renamed into place;
only then is ``latest`` replaced (write temp + fsync + rename). A crash at any moment leaves ``latest``
naming a complete checkpoint (or absent). Old checkpoints rotate by keep-last-K.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

FORMAT = "blockdiff-train-checkpoint-v1"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
        for p in group["params"]:
            name = next(n for n, q in params.items() if q is p)
            if name in state:
                optimizer.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in state[name].items()}


def save_checkpoint(run_dir, step: int, model, optimizer, meta: dict, keep_last: int = 2) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".step_{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        save_file(optimizer_tensors(model, optimizer), str(tmp / "optimizer.safetensors"))
        with open(tmp / "meta.json", "w") as f:
            json.dump({"format": FORMAT, "step": step, **meta}, f, indent=1)
        for p in tmp.iterdir():
            _fsync_file(p)
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint ({e.strerror or e}); the previous checkpoint is intact",
                              file=str(final)) from None
    write_atomic_text(ckpt_root / "latest", final.name + "\n")
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
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"not a blockdiff training checkpoint (format {meta.get('format')!r})",
                              file=str(path / "meta.json"))
    model_file = str(path / "model.safetensors")
    try:
        state = load_file(model_file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupted or unreadable tensor file: {e}", file=model_file) from None
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
    model.load_state_dict(state, strict=True)
    if optimizer is not None:
        opt_file = str(path / "optimizer.safetensors")
        try:
            tensors = load_file(opt_file)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"corrupted or unreadable tensor file: {e}", file=opt_file) from None
        load_optimizer_tensors(model, optimizer, tensors, opt_file)
    return meta
