"""The run configuration: its sections (fields, defaults, help, range checks) and the entry points.

``load_config`` (YAML file + ``--section.field value`` overrides) and ``config_from_dict`` give a validated
``Config``; the generic typed-YAML machinery (types, located errors, overrides) is ``config/loader.py``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal

import yaml

from blockdiff.config.loader import (Where, apply_overrides, build, option, parse_overrides, read_yaml,
                                     section_types)
from blockdiff.config.loader import range_check as _rng  # the short name keeps each checks() on one line
from blockdiff.errors import ConfigError
from blockdiff.model.config import AttnBackend

DEFAULT_MODEL = "google/diffusiongemma-26B-A4B-it"


def demo_config_path() -> str:
    """Path of the CPU demo config shipped inside the package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.yaml")


# ----------------------------------------------------------------------------------------- sections
@dataclass
class ModelSection:
    name_or_path: str = option(DEFAULT_MODEL, "hub id or local dir of the model to fine-tune")
    from_config: dict | None = option(None, "DiffusionGemmaConfig kwargs: random-init model instead of loading")
    dtype: Literal["bfloat16", "float32"] = option("bfloat16", "compute dtype; master weights stay fp32")
    attn_backend: AttnBackend = option(
        "auto", "attention kernel; auto: flex on CUDA, sdpa elsewhere")
    num_layers: int | None = option(None, "keep only the first N layers (reduced-depth runs at real layer shapes)")

    def checks(self):
        return [_rng(self, "num_layers", ge=1)]


@dataclass
class DataSection:
    train_path: str = option("", "training data: jsonl path or datasets name/dir", required=True)
    split: str = option("train", "split of a datasets name/dir")
    eval_path: str | None = option(None, "held-out rows (jsonl) for the eval section")
    tokenizer: str | None = option(None, 'tokenizer dir; null: the model dir; "tiny": the tokenizer blockdiff ships')
    chat_template: str | None = option(
        None, "a .jinja file replacing the tokenizer's chat template (null: the tokenizer's own); the run dir and "
              "the export keep the template used, as chat_template.jinja")
    seq_length: int = option(1024, "tokens per row: prompt plus canvas blocks")
    canvas_length: int = option(256, "tokens per canvas block")
    prompt_too_long: Literal["skip", "fail"] = option(
        "skip", "a row whose prompt leaves no room for one canvas block: skip it, or fail")
    mask_history: bool = option(
        True, "true: supervise only the final assistant turn; false: every assistant turn is its own canvas "
              "segment conditioned on the clean history before it")
    packing: bool = option(
        False, "pack several conversations per row (document-aware masks, positions restart per conversation)")

    def checks(self):
        out = [_rng(self, "canvas_length", gt=0)]
        if self.seq_length < self.canvas_length + 1:
            out.append(("seq_length", f"expected seq_length >= canvas_length + 1 = {self.canvas_length + 1} "
                                      f"(room for a prompt token and one canvas), got {self.seq_length}"))
        return out


@dataclass
class ObjectiveSection:
    eps: float = option(1e-3, "corruption level t = eps + (1 - eps) * U(0, 1)")
    self_conditioning_prob: float = option(0.5, "probability that a sample gets the self-conditioning pass")
    freeze_router: bool = option(True, "keep the MoE router weights frozen")
    loss_type: Literal["all_supervised", "corrupted_only", "reweighted", "leave_one_out"] = option(
        "all_supervised", "which canvas positions the diffusion loss scores, and how they are weighted")
    ar_loss_weight: float = option(1.0, "weight of the encoder's next-token (AR) co-loss; 0: off")
    ar_loss_scope: Literal["sequence", "response"] = option(
        "sequence", "tokens the AR loss scores: the whole sequence or the response only")
    ar_loss_reduction: Literal["token", "example"] = option(
        "token", "token: AR loss over the global batch's AR tokens; example: mean over its conversations of "
                 "their own means")

    def checks(self):
        return [_rng(self, "eps", gt=0, lt=1), _rng(self, "self_conditioning_prob", ge=0, le=1),
                _rng(self, "ar_loss_weight", ge=0)]


@dataclass
class OptimizerSection:
    lr: float = option(1.5e-4, "peak learning rate (AdamW)")
    betas: tuple[float, float] = option((0.95, 0.99), "AdamW betas")
    eps: float = option(1e-8, "AdamW epsilon")
    weight_decay: float = option(1e-4, "AdamW decoupled weight decay")
    grad_clip: float = option(1.0, "max global grad norm; 0 disables clipping")
    master_update: bool = option(
        False, "one CUDA device in bf16 (unsharded): AdamW that also writes persistent bf16 working weights in "
               "the same pass (master_adamw.py); off: torch's fused AdamW. Opt-in until measured on a GPU")

    def checks(self):
        out = [_rng(self, "lr", gt=0), _rng(self, "eps", gt=0), _rng(self, "weight_decay", ge=0),
               _rng(self, "grad_clip", ge=0)]
        if not all(0 <= b < 1 for b in self.betas):
            out.append(("betas", f"expected two values in [0, 1), got {list(self.betas)}"))
        return out


@dataclass
class SchedulerSection:
    warmup_steps: int = option(25, "steps of linear warmup from 0")
    decay_steps: int = option(800, "cosine to min_lr over this many steps (warmup included)")
    min_lr: float = option(1.5e-5, "learning rate at the end of the cosine decay")
    kind: Literal["cosine", "constant"] = option("cosine", "schedule after warmup")

    def checks(self):
        out = [_rng(self, "warmup_steps", ge=0), _rng(self, "decay_steps", ge=1), _rng(self, "min_lr", ge=0)]
        if self.kind == "cosine" and self.decay_steps < self.warmup_steps:
            out.append(("decay_steps", f"expected decay_steps >= warmup_steps ({self.warmup_steps}), "
                                       f"got {self.decay_steps}"))
        return out


@dataclass
class TrainSection:
    max_steps: int = option(800, "optimizer steps to train")
    global_batch_size: int = option(8, "samples per optimizer step, over all ranks")
    micro_batch_size: int = option(1, "samples per forward/backward on one rank")
    seed: int = option(42, "seed of the data order, the noise and the model init")
    output_dir: str = option("", "run directory (checkpoints, metrics, export)", required=True)
    resume: Literal["auto", "never", "must"] = option(
        "auto", "auto: resume from the run dir's latest checkpoint if any; must: fail without one; "
                "never: fail with one")
    log_every: int = option(1, "log metrics every N steps")
    max_epochs: int | None = option(None, "stop after this many passes over the data (also bounded by max_steps)")
    nan_policy: Literal["skip", "stop"] = option("stop", "a non-finite loss or gradient: skip the step, or stop")
    skip_memory_check: bool = option(False, "true: launch on CUDA even when the memory plan says it cannot fit")

    def checks(self):
        out = [_rng(self, n, ge=1) for n in ("max_steps", "global_batch_size", "micro_batch_size", "log_every",
                                             "max_epochs")]
        out.append(_rng(self, "seed", ge=0))
        if self.micro_batch_size >= 1 and self.global_batch_size % self.micro_batch_size:
            out.append(("global_batch_size", f"expected a multiple of micro_batch_size ({self.micro_batch_size}), "
                                             f"got {self.global_batch_size}"))
        return out


@dataclass
class EvalSection:
    loss_every: int = option(
        0, "validation loss (val_loss, val_diffusion_loss, val_ar_loss) every N steps with fixed noise; 0: off")
    loss_samples: int = option(
        64, "held-out rows it scores: the first N of data.eval_path, or without one N rows of the training file "
            "(a seeded choice, left out of training)")
    accuracy_every: int = option(0, "sampled exact-match accuracy (eval_accuracy) every N steps; 0: off")
    accuracy_samples: int = option(64, "the first N rows of data.eval_path")
    seed: int = option(0, "the validation loss's noise and the sampler's per-prompt seeds")

    def checks(self):
        return [_rng(self, n, ge=0) for n in ("loss_every", "accuracy_every", "seed")] + [
            _rng(self, n, ge=1) for n in ("loss_samples", "accuracy_samples")]


@dataclass
class CheckpointSection:
    every_steps: int = option(400, "checkpoint every N steps; 0: only the final checkpoint")
    keep_last: int = option(2, "checkpoints kept in the run dir (older ones are removed)")
    save_final: bool = option(True, "checkpoint at the end of training (off for throw-away benchmark runs)")
    export_final: bool = option(True, "write a HF-format model dir at the end")
    export_dir: str | None = option(None, "where the final export goes; null: <output_dir>/export")
    export_dtype: Literal["auto", "bfloat16", "float32"] = option(
        "auto", "dtype of the exported weights; auto: the source checkpoint's dtype")

    def checks(self):
        return [_rng(self, "every_steps", ge=0), _rng(self, "keep_last", ge=1)]


@dataclass
class ParallelSection:
    dp: int = option(-1, "data-parallel size; -1: the world size (the only other valid value)")
    ep: int = option(1, "expert-parallel group size (experts split over ep ranks; data parallel over all)")
    activation_checkpointing: bool = option(True, "recompute each layer's activations in backward")
    recompute_expert_exchanges: bool = option(
        False, "ep > 1 with activation checkpointing: false keeps each layer's all-to-all results from the "
               "forward for its recomputation (faster; costs the dispatched rows' memory), true exchanges them again")
    reshard_after_forward: bool = option(
        True, "false: a layer's parameters stay gathered from its first forward (encoder) through its backward "
              "instead of being all-gathered again for each decoder pass and for backward (faster; costs the "
              "gathered bf16 copy of every layer at the forward's end)")
    compile: bool = option(False, "torch.compile each layer")

    def checks(self):
        out = [_rng(self, "ep", ge=1)]
        if self.dp != -1 and self.dp < 1:
            out.append(("dp", f"expected -1 (infer from world size) or a value >= 1, got {self.dp}"))
        return out


@dataclass
class LoraSection:
    enabled: bool = option(False, "train LoRA adapters instead of all weights")
    rank: int = option(16, "LoRA rank r")
    alpha: float = option(32.0, "LoRA scale numerator (the update is scaled by alpha / rank)")
    dropout: float = option(0.0, "dropout on the LoRA input")
    targets: list[str] = option(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                "names of the linear modules to adapt")
    self_conditioning: bool = option(False, "also adapt the self-conditioning block")
    experts: bool = option(False, "also adapt the MoE experts")
    base_quantization: Literal["none", "int8", "nf4", "fp8"] = option(
        "none", "frozen base (attention, dense MLP, experts) stored weight-only quantized: int8 / fp8 e4m3 "
                "per-row scales, nf4 per-64 groups; dequantized to bf16 per layer in the forward")

    def checks(self):
        out = [_rng(self, "rank", ge=1), _rng(self, "alpha", gt=0), _rng(self, "dropout", ge=0, lt=1)]
        if self.enabled and not self.targets and not self.self_conditioning and not self.experts:
            out.append(("targets", "LoRA is enabled but adapts nothing: give at least one target module"))
        return out


@dataclass
class LoggingSection:
    tensorboard: bool = option(True, "write TensorBoard event files into the run dir")
    wandb: bool = option(False, "log to Weights & Biases (needs the wandb package)")
    wandb_project: str | None = option(None, "W&B project name; null: wandb's default")
    progress: bool = option(True, "show a progress bar on rank 0")
    profile_at: int = option(
        0, "> 0: torch-profile steps [profile_at, profile_at + profile_steps) into <run>/profile")
    profile_steps: int = option(2, "steps the profiler records")
    profile_host_ops: bool = option(
        True, "false: record GPU kernels only, not host ops (far less host overhead, so the profiled steps run "
              "closer to unprofiled ones; the tables then list kernels only). CPU runs always record host ops")

    def checks(self):
        return [_rng(self, "profile_at", ge=0), _rng(self, "profile_steps", ge=1)]


@dataclass
class RLSection:
    """``blockdiff rl`` (group-relative policy optimisation); ``blockdiff train`` ignores it."""
    prompts_per_step: int = option(8, "prompts per RL step (over all ranks)")
    group_size: int = option(8, "completions sampled per prompt (the group its advantages are relative to)")
    rewards: list[dict] = option([{"name": "gsm8k_exact", "weight": 1.0}, {"name": "format", "weight": 0.1}],
                                 "reward terms {name, weight}: gsm8k_exact, format or 'module:function'")
    advantage: Literal["group_norm", "mean_only"] = option(
        "group_norm", "group_norm: (r - mean) / (std + advantage_eps); mean_only: r - mean")
    advantage_eps: float = option(1e-4, "added to the group's reward std")
    negative_advantage_weight: float = option(
        1.0, "scale of negative advantages (1: GRPO); < 1 limits pushing the ELBO, a lower bound, down")
    clip_eps: float = option(0.2, "PPO clip of the policy ratio: [1 - clip_eps, 1 + clip_eps]")
    update_iterations: int = option(1, "optimizer steps per rollout batch")
    kl_beta: float = option(
        0.0, "weight of the KL penalty to the starting checkpoint; LoRA: the adapter-off base, full fine-tuning: a "
             "frozen copy of the weights (twice the weight memory)")
    elbo_draws: int = option(2, "noise draws per completion of the ELBO log-likelihood estimate")
    group_draws: bool = option(True, "a prompt's completions share their ELBO noise draws (t, corruption, block): "
                                     "with zero-sum advantages what they have in common cancels")
    score_fill: bool = option(False, "the ELBO scores the EOS fill after a reply too (SFT's rule); false: the "
                                     "reply and its end only")
    max_new_tokens: int = option(256, "tokens sampled per completion at most")
    max_denoising_steps: int | None = option(None, "sampler steps per block; null: the checkpoint's")
    t_max: float | None = option(None, "sampler temperature at the first step; null: the checkpoint's")
    t_min: float | None = option(None, "sampler temperature the schedule decays towards; null: the checkpoint's")

    def checks(self):
        return [_rng(self, "prompts_per_step", ge=1), _rng(self, "group_size", ge=2), _rng(self, "clip_eps", gt=0),
                _rng(self, "advantage_eps", gt=0), _rng(self, "negative_advantage_weight", ge=0, le=1),
                _rng(self, "update_iterations", ge=1), _rng(self, "kl_beta", ge=0),
                _rng(self, "elbo_draws", ge=1), _rng(self, "max_new_tokens", ge=1),
                _rng(self, "max_denoising_steps", ge=1)]


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    rl: RLSection = field(default_factory=RLSection)

    def cross_checks(self):
        out = []
        if self.scheduler.min_lr > self.optimizer.lr:
            out.append(("scheduler.min_lr", f"expected min_lr <= optimizer.lr ({self.optimizer.lr}), "
                                            f"got {self.scheduler.min_lr}"))
        if self.eval.accuracy_every > 0 and not self.data.eval_path:
            out.append(("eval.accuracy_every", f"accuracy_every={self.eval.accuracy_every} needs data.eval_path "
                                               "(held-out rows with reference answers)"))
        return out

    def validate(self) -> "Config":
        """Re-run the type and range checks (for a Config built or edited in code); returns a checked copy."""
        return build(Config, self.to_dict(), getattr(self, "_where", None) or Where("<config>"), _MOVED)

    def to_dict(self) -> dict:
        """Plain dict of plain YAML types (tuples become lists)."""
        def plain(v):
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v
        return {s.name: {f.name: plain(getattr(getattr(self, s.name), f.name))
                         for f in dataclasses.fields(getattr(self, s.name))} for s in dataclasses.fields(self)}

    def save_yaml(self, path) -> None:
        """Write the resolved config (what the run actually used); loads back to an equal Config."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write("# resolved blockdiff config (defaults + file + command-line overrides)\n")
            yaml.safe_dump(self.to_dict(), f, sort_keys=False, default_flow_style=None)


SECTIONS: dict[str, type] = section_types(Config)

# fields that live in another section: the error names the right one
_MOVED = {"train.eval_every": "eval.accuracy_every", "train.eval_samples": "eval.accuracy_samples"}


def config_from_dict(d: dict, source: str = "<dict>") -> Config:
    """Validated Config from a plain nested dict (sections -> fields)."""
    return build(Config, d, Where(source), _MOVED)


def load_config(path=None, overrides=()) -> Config:
    """Defaults <- YAML file (optional) <- ``--section.field value`` overrides; validated."""
    data, lines, source = {}, {}, "<defaults>"
    if path is not None:
        data, lines = read_yaml(path)
        source = os.fspath(path)
    pairs = parse_overrides(overrides, SECTIONS) if overrides and isinstance(overrides[0], str) else list(overrides)
    overridden = apply_overrides(data, pairs, SECTIONS)
    return build(Config, data, Where(source, lines, overridden), _MOVED)


# ----------------------------------------------------------------------------------------- world size
def apply_world_size(cfg: Config, world_size: int) -> int:
    """Resolve ``parallel.dp`` for ``world_size`` ranks, check the layout; return grad-accumulation steps.

    Layout (FSDP + EP): data parallel over all ranks (dp == world size); experts split across groups of
    ``ep`` ranks inside it, so ``ep`` must divide the world size.
    """
    where = getattr(cfg, "_where", None) or Where("<config>")
    p, t = cfg.parallel, cfg.train
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if p.dp == -1:
        p.dp = world_size
    elif p.dp != world_size:
        raise where.error("parallel.dp", f"dp={p.dp} but the world size is {world_size}: data parallelism spans "
                                         f"all ranks (set dp to -1 or {world_size})")
    check_expert_parallel(p.ep, world_size=world_size, where=where)
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise where.error("train.global_batch_size",
                          f"global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size "
                          f"({t.micro_batch_size}) x world size ({world_size}) = {per_step}")
    return t.global_batch_size // per_step


def check_expert_parallel(ep: int, world_size: int | None = None, num_experts: int | None = None,
                          where: Where | None = None) -> None:
    """The expert-parallel layout rule: ``ep`` divides the model's experts and the world size (each given
    value is checked). The error points at ``parallel.ep`` (its YAML line when ``where`` is given)."""
    if num_experts is not None and num_experts % ep:
        msg = f"ep={ep} does not divide the model's {num_experts} experts"
    elif world_size is not None and world_size % ep:
        ok = [k for k in range(1, world_size + 1) if world_size % k == 0]
        msg = f"ep={ep} does not divide the world size {world_size} (experts are split across ep ranks; valid ep: {ok})"
    else:
        return
    raise where.error("parallel.ep", msg) if where is not None else ConfigError(msg, field="parallel.ep")
