"""Export a training run's checkpoint as a transformers-loadable DiffusionGemma directory."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import latest_checkpoint, load_checkpoint
from .config import load_config
from .errors import CheckpointError


def export_run(run_dir, out=None, step: int | None = None, merge: bool = False) -> Path:
    run_dir = Path(run_dir)
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
    from .train import build_model, load_tokenizer

    model = build_model(cfg, torch.device("cpu"))
    out = Path(out or run_dir / "export")
    if cfg.lora.enabled:
        from .lora import apply_lora, export_lora, save_peft_adapter

        apply_lora(model, cfg.lora)
        load_checkpoint(ckpt, model)  # adapters only; the base is rebuilt from the run's model config
        if not merge:  # the PEFT adapter directory (plus expert adapters PEFT cannot express, if any)
            save_peft_adapter(model, out, cfg.model.name_or_path, cfg.lora)
            return out
        export_lora(model, out, cfg.model.name_or_path, cfg.lora, merged=True)  # out/ merged, out/adapter
    else:
        load_checkpoint(ckpt, model)
        model.save_pretrained(out)
    load_tokenizer(cfg).save_pretrained(out)
    return out
