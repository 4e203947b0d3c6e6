"""Writing transformers' DiffusionGemma checkpoint directories, streamed shard by shard.

An export is an ordered list of ``ExportEntry`` (checkpoint tensor name, bytes as written, a reader that
produces the tensor). ``write_export`` splits them as transformers does (huggingface_hub's rule: in
order, a new shard when the next tensor would pass ``max_shard_size``, a bigger tensor in a shard of its
own) into ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``.
Entries are read in order and a shard file is written as soon as its last tensor arrived, then freed:
the writer never holds more than ``max_shard_size`` plus the largest tensor. Readers may be collectives
(a sharded model's gathers): every rank runs ``write_export`` on the same entries, only the writer rank
keeps and writes what they return.

Everything is written into ``<out>.tmp-<pid>`` and swapped into place at the end; a path that is not a
previous export is never overwritten and a failed export leaves the previous one intact. Next to the
weights: config.json (depth and dtype fields matching the tensors) and every tokenizer / processor file
of the source checkpoint (``copy_tokenizer``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from blockdiff.errors import CheckpointError
from blockdiff.fsutil import fsync_path
from blockdiff.model.hf import names as hf_names
from blockdiff.model.config import FULL
from blockdiff.model.hf.load import (CONFIG, INDEX, SINGLE, as_hf_config, open_safetensors, read_json, read_tensor,
                                     weight_map)

# what AutoTokenizer / AutoProcessor (Gemma4Processor) read besides the weights and config.json; plus the
# legacy per-processor files and the extra chat templates of a source that has them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json", "processor_config.json",
                   "preprocessor_config.json", "video_preprocessor_config.json", "audio_tokenizer_config.json")
TOKENIZER_DIRS = ("additional_chat_templates",)
DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_EMBED = "model.decoder.embed_tokens.weight"


@dataclass
class ExportEntry:
    name: str  # checkpoint (transformers) name
    numel: int
    dtype: torch.dtype  # as written
    read: Callable[[], torch.Tensor | None]  # the tensor as written (CPU, contiguous); None on other ranks
    parameter: bool = True  # False for buffers (not counted in the index's total_parameters)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# ---- dtype ---------------------------------------------------------------------------------------


def parse_export_dtype(requested) -> torch.dtype | None:
    """A torch dtype or "bfloat16" / "float32" -> that dtype; None or "auto" -> None (the source's)."""
    if requested in (None, "auto"):
        return None
    if isinstance(requested, torch.dtype) and requested in EXPORT_DTYPES.values():
        return requested
    if isinstance(requested, str) and requested in EXPORT_DTYPES:
        return EXPORT_DTYPES[requested]
    raise CheckpointError(f"unknown export dtype {str(requested).removeprefix('torch.')!r}: choose auto, "
                          f"{', '.join(EXPORT_DTYPES)}", field="dtype")


def export_dtype(requested, model, source: Path | None) -> torch.dtype:
    """The dtype an export writes: ``requested``, or for None / "auto" the source checkpoint's (the dtype
    its text weights are stored in), else the model's."""
    dtype = parse_export_dtype(requested)
    if dtype is not None:
        return dtype
    stored = source_dtype(source) if source is not None else None
    return stored or model.embed_tokens.weight.dtype


def source_dtype(source: Path) -> torch.dtype | None:
    """The dtype a checkpoint stores its text weights in (read from the safetensors header)."""
    file = weight_map(source).get(_EMBED)
    if file is None:
        return None
    with open_safetensors(source / file) as f:
        return _ST_DTYPES.get(f.get_slice(_EMBED).get_dtype().upper())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- config.json -----------------------------------------------------------------------------------


def config_for_export(model, source: Path | None, dtype: torch.dtype) -> dict:
    """config.json content: the source's (or the model's transformers config), depth-matched, with every
    dtype field (top level and sub-configs, ``dtype`` and legacy ``torch_dtype``) set to the written dtype."""
    if source is not None:
        cfg = read_json(source / CONFIG)
    elif getattr(model, "hf_config", None) is not None:
        cfg = as_hf_config(model.hf_config).to_dict()
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
    name = _dtype_name(dtype)
    cfg["dtype"] = name
    for section in [cfg, *(v for v in cfg.values() if isinstance(v, dict))]:
        for key in ("dtype", "torch_dtype"):
            if section.get(key) is not None:
                section[key] = name
    return cfg


# ---- entries -------------------------------------------------------------------------------------


def text_entries(items, dtype: torch.dtype, keep: bool) -> list[ExportEntry]:
    """Entries of the modelled tensors. ``items``: (our name, global shape, is a parameter, produce) with
    ``produce(dtype)`` returning the full tensor (it may be a collective). ``keep``: this rank writes."""

    def reader(produce):
        def read():
            t = produce(dtype)
            return t.detach().to("cpu").contiguous() if keep else None
        return read

    return [ExportEntry(hf_names.to_hf(name), math.prod(shape), dtype, reader(produce), parameter)
            for name, shape, parameter, produce in items]


def own_state(model):
    """(fetch, shape_of) of an unsharded model's state dict: ``fetch(name, dtype=None)`` the tensor (cast),
    ``shape_of(name)`` its shape. Sharded models: ``blockdiff.checkpoint.live_export.state_access``."""
    state = model.state_dict()

    def fetch(name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = state[name].detach()
        return t if dtype is None else t.to(dtype)

    return fetch, lambda name: tuple(state[name].shape)


def model_items(model, fetch, shape_of) -> list:
    """``text_entries`` items of a model without adapters (``lora.merged_items``: with adapters)."""
    buffers = {n for n, _ in model.named_buffers()}
    return [(n, shape_of(n), n not in buffers, lambda dtype, n=n: fetch(n, dtype)) for n in model.state_dict()]


class TensorFiles:
    """Tensors of a safetensors checkpoint directory by checkpoint name, read one at a time (each file
    opened once, closed with ``stack``)."""

    def __init__(self, ckpt_dir: Path, stack: contextlib.ExitStack):
        self.dir, self.stack = Path(ckpt_dir), stack
        self.weight_map = weight_map(self.dir)
        self.handles: dict[str, object] = {}

    def _handle(self, name: str):
        file = self.weight_map.get(name)
        if file is None:
            raise CheckpointError(f"missing tensor {name}", file=self.dir, field=name)
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(open_safetensors(self.dir / file))
        f = self.handles[file]
        if name not in f.keys():
            raise CheckpointError(f"missing tensor {name} (the index lists it in {file})", file=self.dir / file,
                                  field=name)
        return f, self.dir / file

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name)[0].get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        f, path = self._handle(name)
        return read_tensor(f, path, name)


def carried_entries(source: Path, dtype: torch.dtype, stack: contextlib.ExitStack) -> list[ExportEntry]:
    """The source's tensors blockdiff does not model (vision tower, embed_vision), read one at a time in
    the export dtype (a source already in that dtype is carried byte for byte)."""
    files = TensorFiles(source, stack)
    return [ExportEntry(name, math.prod(files.shape(name)), dtype, lambda n=name: files.read(n).to(dtype))
            for name in files.weight_map
            if hf_names.from_hf(name) is None and not hf_names.is_tied_alias(name)]


def fresh_carried_entries(model, dtype: torch.dtype) -> list[ExportEntry]:
    """Vision tower + embed_vision initialised by transformers (for models without a source)."""
    import transformers  # here: seconds of import, needed only for a fresh vision init
    from transformers.models.diffusion_gemma import modeling_diffusion_gemma as mdg

    hf_config = as_hf_config(model.hf_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tower = transformers.AutoModel.from_config(hf_config.vision_config)
        embedder = mdg.DiffusionGemmaMultimodalEmbedder(hf_config.vision_config, hf_config.text_config)
        torch.nn.init.normal_(embedder.embedding_projection.weight, std=hf_config.initializer_range)
    out = []
    for prefix, module in (("model.encoder.vision_tower.", tower), ("model.encoder.embed_vision.", embedder)):
        for k, v in module.state_dict().items():
            t = v.detach().to(dtype).contiguous()
            out.append(ExportEntry(prefix + k, t.numel(), dtype, lambda t=t: t))
    return out


# ---- the directory -------------------------------------------------------------------------------


def plan_shards(entries: list[ExportEntry], max_shard_size: int) -> dict[str, list[str]]:
    """{file name: tensor names}, split and named as transformers' save_pretrained does."""
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory({e.name: e.nbytes for e in entries}, get_storage_size=int,
                                                 filename_pattern="model{suffix}.safetensors",
                                                 max_shard_size=max_shard_size)
    return split.filename_to_tensors


class ShardWriter:
    """Collects tensors per planned shard and writes a shard file once its last tensor is in.
    ``peak_bytes``: the most tensor bytes it ever held at once."""

    def __init__(self, tmp: Path, plan: dict[str, list[str]]):
        self.tmp = tmp
        self.file_of = {n: f for f, names in plan.items() for n in names}
        self.missing = {f: len(names) for f, names in plan.items()}
        self.open: dict[str, dict[str, torch.Tensor]] = {}
        self.held = self.peak_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        file = self.file_of[name]
        self.open.setdefault(file, {})[name] = tensor
        self.held += tensor.numel() * tensor.element_size()
        self.peak_bytes = max(self.peak_bytes, self.held)
        self.missing[file] -= 1
        if self.missing[file] == 0:
            shard = self.open.pop(file)
            part = self.tmp / (file + ".partial")
            save_file(shard, os.fspath(part), metadata={"format": "pt"})
            fsync_path(part)
            os.replace(part, self.tmp / file)
            self.held -= sum(t.numel() * t.element_size() for t in shard.values())


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


def is_export(path: Path) -> bool:
    return (path / CONFIG).is_file() and ((path / SINGLE).is_file() or (path / INDEX).is_file())


def check_overwritable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError("refusing to overwrite: the export path is a file, not a directory", file=out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_export(out_dir):
        raise CheckpointError("refusing to overwrite a directory that is not a previous export (no config.json "
                              f"with {SINGLE} or {INDEX})", file=out_dir)


def swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` to ``out_dir``; a previous export there is removed only afterwards."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _any_failed(sync, failed: bool) -> bool:
    return sync(failed) if sync is not None else failed


def write_export(entries: list[ExportEntry], out_dir, config: dict, source: Path | None,
                 max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, writer: bool = True,
                 sync: Callable[[bool], bool] | None = None, extra: Callable[[Path], None] | None = None) -> dict:
    """Write an export directory (see the module docstring). Collective when ``sync`` is given: every rank
    calls it with the same entries; ``sync(failed)`` says whether any rank failed. ``extra(tmp)`` adds
    files before the swap. A write error on the writer does not stop the reads (the other ranks' gathers
    must all run); it is raised on every rank at the end. Returns {"files", "total_size", "peak_bytes"}."""
    out_dir = Path(out_dir).resolve()
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    error = None
    if writer:
        try:
            check_overwritable(out_dir)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except (CheckpointError, OSError) as e:
            error = e
    if _any_failed(sync, error is not None):
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, CheckpointError):
            raise error
        if error is not None:
            raise CheckpointError(f"cannot create the export directory ({error})", file=out_dir)
        raise CheckpointError("rank 0 could not start the export (its error says why)", file=out_dir)
    plan = plan_shards(entries, max_shard_size)
    shards = ShardWriter(tmp, plan)
    try:
        for e in entries:
            t = e.read()
            if writer and error is None:
                try:
                    shards.add(e.name, t)
                except Exception as exc:  # noqa: BLE001  (disk full, ...: reported after the last read)
                    error, shards.open = exc, {}
            del t
        if writer and error is None:
            try:
                write_json(tmp / CONFIG, config)
                if source is not None:
                    copy_tokenizer(source, tmp)
                if extra is not None:
                    extra(tmp)
                if len(plan) > 1:  # the index last: it is what makes the shards a checkpoint
                    write_json(tmp / INDEX, {
                        "metadata": {"total_parameters": sum(e.numel for e in entries if e.parameter),
                                     "total_size": sum(e.nbytes for e in entries)},
                        "weight_map": {n: f for f, names in plan.items() for n in names}})
                fsync_path(tmp)
            except Exception as exc:  # noqa: BLE001
                error = exc
        if _any_failed(sync, error is not None):
            where = f"{type(error).__name__}: {error}" if error is not None else "on rank 0"
            raise CheckpointError(f"could not write the export ({where}); a previous export there is intact",
                                  file=out_dir) from error
        if writer:
            swap_into_place(tmp, out_dir)
    finally:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written export behind
    return {"files": list(plan), "total_size": sum(e.nbytes for e in entries), "peak_bytes": shards.peak_bytes}


# ---- one process -----------------------------------------------------------------------------------


def export_entries(model, text: list[ExportEntry], dtype: torch.dtype, source: Path | None,
                   stack: contextlib.ExitStack) -> list[ExportEntry]:
    """``text`` followed by the carried tensors (the source's, or transformers' fresh init without one)."""
    if model.config.layer_types[-1] != FULL:
        warnings.warn("exporting a model whose last layer is not full attention: transformers forces the last "
                      "layer to full_attention, so it will not load this export", stacklevel=3)
    carried = carried_entries(source, dtype, stack) if source is not None else []
    if not carried:  # no source (from_config) or a text-only source: transformers' own init
        carried = fresh_carried_entries(model, dtype)
    return text + carried


def model_source(model, source_dir=None) -> Path | None:
    src = getattr(model, "hf_source", None)
    return Path(source_dir).resolve() if source_dir is not None else (Path(src["dir"]) if src else None)


@torch.no_grad()
def save_pretrained(model, out_dir, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, dtype=None,
                    source_dir=None) -> Path:
    """Export an unsharded model without adapters (``blockdiff.checkpoint.live_export.export_model`` handles the
    rest). ``dtype``: None / "auto" = the source checkpoint's."""
    out_dir = Path(out_dir).resolve()
    source = model_source(model, source_dir)
    dtype = export_dtype(dtype, model, source)
    with contextlib.ExitStack() as stack:
        entries = export_entries(model, text_entries(model_items(model, *own_state(model)), dtype, keep=True), dtype,
                                 source, stack)
        write_export(entries, out_dir, config_for_export(model, source, dtype), source, max_shard_size)
    if source is not None and source == out_dir:  # saved over the source: point at the new layout
        model.hf_source = {"dir": str(out_dir), "carried": {n: f for n, f in weight_map(out_dir).items()
                                                            if hf_names.from_hf(n) is None}}
    return out_dir
