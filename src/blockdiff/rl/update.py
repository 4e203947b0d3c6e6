"""The policy update of one rollout batch: this rank's completions as ELBO micro-batches, the rollout-time and
reference log-likelihoods, then ``rl.update_iterations`` optimizer steps of the GRPO loss.

Rank r of W updates on completions [r * N / W, (r + 1) * N / W) of the step's N; a micro-batch holds
``train.micro_batch_size`` completions, each with its K noise draws as rows (``rl.elbo``), so every rank runs
the same number of forward passes (the collectives of a sharded model). The loss of each completion is divided by the global N and
gradients are summed over ranks (FSDP2 reduce-scatters its own), then clipped and applied by AdamW as SFT does.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

from blockdiff.parallel.distributed import DistInfo, all_reduce_, to_device
from blockdiff.parallel.parallelize import begin_step, clip_gradients, is_sharded, reshard_all
from blockdiff.rl.advantages import grpo_loss
from blockdiff.rl.elbo import adapters_disabled, completion_example, draw_streams, elbo, elbo_micro_batch
from blockdiff.rl.rollout import Rollout
from blockdiff.train.precision import bf16_autocast, compute_context


@dataclass
class UpdateResult:
    loss: float = 0.0  # the GRPO loss of the global batch (last iteration)
    kl: float = 0.0  # mean KL estimate per completion (last iteration)
    clip_fraction: float = 0.0  # completions whose clip was active (last iteration)
    ratio_mean: float = 1.0
    grad_norm: float = 0.0
    elbo_mean: float = 0.0  # mean ELBO (nats per scored token) of the current policy, first iteration
    skipped: int = 0  # iterations whose update was skipped (non-finite loss or norm)
    tokens: int = 0  # canvas-batch tokens the forward passes read, all ranks
    seconds: float = 0.0
    lrs: list[float] = field(default_factory=list)


def rank_share(n: int, dist: DistInfo) -> range:
    per = n // dist.world_size
    return range(dist.rank * per, (dist.rank + 1) * per)


def host_batches(rollout: Rollout, step: int, cfg, vocab_size: int, eos_id: int, settings, dist) -> list[tuple]:
    """This rank's (completion indices, canvas batch, noise) micro-batches, built on the host:
    ``train.micro_batch_size`` completions each, every one with its ``rl.elbo_draws`` rows."""
    n, K, mb = len(rollout.replies), cfg.rl.elbo_draws, cfg.train.micro_batch_size
    mine = list(rank_share(n, dist))
    out = []
    for m0 in range(0, len(mine), mb):
        cs = mine[m0:m0 + mb]
        examples = [completion_example(rollout.prompts[c].ids, rollout.replies[c],
                                       canvas_length=cfg.data.canvas_length, seq_length=cfg.data.seq_length,
                                       eos_id=eos_id, sample_id=c) for c in cs]
        scored = None if cfg.rl.score_fill else [len(rollout.replies[c]) for c in cs]
        # rl.group_draws: the completions of one prompt share their draws (keyed by the prompt, not the completion)
        keys, per_step = ([c // cfg.rl.group_size for c in cs], n // cfg.rl.group_size) if cfg.rl.group_draws \
            else (cs, n)
        batch, noise = elbo_micro_batch(examples, [draw_streams(step, k, per_step, K) for k in keys], settings, cfg.data,
                                        seed=cfg.train.seed, vocab_size=vocab_size, device_type=dist.device.type,
                                        scored_lengths=scored)
        out.append((cs, batch, noise))
    return out


@torch.no_grad()
def fixed_elbos(model, micro: list[tuple], settings, cfg, dist, reference: bool) -> torch.Tensor:
    """[len(micro)] ELBOs without gradients: of the reference policy (``reference``: a LoRA model with its
    adapters off, or the frozen copy given as ``model``), else of ``model`` as it is (the rollout-time policy)."""
    values = []  # in the mode the update runs in, so that LoRA dropout, if any, is alike
    with adapters_disabled(model) if reference else contextlib.nullcontext():
        for _, batch, noise in micro:
            batch, noise = to_device(batch, dist.device), to_device(noise, dist.device)
            with compute_context(model, dist.device, cfg.model.dtype), bf16_autocast(dist.device, cfg.model.dtype):
                values.append(elbo(model, batch, noise, settings, cfg.rl.elbo_draws).float())
    if is_sharded(model):  # forwards only: no backward resharded the root unit
        reshard_all(model)
    return torch.cat(values) if values else torch.zeros(0, device=dist.device)


def accumulate_gradients(model, params, optimizer, micro: list[tuple], adv: torch.Tensor, old, ref, settings, cfg,
                         dist: DistInfo, n: int) -> torch.Tensor:
    """Forward and backward of the GRPO loss over this rank's micro-batches, gradients summed over ranks.
    ``old`` / ``ref``: this rank's rollout-time / reference ELBOs (None: old == new, no KL). Returns the global
    sums [loss, kl, clipped, ratio, elbo] (float64, on the device)."""
    rl, dev = cfg.rl, dist.device
    sums = torch.zeros(5, dtype=torch.float64, device=dev)
    done = 0  # completions of this rank before the micro-batch (index into old / ref)
    for cs, batch, noise in micro:
        batch, noise = to_device(batch, dev), to_device(noise, dev)
        mine = slice(done, done + len(cs))
        done += len(cs)
        with compute_context(model, dev, cfg.model.dtype, optimizer):  # the train step's precision
            with bf16_autocast(dev, cfg.model.dtype):
                new = elbo(model, batch, noise, settings, rl.elbo_draws).float()
                out = grpo_loss(new, new.detach() if old is None else old[mine], None if ref is None else ref[mine],
                                adv[cs[0]:cs[-1] + 1], rl.clip_eps, rl.kl_beta, n)
            out["loss"].backward()
        sums += torch.stack([out["loss"].detach(), out["kl_sum"], out["clipped"], out["ratio_sum"],
                             new.detach().sum()]).double()
    all_reduce_(sums, dist)
    if dist.world_size > 1 and not is_sharded(model):  # FSDP already SUMMED the grads
        for p in params:
            if p.grad is not None:
                all_reduce_(p.grad, dist)
    return sums


def update(model, optimizer, params, rollout: Rollout, micro: list[tuple], settings, cfg, dist: DistInfo, *,
           reference_model, lr_at, first: bool) -> UpdateResult:
    """``rl.update_iterations`` optimizer steps on this rollout; ``lr_at(i)`` is iteration i's learning rate.
    ``reference_model``: None (no KL), ``model`` itself (LoRA: adapters off) or a frozen copy."""
    rl, dev, n = cfg.rl, dist.device, len(rollout.completions)
    t0 = time.perf_counter()
    res = UpdateResult()
    passes = 0
    ref = None
    if rl.kl_beta > 0:
        ref = fixed_elbos(reference_model, micro, settings, cfg, dist, reference=reference_model is model)
        passes += 1
    old = None
    if rl.update_iterations > 1:  # one iteration: the rollout-time policy is the current one, old == new exactly
        old = fixed_elbos(model, micro, settings, cfg, dist, reference=False)
        passes += 1
    adv = rollout.advantages.to(dev)
    for it in range(rl.update_iterations):
        begin_step(model, first=first and it == 0)
        lr = lr_at(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        res.lrs.append(lr)
        sums = accumulate_gradients(model, params, optimizer, micro, adv, old, ref, settings, cfg, dist, n)
        passes += 1
        grad_norm = clip_gradients(params, optimizer, cfg.optimizer.grad_clip)
        nonfinite = ~(torch.isfinite(sums).all() & torch.isfinite(grad_norm))
        optimizer.found_inf = nonfinite.float()  # the fused kernel skips the update: no host read before it
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss, kl, clipped, ratio, elbo_sum = sums.tolist()
        if bool(nonfinite):
            res.skipped += 1
        res.loss, res.kl, res.clip_fraction, res.ratio_mean = loss, kl / n, clipped / n, ratio / n
        res.grad_norm = float(grad_norm)
        if it == 0:
            res.elbo_mean = elbo_sum / n
    res.tokens = sum(int(b.valid.sum()) for _, b, _ in micro) * dist.world_size * passes
    res.seconds = time.perf_counter() - t0
    if not math.isfinite(res.loss):
        res.loss = float("nan")
    return res
