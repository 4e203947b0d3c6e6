"""Checkpoint I/O in transformers' DiffusionGemma format (safetensors only).

- ``load_pretrained`` (``hf_load``, re-exported here): local dir or hub id -> DiffusionGemma, built on
  ``meta`` and filled tensor by tensor from (possibly sharded) safetensors. Tensors we do not model
  (vision tower, embed_vision) are not loaded, only remembered in ``model.hf_source`` so an export can
  carry them through.
- ``save_pretrained``: a directory ``DiffusionGemmaForBlockDiffusion.from_pretrained`` loads with no
  missing/unexpected keys; written shard by shard into a temp dir that is renamed at the end.
- ``from_config``: random-init model plus the transformers config it came from (for export).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..fsutil import fsync_path
from . import hf_names
from .config import FULL, ModelConfig
from .diffusion_gemma import DiffusionGemma
from .hf_load import (CONFIG, EXPECTED_MODEL_TYPE, HUB_PATTERNS, INDEX, SINGLE, _ST_ITEMSIZE,  # noqa: F401
                      _materialize, _open_safetensors, _read_json, _read_tensor, _rebuild_rotary, load_pretrained,
                      read_hf_config, resolve_checkpoint_dir, weight_map)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model")


# ---- building from a config --------------------------------------------------------------------


def _as_hf_config(hf_config_or_kwargs):
    import transformers

    if isinstance(hf_config_or_kwargs, dict):
        return transformers.DiffusionGemmaConfig(**hf_config_or_kwargs)
    return hf_config_or_kwargs


@torch.no_grad()
def from_config(hf_config_or_kwargs, dtype: torch.dtype = torch.float32, device="cpu", attn_backend: str = "auto",
                seed: int = 0) -> DiffusionGemma:
    """Random-init model (reference init) from a DiffusionGemmaConfig or its kwargs."""
    hf_config = _as_hf_config(hf_config_or_kwargs)
    config = ModelConfig.from_hf(hf_config)
    device = torch.device(device)
    model = _materialize(config, dtype, device, attn_backend)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):  # init_weights' randn then draws on the device, with the device generator
        model.init_weights(gen)
    _rebuild_rotary(model, device)
    model.hf_config = hf_config
    model.hf_source = None
    return model


# ---- saving ------------------------------------------------------------------------------------


def copy_tokenizer(src_dir, out_dir) -> list[str]:
    """Copy the tokenizer files present in ``src_dir`` (and generation_config.json) to ``out_dir``."""
    copied = []
    for name in TOKENIZER_FILES + ("generation_config.json",):
        src = Path(src_dir) / name
        if src.is_file():
            shutil.copyfile(src, Path(out_dir) / name)
            copied.append(name)
    return copied


def _config_for_export(model: DiffusionGemma, source_dir: Path | None, dtype: torch.dtype) -> dict:
    """config.json content: the source's (or the stored transformers config), depth-matched."""
    if source_dir is not None:
        cfg = _read_json(source_dir / CONFIG)
    elif getattr(model, "hf_config", None) is not None:
        cfg = model.hf_config.to_dict()
    else:
        raise CheckpointError("model has neither a source checkpoint nor an hf_config to write config.json from")
    text = cfg["text_config"]
    n = model.config.num_layers
    if text.get("num_hidden_layers") != n:
        text["num_hidden_layers"] = n
        text["layer_types"] = list(text["layer_types"][:n])
        if isinstance(text.get("per_layer_config"), dict):
            text["per_layer_config"] = {k: v for k, v in text["per_layer_config"].items() if int(k) < n}
    cfg["architectures"] = ["DiffusionGemmaForBlockDiffusion"]
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    return cfg


def _fresh_carried_tensors(model: DiffusionGemma, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Vision tower + embed_vision initialised by transformers (for models without a source)."""
    import transformers
    from transformers.models.diffusion_gemma import modeling_diffusion_gemma as mdg

    hf_config = _as_hf_config(model.hf_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tower = transformers.AutoModel.from_config(hf_config.vision_config)
        embedder = mdg.DiffusionGemmaMultimodalEmbedder(hf_config.vision_config, hf_config.text_config)
        torch.nn.init.normal_(embedder.embedding_projection.weight, std=hf_config.initializer_range)
    out = {}
    for prefix, module in (("model.encoder.vision_tower.", tower), ("model.encoder.embed_vision.", embedder)):
        for k, v in module.state_dict().items():
            out[prefix + k] = v.detach().to(dtype).contiguous()
    return out


def _shard_plan(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    shards, current, used = [], [], 0
    for name, size in sizes:
        if current and used + size > max_shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


def _is_export(path: Path) -> bool:
    return (path / CONFIG).is_file() and ((path / SINGLE).is_file() or (path / INDEX).is_file())


def _check_overwritable(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not _is_export(out_dir))):
        raise CheckpointError("refusing to overwrite a path that is not a previous export", file=out_dir)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` to ``out_dir``; a previous export there is removed only afterwards."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _carried_entries(source: Path, stack: contextlib.ExitStack) -> dict[str, tuple[int, Callable]]:
    """Not-modelled tensors of ``source``: name -> (stored byte size, reader). Read in the stored dtype,
    so the exported bytes are identical."""
    handles: dict[str, Any] = {}

    def handle(file: str):
        if file not in handles:
            f = stack.enter_context(_open_safetensors(source / file))
            handles[file] = (f, set(f.keys()))
        return handles[file]

    entries = {}
    for name, file in weight_map(source).items():
        if hf_names.from_hf(name) is not None or hf_names.is_tied_alias(name):
            continue
        f, keys = handle(file)
        if name not in keys:
            raise CheckpointError(f"missing tensor {name} to carry over", file=source / file, field=name)
        sl = f.get_slice(name)
        nbytes = math.prod(sl.get_shape()) * _ST_ITEMSIZE.get(sl.get_dtype().upper(), 4)
        entries[name] = (nbytes, lambda n=name, fl=file: _read_tensor(handle(fl)[0], source / fl, n))
    return entries


@torch.no_grad()
def save_pretrained(model: DiffusionGemma, out_dir, max_shard_size: int = 2 * 1024**3, dtype: torch.dtype | None = None,
                    source_dir=None) -> Path:
    out_dir = Path(out_dir).resolve()
    src = getattr(model, "hf_source", None)
    source = Path(source_dir).resolve() if source_dir is not None else (Path(src["dir"]) if src else None)
    dtype = dtype or next(model.parameters()).dtype
    if model.config.layer_types[-1] != FULL:
        warnings.warn("exporting a model whose last layer is not full attention: transformers forces the last "
                      "layer to full_attention, so it will not load this export", stacklevel=2)

    # name -> (byte size, producer). Producers run one shard at a time, so only that shard is in memory.
    entries: dict[str, tuple[int, Callable[[], torch.Tensor]]] = {
        hf_names.to_hf(ours): (t.numel() * dtype.itemsize, lambda t=t: t.detach().to("cpu", dtype).contiguous())
        for ours, t in model.state_dict().items()
    }
    _check_overwritable(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with contextlib.ExitStack() as stack:
            carried = _carried_entries(source, stack) if source is not None else {}
            entries.update(carried)
            if not carried:  # no source (from_config) or a text-only source: transformers' own init
                entries.update({n: (t.numel() * t.element_size(), lambda t=t: t)
                                for n, t in _fresh_carried_tensors(model, dtype).items()})
            shards = _shard_plan([(n, size) for n, (size, _) in entries.items()], max_shard_size)
            files = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                       for i in range(len(shards))]
            for file, shard in zip(files, shards):
                part = tmp / (file + ".partial")
                save_file({n: entries[n][1]() for n in shard}, os.fspath(part), metadata={"format": "pt"})
                fsync_path(part)
                os.replace(part, tmp / file)
        _write_json(tmp / CONFIG, _config_for_export(model, source, dtype))
        if source is not None:
            copy_tokenizer(source, tmp)
        if len(shards) > 1:  # the index last: it is what makes the shards a checkpoint
            _write_json(tmp / INDEX, {"metadata": {"total_size": sum(size for size, _ in entries.values())},
                                      "weight_map": {n: f for f, shard in zip(files, shards) for n in shard}})
        fsync_path(tmp)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written export behind
        raise
    if source is not None and source == out_dir:  # saved over the source: point at the new layout
        model.hf_source = {"dir": str(out_dir), "carried": {n: f for n, f in weight_map(out_dir).items()
                                                            if n in carried}}
    return out_dir


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
