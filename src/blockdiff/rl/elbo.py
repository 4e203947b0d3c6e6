"""The log-likelihood estimator RL uses for a completion: a Monte Carlo ELBO of the model's own objective.

The likelihood of a sequence under a block-diffusion model with uniform-noise corruption has no closed
form. RL scores a completion y of prompt x by the negative of the SFT objective's diffusion loss on the
canvas holding y (``objective.loss.compute_loss`` with the AR co-loss off): the encoder reads x + y, one
block of y's canvas (y, then EOS fill up to whole blocks, as SFT builds it) is corrupted with the
objective's noise draw (``objective.loss.draw_noise``: t, the corruption, the scored block, the
self-conditioning coin), the decoder runs its two self-conditioning passes and the per-token cross-entropy
over the scored block's tokens of y and its stop (first EOS; not the fill after it) is averaged. ``rl.elbo_draws`` = K independent draws are rows of one micro-batch and
averaged: ``elbo(y) = -mean CE`` (nats per scored token).

The draws of completion c at step s are keyed by the stream index ``(s * N + c) * K + d`` (N completions
per step), so the current, the rollout-time and the reference policy see the SAME t, corruption, block and
coin: the ratio exp(elbo_new - elbo_old) and the KL differ only by what the weights change, not by the
noise. Cost per completion and update iteration: K rows of (encoder + 2 decoder passes) with gradients,
plus K rows without gradients for the reference (KL on) and once per rollout for the rollout-time policy
(``rl.update_iterations`` > 1 only: with one iteration old == new exactly).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from blockdiff.data.canvas import Example, build_example
from blockdiff.objective.loss import ObjectiveSettings, compute_loss, noisy_micro_batch


def elbo_settings(objective: ObjectiveSettings) -> ObjectiveSettings:
    """The objective RL scores with: the configured diffusion loss, without the encoder's AR co-loss."""
    return dataclasses.replace(objective, ar_loss_weight=0.0)


def completion_example(prompt_ids: list[int], completion_ids: list[int], *, canvas_length: int, seq_length: int,
                       eos_id: int, sample_id: int) -> Example:
    """The canvas example of prompt + completion: the completion, EOS-filled to whole blocks (an empty one: all
    EOS, the model stopped at once), the trailing blocks past ``seq_length`` dropped (``build_example``)."""
    reply = list(completion_ids) or [eos_id]
    ids = list(prompt_ids) + reply
    supervised = [False] * len(prompt_ids) + [True] * len(reply)
    ex = build_example(ids, supervised, len(prompt_ids), canvas_length=canvas_length, seq_length=seq_length,
                       eos_id=eos_id, sample_id=sample_id, prompt_policy="fail")
    return ex


def draw_streams(step: int, completion: int, per_step: int, draws: int) -> list[int]:
    """Stream indices of the K noise draws of ``completion`` (its global index in the step) at ``step``."""
    base = (step * per_step + completion) * draws
    return list(range(base, base + draws))


def elbo_micro_batch(examples: list[Example], streams: list[list[int]], settings: ObjectiveSettings, data, *,
                     seed: int, vocab_size: int, device_type: str, eos_id: int = 1):
    """(canvas batch, noise) on the host: every example repeated once per draw (rows example-major), each row
    with its own stream. Never packed: a row is one draw of one completion. The scored tokens are those of the
    drawn block that belong to the completion or its first EOS (the stop), not the EOS fill after it: the fill
    is implied by the stop, and scoring it would reward any move that makes EOS likelier everywhere (shorter
    completions) whatever the advantage."""
    rows = [ex for ex, s in zip(examples, streams) for _ in s]
    batch, noise = noisy_micro_batch(rows, [i for s in streams for i in s], settings,
                                     dataclasses.replace(data, packing=False), seed=seed, vocab_size=vocab_size,
                                     device_type=device_type)
    reply = torch.tensor([_reply_length(ex, eos_id) for ex in rows])
    offset = noise.layout.positions - batch.prompt_lengths[:, None]  # index in the completion's canvas
    keep = noise.scored(settings.loss_type) & (offset < reply[:, None])
    noise._scored_index[settings.loss_type] = keep.flatten().nonzero().squeeze(1)  # what compute_loss scores
    return batch, noise


def _reply_length(ex: Example, eos_id: int) -> int:
    """Tokens of the completion including its first EOS (all of the canvas when it has none)."""
    reply = ex.input_ids[ex.prompt_length:]
    return reply.index(eos_id) + 1 if eos_id in reply else len(reply)


def elbo(model, batch, noise, settings: ObjectiveSettings, draws: int) -> torch.Tensor:
    """[B / draws] ELBOs (nats per scored token, over each completion's ``draws`` rows) of a micro-batch of
    ``elbo_micro_batch``; differentiable when grad mode is on."""
    out = compute_loss(model, batch, noise, settings, 1, 1, per_row=True)
    ce = out["diffusion_rows"].view(-1, draws).sum(1)
    return -ce / out["scored_rows"].view(-1, draws).sum(1).clamp(min=1).to(ce.dtype)


@contextlib.contextmanager
def adapters_disabled(model):
    """The reference policy of a LoRA model: every adapter's contribution scaled by 0 for the duration (the
    frozen base alone, no second copy of the weights)."""
    from blockdiff.lora import ExpertLora, LoraLinear

    adapters = [m for m in model.modules() if isinstance(m, (LoraLinear, ExpertLora))]
    saved = [m.scaling for m in adapters]
    try:
        for m in adapters:
            m.scaling = 0.0
        yield
    finally:
        for m, s in zip(adapters, saved):
            m.scaling = s
