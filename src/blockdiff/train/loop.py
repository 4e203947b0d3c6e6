"""The SFT training loop. One step reads top-down:

    global batch of sample indices -> this rank's micro-batches (canvas batches) -> corruption
    -> encoder + decoder passes -> objective -> backward -> (all-reduce) -> clip -> AdamW step

fp32 master weights; bf16 autocast on GPU, fp32 on CPU. The data position, the noise and the
self-conditioning coins are all functions of the step and the global sample index, so a resumed or
re-sharded run continues the identical trajectory.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import signal
import time
from pathlib import Path

import torch

from blockdiff.checkpoint.training import latest_checkpoint, load_checkpoint, save_checkpoint, save_sharded_checkpoint
from blockdiff.config.schema import Config, apply_world_size
from blockdiff.data.canvas import SFTDataset, global_order
from blockdiff.parallel.distributed import DistInfo, all_reduce_, init_distributed, to_device
from blockdiff.errors import BlockdiffError, ConfigError
from blockdiff.train.guards import GradNormGuard
from blockdiff.train.loading import build_model, build_training_model, model_config  # noqa: F401  (build_model: tools, tests)
from blockdiff.train.metrics import MetricsLogger, StepProfiler, peak_memory_gib
from blockdiff.train.master_adamw import build_optimizer
from blockdiff.model.config import ModelConfig
from blockdiff.checkpoint.live_export import export_model
from blockdiff.objective.loss import ObjectiveSettings, compute_loss, count_scored, noisy_micro_batch
from blockdiff.parallel.parallelize import begin_step, clip_gradients, is_sharded
from blockdiff.plan.report import check_before_training
from blockdiff.train.periodic_eval import PeriodicEval, split_held_out
from blockdiff.train.precision import compute_context

log = logging.getLogger("blockdiff")


class TrainingError(BlockdiffError):
    pass


# ---------------------------------------------------------------------------------------- building


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    from blockdiff.data import load_tiny_tokenizer
    from blockdiff.data.chat import install_chat_template, tokenizer_name

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
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        saved = {}
    new = cfg.to_dict()
    differ = [f"{s}.{k}" for s in new for k in new[s] if f"{s}.{k}" != "train.output_dir"  # a moved run is the same
              and (not isinstance(saved.get(s), dict) or saved[s].get(k) != new[s][k])]
    return f"its config differs in {', '.join(differ[:3])}" if differ else None


class StopSignal:
    """SIGTERM / SIGUSR1 (cluster preemption): finish the step, checkpoint, exit 0."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


# ---------------------------------------------------------------------------------------- the loop


@functools.lru_cache(maxsize=2)  # the epoch a step reads, and the next one when its batch crosses the boundary
def _epoch_order(dataset_size: int, epoch: int, seed: int) -> tuple[int, ...]:
    return tuple(global_order(dataset_size, epoch, seed))


def step_sample_indices(step: int, global_batch: int, dataset_size: int, seed: int) -> list[int]:
    """Dataset indices of the global batch at ``step``: consecutive slices of per-epoch permutations."""
    out = []
    for pos in range(step * global_batch, (step + 1) * global_batch):
        epoch, i = divmod(pos, dataset_size)
        out.append(_epoch_order(dataset_size, epoch, seed)[i])
    return out


def micro_to_device(micro: list[tuple], device: torch.device) -> list[tuple]:
    return [(to_device(b, device), to_device(n, device)) for b, n in micro]


def host_micro_batches(step: int, cfg: Config, dataset, dist: DistInfo, vocab_size: int,
                       settings: ObjectiveSettings) -> list[tuple]:
    """This rank's share of the global batch at ``step``, as (canvas batch, noise) micro-batches built on
    the host (CPU tensors, scored-token indices included), so that building them never waits for the GPU:
    the trainer builds the next step's while the GPU finishes this one.

    Rank r takes positions [r * G/W, (r+1) * G/W) of the global batch; noise is keyed by the global
    stream index step * G + position, so it does not depend on the world size or the split.
    With ``data.packing`` each micro-batch's conversations are regrouped into rows of ``seq_length``
    (``data.packing.pack_rows``: only the layout changes, never which samples this micro-batch holds) and
    every conversation keeps its own stream index."""
    G, mb = cfg.train.global_batch_size, cfg.train.micro_batch_size
    indices = step_sample_indices(step, G, len(dataset), cfg.train.seed)
    per_rank = G // dist.world_size
    mine = range(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    micro = []
    for m0 in range(0, per_rank, mb):
        pos = list(mine[m0 : m0 + mb])
        micro.append(noisy_micro_batch([dataset[indices[p]] for p in pos], [step * G + p for p in pos], settings,
                                       cfg.data, seed=cfg.train.seed, vocab_size=vocab_size,
                                       device_type=dist.device.type))
    return micro


def global_token_counts(micro, settings: ObjectiveSettings, dist: DistInfo) -> torch.Tensor:
    """[2] float64 on the device: (diffusion, AR) scored tokens of the whole global batch; every
    micro-batch's loss is divided by them. Counted from ``micro`` (host micro-batches: no host read of the
    GPU) and summed over ranks on the device, where the losses read them."""
    local = [sum(count_scored(b, n, settings)[i] for b, n in micro) for i in (0, 1)]
    return all_reduce_(to_device(torch.tensor(local, dtype=torch.float64), dist.device), dist)


def train(cfg: Config) -> Path:
    check_before_training(cfg)  # the memory plan, before any weight is read (refuses on CUDA if it cannot fit)
    dist = init_distributed()
    accum = apply_world_size(cfg, dist.world_size)
    device = dist.device
    torch.manual_seed(cfg.train.seed)
    run_dir, resume_from = prepare_run_dir(cfg, dist)

    tokenizer = load_tokenizer(cfg)
    mc = model_config(cfg)
    check_consistency(cfg, mc, tokenizer)  # before any weight is read
    dataset = SFTDataset(cfg.data.train_path, tokenizer, canvas_length=cfg.data.canvas_length,
                         seq_length=cfg.data.seq_length, prompt_policy=cfg.data.prompt_too_long,
                         split=cfg.data.split, eos_id=mc.eos_token_id, mask_history=cfg.data.mask_history)
    dataset, held_out = split_held_out(cfg, dataset, tokenizer, mc.eos_token_id)  # eval.loss_every
    write_run_dir(cfg, dist, run_dir, tokenizer)  # only once the data is known good: bad data writes nothing
    # on meta, LoRA and the frozen router applied, parallelized, then each rank fills its own shards
    model = build_training_model(cfg, dist)
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optimizer
    # fused AdamW; one GPU in bf16 with optimizer.master_update: MasterAdamW (writes the bf16 working weights)
    optimizer = build_optimizer(model, params, o, device, cfg.model.dtype)
    schedule = lr_lambda(cfg)
    settings = ObjectiveSettings.from_config(cfg.objective)

    start = 0
    if resume_from is not None:
        meta = load_checkpoint(resume_from, model, optimizer)
        start = int(meta["step"])
        log.info("resumed from %s at step %d", resume_from, start)

    rank0 = dist.rank == 0
    metrics = MetricsLogger(run_dir, rank0, cfg.logging.tensorboard, cfg.logging.wandb, cfg.logging.wandb_project,
                            cfg.to_dict(), resume_step=start)
    if rank0:
        stats = {**dataset.stats(), "world_size": dist.world_size, "grad_accum": accum,
                 "trainable_params": sum(p.numel() for p in params)}
        (run_dir / "data_stats.json").write_text(json.dumps(stats, indent=1))
        log.info("data: %s", stats)

    G = cfg.train.global_batch_size
    max_steps = cfg.train.max_steps
    if cfg.train.max_epochs:
        max_steps = min(max_steps, cfg.train.max_epochs * len(dataset) // G)
    autocast = device.type == "cuda" and cfg.model.dtype == "bfloat16"
    stop = StopSignal()
    progress = None
    if rank0 and cfg.logging.progress:
        from tqdm import tqdm

        progress = tqdm(total=max_steps, initial=start, desc="train", dynamic_ncols=True)
    periodic_eval = PeriodicEval(cfg, model, tokenizer, dist, held_out)
    nan_skipped = int(meta.get("nan_skipped", 0)) if resume_from is not None else 0  # resumed runs keep counting
    grad_guard = GradNormGuard()  # warns when the grad norm explodes repeatedly
    last_step_done = start
    profiler = StepProfiler(run_dir, cfg.logging.profile_at, cfg.logging.profile_steps, dist.rank, device,
                            host_ops=cfg.logging.profile_host_ops)
    def build_host_micro(step: int) -> list[tuple]:
        return host_micro_batches(step, cfg, dataset, dist, model.config.vocab_size, settings)

    prefetched = None
    for step in range(start, max_steps):
        profiler.before_step(step)
        t0 = time.perf_counter()
        begin_step(model, first=step == start)
        lr = o.lr * schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # built on the host during the previous step (or now, on the first step of this process)
        host_micro = prefetched if prefetched is not None else build_host_micro(step)
        n_diff, n_ar = global_token_counts(host_micro, settings, dist)
        micro = micro_to_device(host_micro, device)

        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, diffusion, ar
        for batch, noise in micro:
            # one GPU: bf16 working weights (precision.py, the optimizer's); FSDP2 casts when sharded
            with compute_context(model, device, cfg.model.dtype, optimizer):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    out = compute_loss(model, batch, noise, settings, n_diff, n_ar)
                out["loss"].backward()
            sums += torch.stack([out["loss"].detach(), out["diffusion_loss"], out["ar_loss"]]).double()
        all_reduce_(sums, dist)
        if dist.world_size > 1 and not is_sharded(model):  # FSDP already SUMMED the grads (parallel.py)
            for p in params:
                if p.grad is not None:
                    all_reduce_(p.grad, dist)
        # global norm, also over sharded (DTensor / expert-parallel) grads; fused AdamW clips in its kernel
        grad_norm = clip_gradients(params, optimizer, cfg.optimizer.grad_clip)
        # a non-finite loss or norm skips the update inside the fused kernel (params, moments, step count
        # untouched), so no host read stalls the queue before the optimizer step; it is read after
        nonfinite = ~(torch.isfinite(sums).all() & torch.isfinite(grad_norm))
        optimizer.found_inf = nonfinite.float()
        optimizer.step()
        # the next step's micro-batches, built on the host while the GPU runs this step's queued work
        prefetched = build_host_micro(step + 1) if step + 1 < max_steps else None
        finite = not bool(nonfinite)
        grad_guard.observe(step + 1, float(grad_norm))
        if not finite:
            nan_skipped += 1
            bad = [n for n, v in zip(("loss", "diffusion_loss", "ar_loss"), sums.tolist()) if not math.isfinite(v)]
            diag = (f"non-finite {'/'.join(bad) or 'gradient'} at step {step} (grad norm {float(grad_norm)}); "
                    f"sample ids {[int(s) for b, _ in micro for s in b.sample_ids]}")
            if cfg.train.nan_policy == "stop":
                raise TrainingError(diag + "; weights left as after the previous step (nan_policy: stop)")
            log.warning("%s: step skipped (nan_policy: skip, %d so far)", diag, nan_skipped)
        optimizer.zero_grad(set_to_none=True)
        last_step_done = step + 1

        if (step + 1) % cfg.train.log_every == 0 or step + 1 == max_steps:
            # the host already waited for the whole step, optimizer included (``bool(nonfinite)`` is queued
            # after it), so this is the step's wall time, not the time to queue it
            dt = time.perf_counter() - t0
            tokens = sum(int(b.valid.sum()) for b, _ in host_micro) * dist.world_size
            # real (non-pad) tokens / padded tokens of the step (this rank's micro-batches)
            packing_efficiency = (sum(b.real_tokens() for b, _ in host_micro)
                                  / max(sum(b.padded_tokens() for b, _ in host_micro), 1))
            loss, diff, ar = sums.tolist()
            row = {"loss": loss, "diffusion_loss": diff, "ar_loss": ar, "grad_norm": float(grad_norm),
                   "lr": lr, "tokens_per_s": tokens / dt, "step_time_s": dt,
                   "packing_efficiency": packing_efficiency,
                   "peak_mem_gib": peak_memory_gib(device), "nan_skipped": nan_skipped}
            metrics.log(step + 1, row)
            if progress is not None:
                progress.set_postfix(loss=f"{loss:.3f}", diff=f"{diff:.3f}", lr=f"{row['lr']:.2e}")
        profiler.after_step(step)
        if progress is not None:
            progress.update(1)

        periodic_eval.maybe_run(step + 1, metrics)
        every = cfg.checkpoint.every_steps
        if (every and (step + 1) % every == 0) or stop.received:
            _checkpoint(run_dir, step + 1, model, optimizer, cfg, dist, nan_skipped)
        if stop.received:
            log.warning("%s received: checkpoint at step %d written, exiting", stop.received, step + 1)
            profiler.close()
            metrics.close()
            return run_dir

    profiler.close()
    if progress is not None:
        progress.close()
    already_saved = cfg.checkpoint.every_steps and last_step_done % cfg.checkpoint.every_steps == 0
    if cfg.checkpoint.save_final and not already_saved:
        _checkpoint(run_dir, last_step_done, model, optimizer, cfg, dist, nan_skipped)
    metrics.close()
    if cfg.checkpoint.export_final:  # every rank gathers one tensor at a time, rank 0 writes
        export_dir = Path(cfg.checkpoint.export_dir or run_dir / "export")
        # LoRA: export_dir = adapters merged in, export_dir/adapter = the PEFT adapter
        export_model(model, export_dir, dist, dtype=cfg.checkpoint.export_dtype,
                     base_model_name_or_path=cfg.model.name_or_path, lora_cfg=cfg.lora if cfg.lora.enabled else None)
        if rank0:
            tokenizer.save_pretrained(export_dir)
            log.info("exported transformers checkpoint to %s", export_dir)
    return run_dir


def _checkpoint(run_dir, step, model, optimizer, cfg, dist, nan_skipped) -> None:
    if is_sharded(model):  # torch.distributed.checkpoint: every rank writes its own shards, no gathering
        save_sharded_checkpoint(run_dir, step, model, optimizer, {"nan_skipped": nan_skipped, "world_size":
                                dist.world_size, "ep": cfg.parallel.ep}, keep_last=cfg.checkpoint.keep_last)
        return
    if dist.rank == 0:
        save_checkpoint(run_dir, step, model, optimizer, {"nan_skipped": nan_skipped, "world_size": dist.world_size},
                        keep_last=cfg.checkpoint.keep_last)
    if dist.world_size > 1:
        torch.distributed.barrier()
