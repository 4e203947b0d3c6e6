"""The SFT training loop: ``build_run`` (train/setup.py), then ``train_step`` (train/step.py) per step, with
the metrics, periodic evaluation, checkpoints, preemption signals and the final export around it.

fp32 master weights; bf16 compute on GPU, fp32 on CPU. A resumed or re-sharded run continues the identical
trajectory (see train/step.py).
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from blockdiff.checkpoint.live_export import export_model
from blockdiff.checkpoint.training import save_checkpoint, save_sharded_checkpoint
from blockdiff.config.schema import Config
from blockdiff.parallel.distributed import init_distributed
from blockdiff.parallel.parallelize import is_sharded
from blockdiff.plan.report import check_before_training
from blockdiff.train.guards import GradNormGuard
from blockdiff.train.metrics import MetricsLogger, StepProfiler, peak_memory_gib
from blockdiff.train.periodic_eval import PeriodicEval
from blockdiff.train.setup import build_run
from blockdiff.train.step import handle_nonfinite, host_micro_batches, train_step

log = logging.getLogger("blockdiff")


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


def train(cfg: Config) -> Path:
    check_before_training(cfg)  # the memory plan, before any weight is read (refuses on CUDA if it cannot fit)
    dist = init_distributed()
    run = build_run(cfg, dist)
    model, optimizer, run_dir, device = run.model, run.optimizer, run.run_dir, dist.device
    start = run.start_step
    rank0 = dist.rank == 0
    metrics = MetricsLogger(run_dir, rank0, cfg.logging.tensorboard, cfg.logging.wandb, cfg.logging.wandb_project,
                            cfg.to_dict(), resume_step=start)

    max_steps = cfg.train.max_steps
    if cfg.train.max_epochs:
        max_steps = min(max_steps, cfg.train.max_epochs * len(run.dataset) // cfg.train.global_batch_size)
    stop = StopSignal()
    progress = (tqdm(total=max_steps, initial=start, desc="train", dynamic_ncols=True)
                if rank0 and cfg.logging.progress else None)
    periodic_eval = PeriodicEval(cfg, model, run.tokenizer, dist, run.held_out)
    nan_skipped = int((run.resumed_meta or {}).get("nan_skipped", 0))  # resumed runs keep counting
    grad_guard = GradNormGuard()  # warns when the grad norm explodes repeatedly
    last_step_done = start
    profiler = StepProfiler(run_dir, cfg.logging.profile_at, cfg.logging.profile_steps, dist.rank, device,
                            host_ops=cfg.logging.profile_host_ops)

    def build_host_micro(step: int) -> list[tuple]:
        return host_micro_batches(step, cfg, run.dataset, dist, run.vocab_size, run.settings)

    prefetched = None
    for step in range(start, max_steps):
        profiler.before_step(step)
        t0 = time.perf_counter()
        lr = cfg.optimizer.lr * run.schedule(step)
        # built on the host during the previous step (or now, on the first step of this process)
        host_micro = prefetched if prefetched is not None else build_host_micro(step)
        outcome = train_step(model, optimizer, run.params, host_micro, run.settings, dist, dtype_name=cfg.model.dtype,
                             grad_clip=cfg.optimizer.grad_clip, lr=lr, first=step == start)
        # the next step's micro-batches, built on the host while the GPU runs this step's queued work
        prefetched = build_host_micro(step + 1) if step + 1 < max_steps else None
        grad_guard.observe(step + 1, float(outcome.grad_norm))
        nan_skipped = handle_nonfinite(outcome, step, host_micro, cfg.train.nan_policy, nan_skipped)
        last_step_done = step + 1

        if (step + 1) % cfg.train.log_every == 0 or step + 1 == max_steps:
            # the host already waited for the whole step, optimizer included (the grad norm is read after
            # it), so this is the step's wall time, not the time to queue it
            dt = time.perf_counter() - t0
            tokens = sum(int(b.valid.sum()) for b, _ in host_micro) * dist.world_size
            # real (non-pad) tokens / padded tokens of the step (this rank's micro-batches)
            packing_efficiency = (sum(b.real_tokens() for b, _ in host_micro)
                                  / max(sum(b.padded_tokens() for b, _ in host_micro), 1))
            loss, diff, ar = outcome.sums.tolist()
            row = {"loss": loss, "diffusion_loss": diff, "ar_loss": ar, "grad_norm": float(outcome.grad_norm),
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
        if checkpoint_after_step(run_dir, step + 1, model, optimizer, cfg, dist, nan_skipped, stop):
            profiler.close()
            metrics.close()
            return run_dir

    profiler.close()
    if progress is not None:
        progress.close()
    checkpoint_at_end(run_dir, start, last_step_done, model, optimizer, cfg, dist, nan_skipped)
    metrics.close()
    if cfg.checkpoint.export_final:
        export_final(model, run.tokenizer, cfg, dist, run_dir)
    return run_dir


def export_final(model, tokenizer, cfg: Config, dist, run_dir: Path) -> Path:
    """The run's transformers export (``checkpoint.export_dir``, default RUN/export): every rank gathers one
    tensor at a time, rank 0 writes. LoRA: the adapters merged in, and RUN/export/adapter the PEFT adapter."""
    export_dir = Path(cfg.checkpoint.export_dir or run_dir / "export")
    export_model(model, export_dir, dist, dtype=cfg.checkpoint.export_dtype,
                 base_model_name_or_path=cfg.model.name_or_path, lora_cfg=cfg.lora if cfg.lora.enabled else None)
    if dist.rank == 0:
        tokenizer.save_pretrained(export_dir)
        log.info("exported transformers checkpoint to %s", export_dir)
    return export_dir


def checkpoint_after_step(run_dir, step, model, optimizer, cfg, dist, nan_skipped, stop: StopSignal) -> bool:
    """The checkpoint after ``step`` steps: every ``checkpoint.every_steps``, or when a stop signal arrived.
    True when the run must exit now (the signal's checkpoint is written)."""
    every, received = cfg.checkpoint.every_steps, stop.received  # read once: a signal may land in between
    if (every and step % every == 0) or received:
        save_run_checkpoint(run_dir, step, model, optimizer, cfg, dist, nan_skipped)
    if received:
        log.warning("%s received: checkpoint at step %d written, exiting", received, step)
    return bool(received)


def checkpoint_at_end(run_dir, start, last, model, optimizer, cfg, dist, nan_skipped) -> None:
    """``checkpoint.save_final``: the last step's checkpoint, unless the periodic one has it or this process ran
    no step (a resume of a finished run rewrites nothing)."""
    every = cfg.checkpoint.every_steps
    if cfg.checkpoint.save_final and last > start and not (every and last % every == 0):
        save_run_checkpoint(run_dir, last, model, optimizer, cfg, dist, nan_skipped)


def save_run_checkpoint(run_dir, step, model, optimizer, cfg, dist, nan_skipped) -> None:
    if is_sharded(model):  # torch.distributed.checkpoint: every rank writes its own shards, no gathering
        save_sharded_checkpoint(run_dir, step, model, optimizer, {"nan_skipped": nan_skipped, "world_size":
                                dist.world_size, "ep": cfg.parallel.ep}, keep_last=cfg.checkpoint.keep_last)
        return
    if dist.rank == 0:
        save_checkpoint(run_dir, step, model, optimizer, {"nan_skipped": nan_skipped, "world_size": dist.world_size},
                        keep_last=cfg.checkpoint.keep_last)
    if dist.world_size > 1:
        torch.distributed.barrier()
