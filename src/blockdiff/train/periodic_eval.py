"""Evaluation during training, on any world size: the validation loss and the sampled accuracy.

Validation loss (``eval.loss_every``): the training objective (``objective.compute_loss`` on micro-batches
built by ``objective.noisy_micro_batch``, as training builds its own) over a held-out set, without
gradients, with FIXED noise: held-out example i always gets the draws of stream index i under
``eval.seed``, whatever the step. The held-out micro-batches are fixed too (consecutive runs of
``train.micro_batch_size`` examples); ranks take them round-robin, every rank runs the same number of
forward passes (a rank short of a batch in the last round recomputes batch 0 and drops it), and the
per-batch loss sums are all-gathered and added in batch order on every rank. So the value depends on the
weights only: its curve is smooth, and 1 and N processes log the same number (up to the rounding of
the matmuls themselves; docs/parallelism.md).

Sampled accuracy (``eval.accuracy_every``): ``evaluate.quick_accuracy`` on the first
``eval.accuracy_samples`` rows of ``data.eval_path``. With several ranks the prompts are split over them
(prompt i on rank i % W, seeded by its global index i) and the ranks sample in lockstep
(``blockdiff.infer.lockstep``), so every prompt gets the tokens one process would give it.
"""

from __future__ import annotations

import copy
import functools
import logging

import torch

from blockdiff.config.schema import Config
from blockdiff.data.canvas import Example, SFTDataset, global_order
from blockdiff.data.jsonl import load_dataset_rows
from blockdiff.errors import ConfigError
from blockdiff.infer.evaluate import quick_accuracy
from blockdiff.infer.lockstep import Lockstep
from blockdiff.infer.sampling import generate
from blockdiff.infer.settings import SamplerSettings
from blockdiff.objective.loss import ObjectiveSettings, compute_loss, count_scored, noisy_micro_batch
from blockdiff.parallel.distributed import DistInfo, to_device
from blockdiff.parallel.parallelize import is_sharded, reshard_all
from blockdiff.train.precision import bf16_autocast, compute_context

log = logging.getLogger("blockdiff")


def split_held_out(cfg: Config, dataset: SFTDataset, tokenizer, eos_id) -> tuple[SFTDataset, list[Example] | None]:
    """(the dataset training reads, the validation loss's held-out examples; None when it is off).

    With ``data.eval_path``: its first ``eval.loss_samples`` examples, built like the training set's, and
    the training set unchanged. Without: ``eval.loss_samples`` examples of the training set, a seeded
    choice (``eval.seed``), which training then never reads."""
    n = cfg.eval.loss_samples
    if not cfg.eval.loss_every:
        return dataset, None
    if cfg.data.eval_path:
        held = SFTDataset.from_config(cfg.data, tokenizer, eos_id, path=cfg.data.eval_path)
        return dataset, held.examples[:n]
    if n >= len(dataset):
        where = getattr(cfg, "_where", None)
        msg = (f"holding out {n} of the training set's {len(dataset)} examples for the validation loss leaves none "
               "to train on: set data.eval_path or a smaller eval.loss_samples")
        raise where.error("eval.loss_samples", msg) if where else ConfigError(msg, field="eval.loss_samples")
    picked = set(global_order(len(dataset), 0, cfg.eval.seed)[:n])
    held = [ex for i, ex in enumerate(dataset.examples) if i in picked]
    training = copy.copy(dataset)
    training.examples = [ex for i, ex in enumerate(dataset.examples) if i not in picked]
    log.info("validation loss: %d of the training set's %d examples held out (no data.eval_path)", n, len(dataset))
    return training, held


class ValidationLoss:
    """The objective over fixed held-out micro-batches with fixed noise; ``__call__(model)`` on every rank."""

    def __init__(self, cfg: Config, examples: list[Example], vocab_size: int, dist: DistInfo):
        self.settings = ObjectiveSettings.from_config(cfg.objective)
        self.dist, self.dtype_name, self.n = dist, cfg.model.dtype, len(examples)
        mb = cfg.train.micro_batch_size
        self.batches = [noisy_micro_batch(examples[k : k + mb], list(range(k, min(k + mb, len(examples)))),
                                          self.settings, cfg.data, seed=cfg.eval.seed, vocab_size=vocab_size,
                                          device_type=dist.device.type) for k in range(0, len(examples), mb)]
        self.tokens = [sum(count_scored(b, noise, self.settings)[i] for b, noise in self.batches) for i in (0, 1)]

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        W, dev, nb = self.dist.world_size, self.dist.device, len(self.batches)
        rounds = -(-nb // W)
        sums = torch.zeros(rounds, 2, dtype=torch.float64, device=dev)  # (diffusion, AR) loss sums
        was_training = model.training
        model.eval()
        try:
            for i in range(rounds):
                k = i * W + self.dist.rank  # batch k on rank k % W; past the end: batch 0 again, dropped
                batch, noise = (to_device(x, dev) for x in self.batches[k if k < nb else 0])
                with compute_context(model, dev, self.dtype_name):
                    with bf16_autocast(dev, self.dtype_name):
                        out = compute_loss(model, batch, noise, self.settings, 1, 1)  # sums: counts of 1
                if k < nb:
                    sums[i] = torch.stack([out["diffusion_loss"], out["ar_loss"]]).double()
        finally:
            model.train(was_training)
        per_batch = _in_batch_order(sums, self.dist)[:nb].tolist()
        diffusion = sum(d for d, _ in per_batch) / max(self.tokens[0], 1)  # added in batch order: any W alike
        ar = sum(a for _, a in per_batch) / max(self.tokens[1], 1)
        return {"val_loss": diffusion + self.settings.ar_loss_weight * ar, "val_diffusion_loss": diffusion,
                "val_ar_loss": ar, "val_n": self.n}


def _in_batch_order(sums: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """[rounds, 2] per rank -> [rounds * W, 2] on the host, row k = batch k (rank k % W, round k // W)."""
    if dist.world_size == 1:
        return sums.cpu()
    parts = [torch.empty_like(sums) for _ in range(dist.world_size)]
    torch.distributed.all_gather(parts, sums)
    return torch.stack(parts, 1).reshape(-1, sums.shape[1]).cpu()


def generate_across_ranks(model, prompts: list[list[int]], settings: SamplerSettings | None = None, device=None,
                          row_seeds: list[int] | None = None, *, dist: DistInfo,
                          dtype_name: str = "float32", keep_stop: bool = False) -> list[list[int]]:
    """``sampling.generate`` with the prompts split over the ranks of one (sharded) model: prompt i on rank
    i % W with the seed of its global index, the ranks in lockstep. Every rank returns every prompt's tokens,
    those one process gives. Called by every rank with the same prompts. ``dtype_name``: the run's
    ``model.dtype``; bf16 samples with the training step's bf16 compute (on CUDA). ``keep_stop``: as
    ``sampling.generate``'s."""
    dev = torch.device(device) if device is not None else dist.device
    with compute_context(model, dev, dtype_name), bf16_autocast(dev, dtype_name):
        return _generate_across_ranks(model, prompts, settings or SamplerSettings(), device, row_seeds, dist,
                                      keep_stop)


def _generate_across_ranks(model, prompts, settings: SamplerSettings, device, row_seeds, dist,
                           keep_stop) -> list[list[int]]:
    W = dist.world_size
    if W == 1 or not prompts:
        return generate(model, prompts, settings, device=device, row_seeds=row_seeds, keep_stop=keep_stop)
    seeds = list(row_seeds) if row_seeds is not None else [settings.seed + i for i in range(len(prompts))]
    mine = range(dist.rank, len(prompts), W)
    share = [prompts[i] for i in mine] or prompts[:1]  # an empty share carries one dummy row
    share_seeds = [seeds[i] for i in mine] or seeds[:1]
    with torch.no_grad():  # not generate's inference_mode: FSDP2 cannot unshard into inference tensors
        out = generate.__wrapped__(model, share, settings, device=device, row_seeds=share_seeds,
                                   lockstep=Lockstep(len(share), len(mine)), keep_stop=keep_stop)
    shares = [None] * W
    torch.distributed.all_gather_object(shares, out[: len(mine)])
    result: list = [None] * len(prompts)
    for w, got in enumerate(shares):
        for j, tokens in enumerate(got):
            result[w + j * W] = tokens
    return result


class PeriodicEval:
    """The validation loss every ``eval.loss_every`` steps and the sampled accuracy every
    ``eval.accuracy_every`` steps, run by every rank (their forward passes are collectives when sharded),
    logged by rank 0 as ``val_loss`` / ``val_diffusion_loss`` / ``val_ar_loss`` and ``eval_accuracy``."""

    def __init__(self, cfg: Config, model, tokenizer, dist: DistInfo, held_out: list[Example] | None):
        self.model, self.tokenizer, self.dist, self.dtype_name = model, tokenizer, dist, cfg.model.dtype
        self.loss_every = cfg.eval.loss_every if held_out else 0
        if self.loss_every:
            self.validation = ValidationLoss(cfg, held_out, model.config.vocab_size, dist)
        self.accuracy_every = cfg.eval.accuracy_every
        if self.accuracy_every:
            self.rows = [r for _, r in zip(range(cfg.eval.accuracy_samples), load_dataset_rows(cfg.data.eval_path))]
            # CUDA graphs and compiled layers would capture the collectives of a sharded model's forward
            plain = not is_sharded(model)
            self.sampler = SamplerSettings(max_new_tokens=cfg.data.canvas_length, seed=cfg.eval.seed,
                                           cuda_graphs=plain, compile=plain)

    def maybe_run(self, step: int, metrics) -> None:
        row = {}
        if self.loss_every and step % self.loss_every == 0:
            row.update(self.validation(self.model))
        if self.accuracy_every and step % self.accuracy_every == 0:
            acc = quick_accuracy(self.model, self.tokenizer, self.rows, self.sampler, batch_size=len(self.rows),
                                 generate=functools.partial(generate_across_ranks, dist=self.dist,
                                                            dtype_name=self.dtype_name))
            row.update(eval_accuracy=acc, eval_n=len(self.rows))
        if row:
            if is_sharded(self.model):  # forwards only: no backward resharded the root unit
                reshard_all(self.model)
            metrics.log(step, row)
