"""Checkpoint I/O in transformers' DiffusionGemma format (safetensors only).

- ``load_pretrained``: local dir or hub id -> DiffusionGemma, built on ``meta`` and filled tensor by
  tensor from (possibly sharded) safetensors. Tensors we do not model (vision tower, embed_vision)
  are not loaded, only remembered in ``model.hf_source`` so an export can carry them through.
- ``copy_tokenizer``: the tokenizer / processor files of a checkpoint (writing an export: ``hf_save``).
- ``from_config``: random-init model plus the transformers config it came from (for export).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from . import hf_names
from .config import ModelConfig
from .diffusion_gemma import DiffusionGemma

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# what AutoTokenizer / AutoProcessor (Gemma4Processor) read besides the weights and config.json; plus the
# legacy per-processor files and the extra chat templates of a source that has them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json", "processor_config.json",
                   "preprocessor_config.json", "video_preprocessor_config.json", "audio_tokenizer_config.json")
TOKENIZER_DIRS = ("additional_chat_templates",)
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
    """Copy the tokenizer and processor files present in ``src_dir`` (and generation_config.json) to ``out_dir``."""
    copied = []
    for name in TOKENIZER_FILES + ("generation_config.json",):
        src = Path(src_dir) / name
        if src.is_file():
            shutil.copyfile(src, Path(out_dir) / name)
            copied.append(name)
    for name in TOKENIZER_DIRS:
        if (Path(src_dir) / name).is_dir():
            shutil.copytree(Path(src_dir) / name, Path(out_dir) / name, dirs_exist_ok=True)
            copied.append(name)
    return copied
