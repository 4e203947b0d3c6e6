"""Reading checkpoints in transformers' DiffusionGemma format (safetensors only).

- ``Checkpoint``: a local dir or hub id opened for reading: its transformers config, which file holds which
  tensor, the tensors of the text model (``text_tensors``) and of the rest (``carried``: the vision tower and
  ``embed_vision``, not modelled, carried through by exports), and the ONE read path (``read``): presence,
  shape and readability checked, errors naming the file and the tensor. ``read`` returns a whole tensor or
  a range of dim-0 rows; a row range reads only those rows from the file (``safe_open(...).get_slice``).
- the checkpoint's pieces on their own: ``resolve_checkpoint_dir`` (local dir or hub snapshot),
  ``read_hf_config``, ``weight_map``, ``open_safetensors`` / ``read_tensor`` (errors naming file and tensor).

``blockdiff.model.hf.io`` builds the whole model in one process from a ``Checkpoint``; sharded training runs
fill only their local shards through the same ``Checkpoint`` (``blockdiff.train.loading``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from blockdiff.errors import CheckpointError
from blockdiff.model.hf import names as hf_names
from blockdiff.model.config import ModelConfig
from blockdiff.model.hf.nvfp4 import NVFP4Layout, source_quantization

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"]
EXPECTED_MODEL_TYPE = "diffusion_gemma"
_ST_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LAYER = re.compile(r"^layers\.(\d+)\.")


# ---- resolving a checkpoint --------------------------------------------------------------------


def hub_offline() -> bool:
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
    if not HUB_ID.match(name):
        raise CheckpointError("no such checkpoint directory (and not a hub id like 'org/name')", file=name)
    from huggingface_hub import snapshot_download  # here, as transformers below: seconds of import, needed only here
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    not_local = f"(and no local directory {name!r} exists)"
    offline_msg = (f"cannot download {name}: offline / no network; pass a local directory or "
                   f"pre-populate the HF cache {not_local}")
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS,
                                      local_files_only=hub_offline()))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise CheckpointError(f"cannot download {name} {not_local}: {type(e).__name__}: {e}") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as e:
        # Connection failures surface as LocalEntryNotFoundError (nothing cached) or OSError subclasses.
        raise CheckpointError(f"{offline_msg} ({type(e).__name__})") from e
    except Exception as e:  # e.g. httpx transport errors that escape huggingface_hub
        if "connect" in type(e).__name__.lower() or "timeout" in type(e).__name__.lower():
            raise CheckpointError(f"{offline_msg} ({type(e).__name__})") from e
        raise


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError("file not found", file=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"not valid JSON: {e}", file=path) from None


def as_hf_config(hf_config_or_kwargs):
    """A transformers DiffusionGemmaConfig from itself or from its kwargs."""
    import transformers

    if isinstance(hf_config_or_kwargs, dict):
        return transformers.DiffusionGemmaConfig(**hf_config_or_kwargs)
    return hf_config_or_kwargs


def read_hf_config(ckpt_dir: Path):
    """transformers.DiffusionGemmaConfig of a checkpoint, refusing other model types."""
    import transformers

    raw = read_json(ckpt_dir / CONFIG)
    found = raw.get("model_type")
    if found != EXPECTED_MODEL_TYPE:
        raise CheckpointError(f"model_type is {found!r}, expected {EXPECTED_MODEL_TYPE!r}",
                              file=ckpt_dir / CONFIG, field="model_type")
    quantized = source_quantization(ckpt_dir, raw)  # refuses a quantization it cannot read
    try:
        config = transformers.DiffusionGemmaConfig.from_pretrained(ckpt_dir)
    except Exception as e:  # transformers raises assorted types for bad fields
        raise CheckpointError(f"cannot parse: {type(e).__name__}: {e}", file=ckpt_dir / CONFIG) from e
    if quantized and hasattr(config, "quantization_config"):
        del config.quantization_config  # its tensors are read dequantized: exports are unquantized checkpoints
    return config


def model_config_of(hf_config, ckpt_dir: Path, num_layers: int | None = None) -> ModelConfig:
    """Our ModelConfig of a checkpoint's transformers config, cut to ``num_layers`` when given."""
    try:
        config = ModelConfig.from_hf(hf_config)
    except ValueError as e:
        raise CheckpointError(str(e), file=ckpt_dir / CONFIG) from e
    return reduce_depth(config, num_layers)


def weight_map(ckpt_dir: Path) -> dict[str, str]:
    """{checkpoint tensor name: file name} of a single-file or sharded safetensors checkpoint."""
    index = ckpt_dir / INDEX
    if index.is_file():
        wm = read_json(index).get("weight_map")
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
        with open_safetensors(single) as f:
            return {k: SINGLE for k in f.keys()}
    pickled = [p.name for p in ckpt_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickled:
        raise CheckpointError(f"found only {', '.join(sorted(pickled))}: only safetensors are read "
                              "(pickled checkpoints are never unpickled); convert it to safetensors first",
                              file=ckpt_dir)
    raise CheckpointError(f"no {SINGLE} or {INDEX}", file=ckpt_dir)


@contextlib.contextmanager
def open_safetensors(path: Path):
    try:
        handle = safe_open(os.fspath(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError: truncated header/data, bad JSON, ...
        raise CheckpointError(f"corrupted or truncated safetensors file: {e}", file=path) from e
    with handle as f:
        yield f


def read_tensor(f, path: Path, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"cannot read tensor {name}: {e}", file=path, field=name) from e


def reduce_depth(cfg: ModelConfig, num_layers: int | None) -> ModelConfig:
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


# ---- the checkpoint opened for reading ---------------------------------------------------------


class Checkpoint:
    """A safetensors checkpoint opened for reading (see the module docstring). Files are opened on first
    use and stay open (memory-mapped) until ``close``; ``bytes_read`` counts the tensor bytes returned."""

    def __init__(self, path_or_hub_id, revision: str | None = None):
        self.dir = resolve_checkpoint_dir(path_or_hub_id, revision)
        self.hf_config = read_hf_config(self.dir)
        self.stored_map = weight_map(self.dir)  # the files' own tensor names
        # NVFP4: the stored tensors presented under the unquantized model's names, dequantized when read
        self.nvfp4 = NVFP4Layout(self.stored_map) if source_quantization(self.dir, read_json(self.dir / CONFIG)) \
            else None
        self.weight_map = self.stored_map if self.nvfp4 is None else self.nvfp4.names
        self.index_name = INDEX if (self.dir / INDEX).is_file() else SINGLE
        self.bytes_read = 0
        self._stack = contextlib.ExitStack()
        self._files: dict[str, tuple] = {}

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._files.clear()
        self._stack.close()

    def model_config(self, num_layers: int | None = None) -> ModelConfig:
        return model_config_of(self.hf_config, self.dir, num_layers)

    @property
    def carried(self) -> dict[str, str]:
        """{name: file} of the tensors the text model does not hold (vision tower, embed_vision)."""
        return {n: f for n, f in self.weight_map.items() if hf_names.from_hf(n) is None and not hf_names.is_tied_alias(n)}

    def stored_bytes(self, names: Iterable[str]) -> int:
        """Bytes the checkpoint tensors ``names`` take in their files (from the headers; nothing is read)."""
        total = 0
        for name in names:
            if self.nvfp4 is not None and self.nvfp4.derived(name):
                continue  # several stored tensors (codes + scales), counted when read
            _, sl, _ = self._slice(name)
            total += math.prod(sl.get_shape()) * _ST_ITEMSIZE.get(sl.get_dtype().upper(), 4)
        return total

    def text_tensors(self, expected: Iterable[str], num_layers: int) -> dict[str, str]:
        """{our name: checkpoint name} for ``expected`` (our names of the tensors to fill). Refuses a
        checkpoint tensor the model lacks (layers past ``num_layers`` excepted: a reduced-depth run) and an
        expected tensor the checkpoint lacks, before anything is read."""
        expected = list(expected)
        wanted = set(expected)
        for name, file in self.weight_map.items():
            ours = hf_names.from_hf(name)
            if ours is None or ours in wanted:
                continue
            layer = _layer_of(ours)
            if layer is None or layer < num_layers:
                raise CheckpointError(f"tensor {name} is not part of the DiffusionGemma text model "
                                      f"({num_layers} layers)", file=self.dir / file, field=name)
        missing = [hf_names.to_hf(k) for k in expected if hf_names.to_hf(k) not in self.weight_map]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"missing tensor {missing[0]} (expected in {self.index_name}){more}",
                                  file=self.dir / self.index_name, field=missing[0])
        return {k: hf_names.to_hf(k) for k in expected}

    def read(self, name: str, shape, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Checkpoint tensor ``name`` (its stored dtype, on the CPU; an NVFP4 weight dequantized to fp32),
        checked to have ``shape`` (None: any); with ``rows`` only dim-0 rows [start, stop) of it. The file's
        pages are memory-mapped: only the rows returned are read from disk."""
        if self.nvfp4 is None or not self.nvfp4.derived(name):
            return self._read_stored(name, shape, rows)
        out = self.nvfp4.read(name, rows, lambda n, r: self._read_stored(n, None, r))
        if shape is not None and list(out.shape) != [*([rows[1] - rows[0]] if rows else shape[:1]), *shape[1:]]:
            raise CheckpointError(f"tensor {name} dequantizes to shape {list(out.shape)} (rows {rows}), model "
                                  f"expects {list(shape)}", file=self.dir / self.weight_map[name], field=name)
        return out

    def _read_stored(self, name: str, shape, rows: tuple[int, int] | None) -> torch.Tensor:
        f, sl, path = self._slice(name)
        stored = list(sl.get_shape())
        if shape is not None and stored != list(shape):
            raise CheckpointError(f"tensor {name} has shape {stored}, model expects {list(shape)}", file=path,
                                  field=name)
        try:
            out = f.get_tensor(name) if rows is None else sl[rows[0]:rows[1]]
        except Exception as e:  # SafetensorError: truncated data, bad offsets, ...
            raise CheckpointError(f"cannot read tensor {name}: {e}", file=path, field=name) from e
        self.bytes_read += out.numel() * out.element_size()
        return out

    def _slice(self, name: str):
        """(open file, lazy slice of ``name``, file path), refusing a tensor its file lacks."""
        file = self.stored_map[name]
        path = self.dir / file
        if file not in self._files:
            f = self._stack.enter_context(open_safetensors(path))
            self._files[file] = (f, set(f.keys()))
        f, keys = self._files[file]
        if name not in keys:
            raise CheckpointError(f"missing tensor {name} (the index lists it in {file})", file=path, field=name)
        try:
            return f, f.get_slice(name), path
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name}: {e}", file=path, field=name) from e


def attach_source(model, ckpt: Checkpoint) -> None:
    """What an export of ``model`` needs from its source checkpoint (config, the carried tensors)."""
    model.hf_config = ckpt.hf_config
    model.hf_source = {"dir": str(ckpt.dir), "carried": ckpt.carried}
