"""One optimizer step of the recipe: ``train_step``, and the micro-batches it reads.

    global batch of sample indices (step_sample_indices) -> this rank's micro-batches, built on the host
    (host_micro_batches: canvas batches + their noise) -> per micro-batch: encoder + decoder passes ->
    objective -> backward -> (all-reduce) -> clip -> AdamW (a non-finite step is skipped inside the kernel)

The data position, the noise and the self-conditioning coins are functions of the step and the global sample
index only, so a resumed or re-sharded run continues the identical trajectory. The loop (``train.loop``),
``blockdiff bench``, the benchmarks and the distributed tests all call ``train_step``.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch

from blockdiff.config.schema import Config
from blockdiff.data.canvas import global_order
from blockdiff.errors import BlockdiffError
from blockdiff.objective.loss import ObjectiveSettings, compute_loss, count_scored, noisy_micro_batch
from blockdiff.parallel.distributed import DistInfo, all_reduce_, to_device
from blockdiff.parallel.parallelize import begin_step, clip_grad_norm_, clip_gradients, is_sharded
from blockdiff.train.precision import bf16_autocast, compute_context

log = logging.getLogger("blockdiff")


class TrainingError(BlockdiffError):
    pass


# ---------------------------------------------------------------------------------------- the step's data


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


# ---------------------------------------------------------------------------------------- the step


@dataclass
class StepOutcome:
    """What a step leaves on the device; reading it (``finite``, ``.tolist()``) waits for the step."""

    sums: torch.Tensor  # [3] float64: loss, diffusion loss, AR loss of the global batch
    grad_norm: torch.Tensor  # the global norm before clipping
    nonfinite: torch.Tensor  # bool: the update was skipped (loss or norm not finite)

    @property
    def finite(self) -> bool:
        return not bool(self.nonfinite)


def train_step(model, optimizer, params, micro: list[tuple], settings: ObjectiveSettings, dist: DistInfo, *,
               dtype_name: str, grad_clip: float, lr: float | None = None, first: bool = False) -> StepOutcome:
    """One optimizer step over this rank's ``micro`` batches (host or device (canvas batch, noise) pairs):
    forward and backward per micro-batch, losses normalised by the global token counts, gradients summed
    over ranks (FSDP2 reduce-scatters its own), the global norm clipped, AdamW. A non-finite loss or norm
    skips the update inside the fused kernel (params, moments, step count untouched) without a host read,
    so the caller can queue the next step's host work first. ``optimizer=None``: no clip and no update, the
    gradients stay in ``p.grad`` (the tests and benchmarks that compare gradients). ``first``: the process's
    first step (FSDP sets up its streams in it, so no gather is started early)."""
    device = dist.device
    begin_step(model, first=first)
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    n_diff, n_ar = global_token_counts(micro, settings, dist)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, diffusion, ar
    for batch, noise in micro_to_device(micro, device):
        # one GPU: bf16 working weights (precision.py, the optimizer's); FSDP2 casts when sharded
        with compute_context(model, device, dtype_name, optimizer):
            with bf16_autocast(device, dtype_name):
                out = compute_loss(model, batch, noise, settings, n_diff, n_ar)
            out["loss"].backward()
        sums += torch.stack([out["loss"].detach(), out["diffusion_loss"], out["ar_loss"]]).double()
    all_reduce_(sums, dist)
    if dist.world_size > 1 and not is_sharded(model):  # FSDP already SUMMED the grads (parallelize.py)
        for p in params:
            if p.grad is not None:
                all_reduce_(p.grad, dist)
    if optimizer is None:
        grad_norm = clip_grad_norm_(params, float("inf"))
        return StepOutcome(sums, grad_norm, ~(torch.isfinite(sums).all() & torch.isfinite(grad_norm)))
    # global norm, also over sharded (DTensor / expert-parallel) grads; fused AdamW clips in its kernel
    grad_norm = clip_gradients(params, optimizer, grad_clip)
    nonfinite = ~(torch.isfinite(sums).all() & torch.isfinite(grad_norm))
    if optimizer.defaults.get("fused"):  # the trainer's (fused AdamW, MasterAdamW): skipped inside the kernel
        optimizer.found_inf = nonfinite.float()
        optimizer.step()
    elif not bool(nonfinite):  # any other optimizer has no in-kernel skip: the host decides (one read)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(sums, grad_norm, nonfinite)


def handle_nonfinite(outcome: StepOutcome, step: int, micro: list[tuple], nan_policy: str, skipped: int) -> int:
    """After a skipped step: stop (``nan_policy: stop``) or warn and count it; returns the new skip count."""
    if outcome.finite:
        return skipped
    skipped += 1
    bad = [n for n, v in zip(("loss", "diffusion_loss", "ar_loss"), outcome.sums.tolist()) if not math.isfinite(v)]
    diag = (f"non-finite {'/'.join(bad) or 'gradient'} at step {step} (grad norm {float(outcome.grad_norm)}); "
            f"sample ids {[int(s) for b, _ in micro for s in b.sample_ids]}")
    if nan_policy == "stop":
        raise TrainingError(diag + "; weights left as after the previous step (nan_policy: stop)")
    log.warning("%s: step skipped (nan_policy: skip, %d so far)", diag, skipped)
    return skipped
