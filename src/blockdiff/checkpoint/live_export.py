"""Export a live model as a transformers checkpoint: one process or sharded by ``parallelize``, with or
without LoRA, streamed so that no rank ever holds the full state.

Every rank walks the model's state in order; per tensor it casts its local shard to the export dtype and
gathers the full tensor (``parallel.full_tensor``, a collective); rank 0 appends it to the open
safetensors shard and writes the shard file once it is full (``hf_save.write_export``). LoRA tensors are
gathered in fp32 and merged (base + scaling * B @ A) before the cast, and the PEFT adapter goes to
``out_dir/adapter``. The tensors blockdiff does not model are streamed from the source checkpoint by
rank 0 alone.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

from blockdiff.errors import CheckpointError
from blockdiff.lora import apply_lora, has_lora, merged_items, peft_adapter_payload, write_peft_adapter
from blockdiff.lora.quantize import has_quantized_base
from blockdiff.model.diffusion_gemma import DiffusionGemma
from blockdiff.model.hf.save import (DEFAULT_MAX_SHARD_SIZE, config_for_export, export_dtype, export_entries,
                                     model_items, model_source, own_state, text_entries, write_export)
from blockdiff.parallel.distributed import DistInfo, all_reduce_
from blockdiff.parallel.parallelize import full_tensor, global_view, is_sharded, reshard_all

log = logging.getLogger("blockdiff")


def _sync(dist: DistInfo | None):
    """``write_export``'s "did any rank fail" exchange (None on one process)."""
    if dist is None or dist.world_size == 1:
        return None

    def any_failed(failed: bool) -> bool:
        flag = torch.tensor([1.0 if failed else 0.0], device=dist.device)
        return bool(all_reduce_(flag, dist).item() > 0)

    return any_failed


def state_access(model):
    """(fetch, shape_of) over the model's state dict: ``fetch(name, dtype=None)`` is the full tensor (cast
    before gathering, so the gather moves export-dtype bytes; a collective when sharded), ``shape_of(name)``
    its global shape (no communication)."""
    if not is_sharded(model):
        return own_state(model)
    reshard_all(model)
    local, _ = own_state(model)
    state = model.state_dict()

    def fetch(name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return full_tensor(model, name, local(name, dtype))

    return fetch, lambda name: tuple(global_view(model, name, state[name]).shape)


@torch.no_grad()
def export_model(model, out_dir, dist: DistInfo | None = None, *, dtype=None,
                 max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, base_model_name_or_path=None, lora_cfg=None,
                 fetch=None, shape_of=None) -> dict:
    """Write ``out_dir`` (a LoRA model: adapters merged in, plus ``out_dir/adapter``, the PEFT adapter).
    Collective when sharded: every rank calls it. ``dtype``: "bfloat16" / "float32" / a torch dtype; None
    or "auto": the source checkpoint's dtype. ``fetch`` / ``shape_of`` (see ``state_access``) read the
    tensors from elsewhere than the model (``blockdiff export`` reads a run's checkpoint). Returns the
    writer's stats: files, total_size, peak_bytes (the most tensor bytes rank 0 held at once). A quantized
    frozen base (``lora.base_quantization``) is exported from the source checkpoint's weights."""
    t0 = time.perf_counter()
    writer = dist is None or dist.rank == 0
    with contextlib.ExitStack() as stack:
        if fetch is None and has_quantized_base(model):
            model, fetch, shape_of = _unquantized_view(model, stack)
        return _export(model, out_dir, dist, dtype, max_shard_size, base_model_name_or_path, lora_cfg, fetch,
                       shape_of, writer, t0)


def _unquantized_view(model, stack: contextlib.ExitStack):
    """(skeleton, fetch, shape_of) of a model whose frozen base is quantized: the same model on ``meta`` with
    plain tensors (names and shapes), its trained and unquantized tensors read from the live model, the
    frozen base from the SOURCE checkpoint (its own weights, never the quantized ones)."""
    from blockdiff.checkpoint.export import _base_reader  # here: checkpoint.export imports this module (cycle)

    if getattr(model, "hf_source", None) is None:
        raise CheckpointError("the frozen base of this run exists only quantized (built from model.from_config): "
                              "export it with `blockdiff export RUN_DIR [--merge]`, which rebuilds the base")
    with torch.device("meta"):
        skeleton = DiffusionGemma(model.config)
    apply_lora(skeleton, model.lora_settings)
    skeleton.hf_config, skeleton.hf_source = model.hf_config, model.hf_source
    live_fetch, live_shape = state_access(model)
    live, shapes = set(model.state_dict()), {n: tuple(t.shape) for n, t in skeleton.state_dict().items()}
    base = _base_reader(skeleton, stack)

    def fetch(name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in live:
            return live_fetch(name, dtype)
        return base(name) if dtype is None else base(name).to(dtype)

    return skeleton, fetch, lambda name: live_shape(name) if name in live else shapes[name]


def _export(model, out_dir, dist, dtype, max_shard_size, base_model_name_or_path, lora_cfg, fetch, shape_of, writer,
            t0) -> dict:
    if fetch is None:
        fetch, shape_of = state_access(model)
    source = model_source(model)
    dtype = export_dtype(dtype, model, source)
    lora = has_lora(model)
    items = merged_items(model, fetch, shape_of) if lora else model_items(model, fetch, shape_of)
    extra = None
    if lora:  # gathered on every rank (small), written by rank 0 inside the export's temp dir
        payload = peft_adapter_payload(model, base_model_name_or_path, lora_cfg, fetch=fetch)
        extra = lambda tmp: write_peft_adapter(tmp / "adapter", *payload)  # noqa: E731
    with contextlib.ExitStack() as stack:
        entries = text_entries(items, dtype, keep=writer)
        if writer:
            entries = export_entries(model, entries, dtype, source, stack)
        stats = write_export(entries, out_dir, config_for_export(model, source, dtype), source, max_shard_size,
                             writer=writer, sync=_sync(dist), extra=extra)
    if writer:
        log.info("exported %s (%d files, %.2f GiB %s) in %.1f s; rank 0 held at most %.2f GiB of tensors",
                 Path(out_dir), len(stats["files"]), stats["total_size"] / 2**30, str(dtype).removeprefix("torch."),
                 time.perf_counter() - t0, stats["peak_bytes"] / 2**30)
    return stats
