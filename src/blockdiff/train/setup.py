"""Everything a run needs before its first step: ``build_run(cfg, dist)``.

    config -> run dir (resume or fresh) -> tokenizer -> model config checks -> datasets (train, held out)
    -> the model (meta, LoRA, frozen router, parallelized, shards filled) -> AdamW + LR schedule -> resume

Nothing is written before the data is known good, and no weight is read before the config and the tokenizer
agree with the model's config. ``blockdiff train`` and ``blockdiff rl`` both start here.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer

from blockdiff.checkpoint.training import latest_checkpoint, load_checkpoint
from blockdiff.config.schema import Config, apply_world_size
from blockdiff.data import load_tiny_tokenizer
from blockdiff.data.canvas import Example, SFTDataset
from blockdiff.data.chat import install_chat_template, tokenizer_name
from blockdiff.errors import ConfigError
from blockdiff.model.config import ModelConfig
from blockdiff.objective.loss import ObjectiveSettings
from blockdiff.parallel.distributed import DistInfo
from blockdiff.train.loading import build_training_model, model_config
from blockdiff.train.master_adamw import build_optimizer
from blockdiff.train.periodic_eval import split_held_out

log = logging.getLogger("blockdiff")


def load_tokenizer(cfg: Config):
    name = cfg.data.tokenizer
    if name == "tiny":
        tok = load_tiny_tokenizer()
    else:
        src = name or cfg.model.name_or_path
        try:
            tok = AutoTokenizer.from_pretrained(src)
        except Exception as e:
            raise ConfigError(f"cannot load tokenizer from {src!r}: {e}", field="data.tokenizer") from None
    if cfg.data.chat_template:  # else the tokenizer's own template, unchanged
        install_chat_template(tok, cfg.data.chat_template)
    if not isinstance(tok.chat_template, str) or not tok.chat_template.strip():
        raise ConfigError(f"tokenizer '{tokenizer_name(tok)}' has no chat template; set data.chat_template to a "
                          ".jinja file", field="data.chat_template")
    return tok


def check_consistency(cfg: Config, mc: ModelConfig, tokenizer) -> None:
    if cfg.data.canvas_length != mc.canvas_length:
        raise ConfigError(f"canvas_length {cfg.data.canvas_length} differs from the model's canvas_length "
                          f"{mc.canvas_length}", field="data.canvas_length")
    if cfg.data.seq_length > mc.max_position_embeddings:
        raise ConfigError(f"seq_length {cfg.data.seq_length} exceeds the model's max_position_embeddings "
                          f"{mc.max_position_embeddings}", field="data.seq_length")
    if len(tokenizer) > mc.vocab_size:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {mc.vocab_size}",
                          field="data.tokenizer")
    if mc.num_experts % cfg.parallel.ep:
        raise ConfigError(f"ep={cfg.parallel.ep} does not divide the model's {mc.num_experts} experts",
                          field="parallel.ep")


def lr_lambda(cfg: Config):
    s = cfg.scheduler
    floor = cfg.scheduler.min_lr / cfg.optimizer.lr

    def f(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / (s.warmup_steps + 1)  # linear warmup from ~0; step 0 still learns a little
        if s.kind == "constant":
            return 1.0
        progress = min(1.0, (step - s.warmup_steps) / max(1, s.decay_steps - s.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def prepare_run_dir(cfg: Config, dist: DistInfo) -> tuple[Path, Path | None]:
    """Decide whether we resume (nothing is written: ``write_run_dir`` creates the dir once the data is
    read). Refuses to overwrite another run."""
    run_dir = Path(cfg.train.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("exists and is not a directory", file=str(run_dir), field="train.output_dir")
    resume_from = None
    ckpt = latest_checkpoint(run_dir) if run_dir.exists() else None
    if cfg.train.resume == "must" and ckpt is None:
        raise ConfigError(f"resume: must, but {run_dir} holds no checkpoint", field="train.resume")
    if ckpt is not None and cfg.train.resume != "never":
        resume_from = ckpt
    elif (run_dir / "config.yaml").exists() and (ckpt is not None or _other_run(run_dir, cfg)):
        raise ConfigError(f"{run_dir} already holds another run ({_other_run(run_dir, cfg)}) and no checkpoint to "
                          "resume from; pick another output_dir" if ckpt is None else
                          f"{run_dir} already holds a run with checkpoints; resume is 'never': pick another "
                          "output_dir", field="train.output_dir")
    return run_dir, resume_from


def write_run_dir(cfg: Config, dist: DistInfo, run_dir: Path, tokenizer) -> None:
    """Create the run dir with the resolved config and the chat template training renders with."""
    if dist.world_size > 1:  # every rank decides before rank 0 writes config.yaml (else the others refuse)
        torch.distributed.barrier()
    if dist.rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save_yaml(run_dir / "config.yaml")
            (run_dir / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
        except OSError as e:  # unwritable, a file in the way, disk full
            raise ConfigError(f"cannot write the output directory: {e.strerror or e}", file=str(run_dir),
                              field="train.output_dir") from None


def _other_run(run_dir: Path, cfg: Config) -> str | None:
    """Why a run dir without checkpoints must not be reused (None: it may be). A run that never logged a step
    (e.g. stopped by bad data) may be reused; so may one with the same config (killed before its first checkpoint:
    it starts over); resume 'never' always refuses a run that trained."""
    if not ((run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()):
        return None
    if cfg.train.resume == "never":
        return "resume is 'never'"
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        saved = {}
    new = cfg.to_dict()
    differ = [f"{s}.{k}" for s in new for k in new[s] if f"{s}.{k}" != "train.output_dir"  # a moved run is the same
              and (not isinstance(saved.get(s), dict) or saved[s].get(k) != new[s][k])]
    return f"its config differs in {', '.join(differ[:3])}" if differ else None


@dataclass
class Run:
    """A run ready for its first step (``start_step`` > 0 when resumed)."""

    cfg: Config
    dist: DistInfo
    run_dir: Path
    tokenizer: object
    dataset: SFTDataset
    held_out: list[Example] | None  # the validation loss's examples (eval.loss_every), else None
    model: torch.nn.Module
    params: list[torch.nn.Parameter]  # the trainable ones, in the optimizer's order
    optimizer: torch.optim.Optimizer
    schedule: object  # step -> LR factor
    settings: ObjectiveSettings
    grad_accum: int
    start_step: int = 0
    resumed_meta: dict | None = None  # the checkpoint's metadata when resumed

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size


def build_run(cfg: Config, dist: DistInfo, dataset: SFTDataset | None = None) -> Run:
    """Run dir, tokenizer, datasets, model, optimizer, schedule and resume state, in the order that keeps bad
    input from writing anything. ``dataset``: a prepared training set (``blockdiff rl`` reads prompts its own
    way); default: ``data.train_path`` as SFT reads it."""
    accum = apply_world_size(cfg, dist.world_size)
    torch.manual_seed(cfg.train.seed)
    run_dir, resume_from = prepare_run_dir(cfg, dist)
    tokenizer = load_tokenizer(cfg)
    mc = model_config(cfg)
    check_consistency(cfg, mc, tokenizer)  # before any weight is read
    held_out = None
    if dataset is None:
        dataset = SFTDataset.from_config(cfg.data, tokenizer, mc.eos_token_id)
        dataset, held_out = split_held_out(cfg, dataset, tokenizer, mc.eos_token_id)  # eval.loss_every
    write_run_dir(cfg, dist, run_dir, tokenizer)  # only once the data is known good: bad data writes nothing
    # on meta, LoRA and the frozen router applied, parallelized, then each rank fills its own shards
    model = build_training_model(cfg, dist)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW; one GPU in bf16 with optimizer.master_update: MasterAdamW (writes the bf16 working weights)
    optimizer = build_optimizer(model, params, cfg.optimizer, dist.device, cfg.model.dtype)
    run = Run(cfg, dist, run_dir, tokenizer, dataset, held_out, model, params, optimizer, lr_lambda(cfg),
              ObjectiveSettings.from_config(cfg.objective), accum)
    if resume_from is not None:
        run.resumed_meta = load_checkpoint(resume_from, model, optimizer)
        run.start_step = int(run.resumed_meta["step"])
        log.info("resumed from %s at step %d", resume_from, run.start_step)
    if dist.rank == 0:
        stats = {**dataset.stats(), "world_size": dist.world_size, "grad_accum": accum,
                 "trainable_params": sum(p.numel() for p in params)}
        (run_dir / "data_stats.json").write_text(json.dumps(stats, indent=1))
        log.info("data: %s", stats)
    return run
