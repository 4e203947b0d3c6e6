"""``blockdiff rl``: group-relative policy optimisation (GRPO) with verifiable rewards. One step reads:

    the step's P prompts -> G completions each (the entropy-bound sampler, all ranks in lockstep)
    -> rewards -> group-relative advantages -> ELBO micro-batches (shared noise draws)
    -> rl.update_iterations optimizer steps of the clipped-ratio loss + KL penalty

The run directory, checkpoints, resume, metrics, progress bar, plots and export are SFT's (``blockdiff
train``): the same config sections, with ``rl`` for the algorithm and ``train.max_steps`` counting RL
steps. Every random draw (prompt order, sampler rows, ELBO noise) is a function of the step and a global
index, so a resumed or re-sharded run continues the identical trajectory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from blockdiff.config.schema import Config
from blockdiff.errors import ConfigError
from blockdiff.infer import prompting
from blockdiff.infer.evaluate import settings_for_checkpoint
from blockdiff.infer.sampling import SamplerSettings
from blockdiff.parallel.distributed import DistInfo, init_distributed
from blockdiff.parallel.parallelize import is_sharded
from blockdiff.plan.report import check_before_training
from blockdiff.rl.elbo import elbo_settings
from blockdiff.rl.plots import plot_rl
from blockdiff.rl.rewards import build_rewards
from blockdiff.rl.rollout import PromptSet, sample_rollout
from blockdiff.rl.update import host_batches, update
from blockdiff.train.loading import build_training_model
from blockdiff.train.loop import StopSignal, checkpoint_after_step, checkpoint_at_end, export_final
from blockdiff.train.metrics import MetricsLogger, peak_memory_gib
from blockdiff.train.periodic_eval import PeriodicEval
from blockdiff.train.setup import build_run, load_tokenizer
from blockdiff.train.step import TrainingError

log = logging.getLogger("blockdiff")


def check_layout(cfg: Config, world_size: int) -> None:
    """The step's completions split evenly over the ranks."""
    n = cfg.rl.prompts_per_step * cfg.rl.group_size
    if n % world_size:
        where = getattr(cfg, "_where", None)
        msg = (f"prompts_per_step x group_size = {n} completions per step do not split evenly over {world_size} "
               "ranks")
        raise where.error("rl.prompts_per_step", msg) if where else ConfigError(msg, field="rl.prompts_per_step")


def sampler_settings(cfg: Config, model, tokenizer) -> SamplerSettings:
    """The rollouts' sampler: the checkpoint's generation config with the ``rl`` overrides and the tokenizer's
    stop tokens. A sharded model samples eagerly (graphs and compiled layers would capture its collectives)."""
    src = cfg.model.name_or_path if cfg.model.from_config is None else None
    plain = not is_sharded(model)
    s = settings_for_checkpoint(src, tokenizer, max_new_tokens=cfg.rl.max_new_tokens,
                                max_denoising_steps=cfg.rl.max_denoising_steps, t_max=cfg.rl.t_max,
                                t_min=cfg.rl.t_min, seed=cfg.train.seed, cuda_graphs=plain, compile=plain)
    return prompting.settings_for_tokenizer(s, tokenizer)


def reference_policy(cfg: Config, dist: DistInfo, model):
    """None without a KL term; a LoRA model is its own reference (adapters off); full fine-tuning: a frozen
    copy of the starting weights, built and sharded like the policy."""
    if cfg.rl.kl_beta == 0:
        return None
    if cfg.lora.enabled:
        return model
    ref = build_training_model(cfg, dist)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def rl_train(cfg: Config) -> Path:
    terms = build_rewards(cfg.rl.rewards, getattr(cfg, "_where", None))  # before anything is read or written
    check_before_training(cfg, rl=True)  # the update's memory plan, before the process group (refuses on CUDA)
    dist = init_distributed()
    check_layout(cfg, dist.world_size)
    prompts = PromptSet(cfg.data.train_path, load_tokenizer(cfg), canvas_length=cfg.data.canvas_length,
                        seq_length=cfg.data.seq_length, prompt_policy=cfg.data.prompt_too_long, split=cfg.data.split)
    # run dir, tokenizer, model, AdamW, LR schedule and resume as SFT builds them
    run = build_run(cfg, dist, dataset=prompts)
    model, optimizer, params, tokenizer, run_dir = run.model, run.optimizer, run.params, run.tokenizer, run.run_dir
    mc = model.config
    reference = reference_policy(cfg, dist, model)
    settings = elbo_settings(run.settings)
    sampler = sampler_settings(cfg, model, tokenizer)
    start, meta, schedule = run.start_step, run.resumed_meta or {}, run.schedule
    rank0 = dist.rank == 0
    metrics = MetricsLogger(run_dir, rank0, cfg.logging.tensorboard, cfg.logging.wandb, cfg.logging.wandb_project,
                            cfg.to_dict(), resume_step=start)
    periodic_eval = PeriodicEval(cfg, model, tokenizer, dist, None)  # eval.accuracy_every on data.eval_path
    rl, o = cfg.rl, cfg.optimizer
    stop = StopSignal()
    nan_skipped = int(meta.get("nan_skipped", 0))
    progress = None
    if rank0 and cfg.logging.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.train.max_steps, initial=start, desc="rl", dynamic_ncols=True)
    last = start
    for step in range(start, cfg.train.max_steps):
        t0 = time.perf_counter()
        rollout = sample_rollout(model, tokenizer, prompts, step, prompts_per_step=rl.prompts_per_step,
                                 group_size=rl.group_size, seed=cfg.train.seed, sampler=sampler, terms=terms,
                                 advantage=rl.advantage, adv_eps=rl.advantage_eps, dist=dist,
                                 negative_weight=rl.negative_advantage_weight, dtype_name=cfg.model.dtype)
        micro = host_batches(rollout, step, cfg, mc.vocab_size, mc.eos_token_id, settings, dist)
        res = update(model, optimizer, params, rollout, micro, settings, cfg, dist, reference_model=reference,
                     lr_at=lambda it: o.lr * schedule(step * rl.update_iterations + it), first=step == start)
        if res.skipped:
            nan_skipped += res.skipped
            msg = f"non-finite RL loss or gradient at step {step} (loss {res.loss}, grad norm {res.grad_norm})"
            if cfg.train.nan_policy == "stop":
                raise TrainingError(msg + "; weights left as after the previous update (nan_policy: stop)")
            log.warning("%s: update skipped (nan_policy: skip, %d so far)", msg, nan_skipped)
        last = step + 1
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.max_steps:
            new_tokens = sum(len(c) for c in rollout.completions)
            row = {"loss": res.loss, "reward_mean": float(rollout.rewards.mean()),
                   "reward_std": float(rollout.rewards.std(unbiased=False)),
                   "accuracy": float(rollout.accuracy.mean()),
                   **{f"reward_{k}": sum(v) / len(v) for k, v in rollout.parts.items()},
                   "kl": res.kl, "clip_fraction": res.clip_fraction, "ratio_mean": res.ratio_mean,
                   "elbo": res.elbo_mean, "completion_length": new_tokens / len(rollout.completions),
                   "grad_norm": res.grad_norm, "lr": res.lrs[-1], "rollout_s": rollout.seconds,
                   "update_s": res.seconds, "rollout_tokens_per_s": new_tokens / max(rollout.seconds, 1e-9),
                   "update_tokens_per_s": res.tokens / max(res.seconds, 1e-9),
                   "step_time_s": time.perf_counter() - t0, "peak_mem_gib": peak_memory_gib(dist.device),
                   "nan_skipped": nan_skipped}
            metrics.log(step + 1, row)
            if progress is not None:
                progress.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.3f}",
                                     kl=f"{row['kl']:.4f}")
        if progress is not None:
            progress.update(1)
        periodic_eval.maybe_run(step + 1, metrics)
        if checkpoint_after_step(run_dir, step + 1, model, optimizer, cfg, dist, nan_skipped, stop):
            metrics.close()
            return run_dir
    if progress is not None:
        progress.close()
    checkpoint_at_end(run_dir, start, last, model, optimizer, cfg, dist, nan_skipped)
    metrics.close()
    if rank0:
        plot_rl(run_dir)
    if cfg.checkpoint.export_final:
        export_final(model, tokenizer, cfg, dist, run_dir)
    return run_dir
