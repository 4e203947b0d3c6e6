"""Checkpoint I/O in transformers' DiffusionGemma format (safetensors only).

- ``load_pretrained``: local dir or hub id -> DiffusionGemma, built on ``meta`` and filled tensor by
  tensor from (possibly sharded) safetensors. Tensors we do not model (vision tower, embed_vision)
  are not loaded, only remembered in ``model.hf_source`` so an export can carry them through.
- ``save_pretrained``: a directory ``DiffusionGemmaForBlockDiffusion.from_pretrained`` loads with no
  missing/unexpected keys; written shard by shard into a temp dir that is renamed at the end.
- ``from_config``: random-init model plus the transformers config it came from (for export).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..fsutil import fsync_path
from . import hf_names
from .config import FULL, ModelConfig
from .diffusion_gemma import DiffusionGemma

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"]
EXPECTED_MODEL_TYPE = "diffusion_gemma"
_ST_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LAYER = re.compile(r"^layers\.(\d+)\.")


# ---- resolving a checkpoint --------------------------------------------------------------------


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; re-read it so a late setting counts.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint_dir(path_or_hub_id, revision: str | None = None) -> Path:
    """A local directory, or a hub snapshot (downloaded or from the HF cache)."""
    path = Path(os.path.expanduser(os.fspath(path_or_hub_id)))
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise CheckpointError("expected a checkpoint directory, got a file", file=path)
    name = os.fspath(path_or_hub_id)
    if not _HUB_ID.match(name):
        raise CheckpointError("no such checkpoint directory (and not a hub id like 'org/name')", file=name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    not_local = f"(and no local directory {name!r} exists)"
    offline_msg = (f"cannot download {name}: offline / no network; pass a local directory or "
                   f"pre-populate the HF cache {not_local}")
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS,
                                      local_files_only=_offline()))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise CheckpointError(f"cannot download {name} {not_local}: {type(e).__name__}: {e}") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as e:
        # Connection failures surface as LocalEntryNotFoundError (nothing cached) or OSError subclasses.
        raise CheckpointError(f"{offline_msg} ({type(e).__name__})") from e
    except Exception as e:  # e.g. httpx transport errors that escape huggingface_hub
        if "connect" in type(e).__name__.lower() or "timeout" in type(e).__name__.lower():
            raise CheckpointError(f"{offline_msg} ({type(e).__name__})") from e
        raise


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError("file not found", file=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"not valid JSON: {e}", file=path) from None


def read_hf_config(ckpt_dir: Path):
    """transformers.DiffusionGemmaConfig of a checkpoint, refusing other model types."""
    import transformers

    raw = _read_json(ckpt_dir / CONFIG)
    found = raw.get("model_type")
    if found != EXPECTED_MODEL_TYPE:
        raise CheckpointError(f"model_type is {found!r}, expected {EXPECTED_MODEL_TYPE!r}",
                              file=ckpt_dir / CONFIG, field="model_type")
    try:
        return transformers.DiffusionGemmaConfig.from_pretrained(ckpt_dir)
    except Exception as e:  # transformers raises assorted types for bad fields
        raise CheckpointError(f"cannot parse: {type(e).__name__}: {e}", file=ckpt_dir / CONFIG) from e


def weight_map(ckpt_dir: Path) -> dict[str, str]:
    """{checkpoint tensor name: file name} of a single-file or sharded safetensors checkpoint."""
    index = ckpt_dir / INDEX
    if index.is_file():
        wm = _read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError("no 'weight_map' in index", file=index, field="weight_map")
        for f in sorted(set(wm.values())):
            if not (ckpt_dir / f).is_file():
                held = [n for n, fl in wm.items() if fl == f]
                raise CheckpointError(f"shard file {f} listed in {INDEX} is missing (it holds tensor {held[0]}"
                                      f"{f' and {len(held) - 1} more' if len(held) > 1 else ''})",
                                      file=ckpt_dir / f, field=held[0])
        return dict(wm)
    single = ckpt_dir / SINGLE
    if single.is_file():
        with _open_safetensors(single) as f:
            return {k: SINGLE for k in f.keys()}
    pickled = [p.name for p in ckpt_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickled:
        raise CheckpointError(f"found only {', '.join(sorted(pickled))}: only safetensors are read "
                              "(pickled checkpoints are never unpickled); convert it to safetensors first",
                              file=ckpt_dir)
    raise CheckpointError(f"no {SINGLE} or {INDEX}", file=ckpt_dir)


@contextlib.contextmanager
def _open_safetensors(path: Path):
    try:
        handle = safe_open(os.fspath(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError: truncated header/data, bad JSON, ...
        raise CheckpointError(f"corrupted or truncated safetensors file: {e}", file=path) from e
    with handle as f:
        yield f


def _read_tensor(f, path: Path, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"cannot read tensor {name}: {e}", file=path, field=name) from e


# ---- loading -----------------------------------------------------------------------------------


def _reduce_depth(cfg: ModelConfig, num_layers: int | None) -> ModelConfig:
    if num_layers is None or num_layers == cfg.num_layers:
        return cfg
    if not 1 <= num_layers <= cfg.num_layers:
        raise CheckpointError(f"num_layers={num_layers} not in 1..{cfg.num_layers}", field="num_layers")
    n = num_layers
    return dataclasses.replace(cfg, layer_types=cfg.layer_types[:n], head_dims=cfg.head_dims[:n],
                               kv_heads=cfg.kv_heads[:n])


def _layer_of(our_name: str) -> int | None:
    m = _LAYER.match(our_name)
    return int(m.group(1)) if m else None


def _materialize(config: ModelConfig, dtype, device, attn_backend) -> DiffusionGemma:
    """Allocate (uninitialised) on ``device`` without ever building fp32 weights on the CPU."""
    with torch.device("meta"):
        model = DiffusionGemma(config, attn_backend=attn_backend)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    return model


def _rebuild_rotary(model: DiffusionGemma, device) -> None:
    # The rope tables are non-persistent buffers (garbage after to_empty): recompute them.
    model.rotary.__init__(model.config)
    model.rotary.to(device)


@torch.no_grad()
def load_pretrained(path_or_hub_id, dtype: torch.dtype = torch.float32, device="cpu", attn_backend: str = "auto",
                    num_layers: int | None = None, revision: str | None = None) -> DiffusionGemma:
    ckpt_dir = resolve_checkpoint_dir(path_or_hub_id, revision)
    hf_config = read_hf_config(ckpt_dir)
    try:
        config = ModelConfig.from_hf(hf_config)
    except ValueError as e:
        raise CheckpointError(str(e), file=ckpt_dir / CONFIG) from e
    config = _reduce_depth(config, num_layers)
    wm = weight_map(ckpt_dir)
    index_name = INDEX if (ckpt_dir / INDEX).is_file() else SINGLE

    model = _materialize(config, dtype, device, attn_backend)
    targets = model.state_dict(keep_vars=True)  # persistent tensors only, sharing model storage
    loaded: set[str] = set()
    carried: dict[str, str] = {}
    by_file: dict[str, list[str]] = {}
    for name, file in wm.items():
        ours = hf_names.from_hf(name)
        if ours is None:
            if not hf_names.is_tied_alias(name):
                carried[name] = file
            continue
        layer = _layer_of(ours)
        if layer is not None and layer >= config.num_layers:
            continue  # reduced depth: later layers are ignored
        if ours not in targets:
            raise CheckpointError(f"tensor {name} is not part of the DiffusionGemma text model "
                                  f"({config.num_layers} layers)", file=ckpt_dir / file, field=name)
        by_file.setdefault(file, []).append(name)

    for file, names in by_file.items():
        path = ckpt_dir / file
        with _open_safetensors(path) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"missing tensor {name} (the index lists it in {file})", file=path,
                                          field=name)
                target = targets[hf_names.from_hf(name)]
                shape = list(f.get_slice(name).get_shape())
                if shape != list(target.shape):
                    raise CheckpointError(f"tensor {name} has shape {shape}, model expects {list(target.shape)}",
                                          file=path, field=name)
                target.data.copy_(_read_tensor(f, path, name))  # casts to dtype/device
                loaded.add(hf_names.from_hf(name))

    missing = [hf_names.to_hf(k) for k in targets if k not in loaded]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]} (expected in {index_name}){more}",
                              file=ckpt_dir / index_name, field=missing[0])
    _rebuild_rotary(model, device)
    model.hf_config = hf_config
    model.hf_source = {"dir": str(ckpt_dir), "carried": carried}
    return model


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
