"""Export a training run's checkpoint as a transformers-loadable DiffusionGemma directory.

Streamed: the model is a meta-device skeleton (names and shapes only) and every tensor is read from the
run's checkpoint when it is written (one tensor of a single-process safetensors checkpoint, or the
chunks of one tensor of a sharded DCP checkpoint), so the process holds one shard of the export plus one
tensor. A LoRA checkpoint holds the adapters only: the frozen base tensors are read from the run's source
checkpoint one at a time and merged there (``--merge``); without ``--merge`` only the PEFT adapter is
written and no base weight is read. A run built ``from_config`` has no source: its model is rebuilt
(random init, on the CPU) for the tensors a LoRA checkpoint does not hold.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from blockdiff.checkpoint.live_export import export_model
from blockdiff.checkpoint.training import DCP_FORMAT, latest_checkpoint
from blockdiff.config.schema import load_config
from blockdiff.errors import CheckpointError
from blockdiff.lora import apply_lora, peft_adapter_payload, write_peft_adapter
from blockdiff.model.config import ModelConfig
from blockdiff.model.diffusion_gemma import DiffusionGemma
from blockdiff.model.hf import load as hf_load, names as hf_names
from blockdiff.model.hf.load import Checkpoint
from blockdiff.model.hf.save import (DEFAULT_MAX_SHARD_SIZE, TensorFiles, check_overwritable, is_export, own_state,
                                     parse_export_dtype)
from blockdiff.train.loading import build_model
from blockdiff.train.setup import load_tokenizer


class _CheckpointTensors:
    """The model tensors of a training checkpoint (``step_N/``) by state-dict name, read one at a time."""

    def __init__(self, ckpt: Path, stack: contextlib.ExitStack):
        try:
            meta = json.loads((ckpt / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"unreadable checkpoint metadata: {e}", file=str(ckpt / "meta.json")) from None
        self.ckpt, self.dcp = ckpt, meta.get("format") == DCP_FORMAT
        if self.dcp:
            class _Reader(FileSystemReader):  # the metadata is read once, not once per tensor
                def read_metadata(self, *args, **kwargs):
                    if not hasattr(self, "_metadata"):
                        self._metadata = super().read_metadata(*args, **kwargs)
                    return self._metadata

            self.reader = _Reader(str(ckpt))
            try:
                md = self.reader.read_metadata().state_dict_metadata
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"cannot read sharded checkpoint metadata: {e}", file=str(ckpt)) from None
            self.stored = {k[len("model."):]: (tuple(v.size), v.properties.dtype) for k, v in md.items()
                           if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
        else:
            self.files = TensorFiles(ckpt, stack)
            self.stored = {n: (self.files.shape(n), None) for n in self.files.weight_map}

    def __contains__(self, name: str) -> bool:
        return name in self.stored

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if self.stored[name][0] != tuple(shape):
            raise CheckpointError(f"shape {list(self.stored[name][0])} but the model expects {list(shape)} (a "
                                  "checkpoint of another model?)", file=str(self.ckpt), field=name)

    def read(self, name: str) -> torch.Tensor:
        if not self.dcp:
            return self.files.read(name)
        shape, dtype = self.stored[name]
        state = {f"model.{name}": torch.empty(shape, dtype=dtype)}
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process, on purpose
            warnings.simplefilter("ignore")
            try:
                dcp.load(state, storage_reader=self.reader, no_dist=True)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"cannot read tensor {name} of the sharded checkpoint: "
                                      f"{str(e).splitlines()[0][:300]}", file=str(self.ckpt), field=name) from None
        return state[f"model.{name}"]


def _skeleton(cfg):
    """The run's model without its weights: on meta for a checkpoint source (with ``hf_source`` set, so the
    export carries the source's files), rebuilt on the CPU for a ``from_config`` run."""
    if cfg.model.from_config is not None:
        return build_model(cfg, torch.device("cpu"))
    src = hf_load.resolve_checkpoint_dir(cfg.model.name_or_path)
    hf_config = hf_load.read_hf_config(src)
    config = hf_load.reduce_depth(ModelConfig.from_hf(hf_config), cfg.model.num_layers)
    with torch.device("meta"):
        model = DiffusionGemma(config, attn_backend=cfg.model.attn_backend)
    model.hf_config, model.hf_source = hf_config, {"dir": str(src), "carried": {}}
    return model


def _base_reader(model, stack: contextlib.ExitStack):
    """Tensors that are not in a LoRA checkpoint (the frozen base), by state-dict name."""
    if model.hf_source is None:  # from_config: the rebuilt model holds them
        return own_state(model)[0]
    source = stack.enter_context(Checkpoint(model.hf_source["dir"]))  # NVFP4 sources read dequantized
    return lambda name: source.read(hf_names.to_hf(name.replace(".base.weight", ".weight")), None)


def export_run(run_dir, out=None, step: int | None = None, merge: bool = False, dtype=None,
               max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    run_dir = Path(run_dir)
    parse_export_dtype(dtype)  # bad values fail before anything is read
    if not (run_dir / "config.yaml").exists():
        raise CheckpointError("not a blockdiff run directory (no config.yaml)", file=str(run_dir))
    cfg = load_config(run_dir / "config.yaml")
    if (run_dir / "chat_template.jinja").is_file():  # the template the run trained with
        cfg.data.chat_template = str(run_dir / "chat_template.jinja")
    if merge and not cfg.lora.enabled:
        raise CheckpointError("--merge folds LoRA adapters into the weights, but this run trained no adapters",
                              file=str(run_dir / "config.yaml"), field="lora.enabled")
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}" if step is not None else latest_checkpoint(run_dir)
    if ckpt is None or not ckpt.exists():
        raise CheckpointError("no checkpoint to export", file=str(ckpt or run_dir / "checkpoints"))
    out = Path(out or run_dir / "export")
    adapter_only = cfg.lora.enabled and not merge
    if adapter_only:
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "adapter_config.json").is_file()
                                                   and not is_export(out))):
            raise CheckpointError("refusing to overwrite a path that is not a previous export or adapter", file=out)
    else:
        check_overwritable(out)
    model = _skeleton(cfg)
    with contextlib.ExitStack() as stack:
        stored = _CheckpointTensors(ckpt, stack)
        base = None
        if cfg.lora.enabled:
            apply_lora(model, cfg.lora)
            base = _base_reader(model, stack)
        shape_of = own_state(model)[1]
        for name in model.state_dict():
            if name in stored:
                stored.check(name, shape_of(name))
            elif base is None:
                raise CheckpointError("checkpoint lacks a tensor this model has", file=str(ckpt), field=name)

        def fetch(name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
            t = stored.read(name) if name in stored else base(name)
            return t if dtype is None else t.to(dtype)

        if adapter_only:  # the PEFT adapter directory (plus expert adapters PEFT cannot express, if any)
            write_peft_adapter(out, *peft_adapter_payload(model, cfg.model.name_or_path, cfg.lora, fetch=fetch))
            return out
        export_model(model, out, dtype=dtype, max_shard_size=max_shard_size,
                     base_model_name_or_path=cfg.model.name_or_path, lora_cfg=cfg.lora if cfg.lora.enabled else None,
                     fetch=fetch, shape_of=shape_of)
    load_tokenizer(cfg).save_pretrained(out)
    return out
