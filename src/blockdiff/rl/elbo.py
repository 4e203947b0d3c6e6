"""The log-likelihood estimator RL uses for a completion: a Monte Carlo ELBO of the model's own objective.

The likelihood of a sequence under a block-diffusion model with uniform-noise corruption has no closed
form. RL scores a completion y of prompt x by the negative of the SFT objective's diffusion loss on the
canvas holding y (``objective.loss.compute_loss`` with the AR co-loss off). y is placed as SFT places a
reply (``canvas_reply``): its text, then what the chat template renders from the stop the sampler hit on
(Gemma 4: ``<turn|>`` and a newline; an EOS stop stays an EOS), then EOS fill up to whole blocks. The
encoder reads x + y, one block of y's canvas is corrupted with the objective's noise draw
(``objective.loss.draw_noise``: t, the corruption, the scored block, the self-conditioning coin), the
decoder runs its two self-conditioning passes and the per-token cross-entropy over the scored block's
tokens of the reply (text and end; ``rl.score_fill``: the EOS fill too, SFT's rule) is averaged.
``rl.elbo_draws`` = K independent draws are rows of one micro-batch and averaged:
``elbo(y) = -mean CE`` (nats per scored token).

The draws of completion c at step s are keyed by the stream index ``(s * N + c) * K + d`` (N completions
per step), so the current, the rollout-time and the reference policy see the SAME t, corruption, block and
coin: the ratio exp(elbo_new - elbo_old) and the KL differ only by what the weights change, not by the
noise. With ``rl.group_draws`` the key is the completion's prompt (N / G of them a step): the G completions
of a prompt share their draws too, and as their advantages sum to zero, the gradient of what they have in
common (the tokens they agree on, under the same corruption) cancels instead of adding noise.

Cost per completion and update iteration: K rows of (encoder + 2 decoder passes) with gradients, plus K
rows without gradients for the reference (KL on) and once per rollout for the rollout-time policy
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


def canvas_reply(completion: list[int], reply_end: list[int]) -> list[int]:
    """The reply as SFT's canvas holds it, of a completion sampled with ``keep_stop`` (its last token is the
    stop it hit, if any): the template's end of a reply (``data.chat.reply_end_ids``, which starts with a
    stop) in place of a stop that starts it; any other stop kept; a completion that ran to
    ``max_new_tokens`` has no end."""
    if completion and reply_end and completion[-1] == reply_end[0]:
        return list(completion[:-1]) + list(reply_end)
    return list(completion)


def completion_example(prompt_ids: list[int], reply_ids: list[int], *, canvas_length: int, seq_length: int,
                       eos_id: int, sample_id: int) -> Example:
    """The canvas example of prompt + reply (``canvas_reply``), EOS-filled to whole blocks (an empty reply:
    all EOS), the trailing blocks past ``seq_length`` dropped (``build_example``)."""
    reply = list(reply_ids) or [eos_id]
    ids = list(prompt_ids) + reply
    supervised = [False] * len(prompt_ids) + [True] * len(reply)
    return build_example(ids, supervised, len(prompt_ids), canvas_length=canvas_length, seq_length=seq_length,
                         eos_id=eos_id, sample_id=sample_id, prompt_policy="fail")


def draw_streams(step: int, key: int, per_step: int, draws: int) -> list[int]:
    """Stream indices of the K noise draws of ``key`` (a completion's, or with ``rl.group_draws`` its prompt's,
    index in the step; ``per_step`` of them a step) at ``step``."""
    base = (step * per_step + key) * draws
    return list(range(base, base + draws))


def elbo_micro_batch(examples: list[Example], streams: list[list[int]], settings: ObjectiveSettings, data, *,
                     seed: int, vocab_size: int, device_type: str, scored_lengths: list[int] | None = None):
    """(canvas batch, noise) on the host: every example repeated once per draw (rows example-major), each row
    with its own stream. Never packed: a row is one draw of one completion. ``scored_lengths[i]``: how many
    canvas tokens of example i are scored (its reply, not the EOS fill: the fill follows from the stop, and
    scoring it rewards any move that makes EOS likelier everywhere, i.e. shorter replies, whatever the
    advantage); None: every canvas token of the drawn block (SFT's rule)."""
    rows = [ex for ex, s in zip(examples, streams) for _ in s]
    batch, noise = noisy_micro_batch(rows, [i for s in streams for i in s], settings,
                                     dataclasses.replace(data, packing=False), seed=seed, vocab_size=vocab_size,
                                     device_type=device_type)
    if scored_lengths is not None:
        reply = torch.tensor([n for n, s in zip(scored_lengths, streams) for _ in s])
        offset = noise.layout.positions - batch.prompt_lengths[:, None]  # index in the completion's canvas
        keep = noise.scored(settings.loss_type) & (offset < reply[:, None])
        noise._scored_index[settings.loss_type] = keep.flatten().nonzero().squeeze(1)  # what compute_loss scores
    return batch, noise


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
