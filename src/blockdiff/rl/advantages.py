"""Group-relative advantages, the clipped policy-ratio surrogate and the KL penalty (GRPO).

Per prompt, G completions with rewards r_1..r_G: advantage A_i = (r_i - mean(r)) / (std(r) + eps)
(``group_norm``; std is the population std of the group) or r_i - mean(r) (``mean_only``). Negative advantages
are then scaled by ``rl.negative_advantage_weight`` (1: plain GRPO): the ELBO is a lower bound of the
log-likelihood, and a loss that pushes a lower bound down can loosen the bound (worse denoising) instead of
making the completion less likely; a weight below 1 limits that.

Per completion, with log-likelihood estimates under the current, the rollout-time ("old") and the
reference policy (``rl.elbo``: per-token ELBOs on shared noise draws):

    ratio = exp(new - old)
    surrogate = min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    kl = exp(ref - new) - (ref - new) - 1          (the non-negative k3 estimator of KL(new || ref))
    loss = -surrogate + beta * kl

summed over the completions and divided by the global completion count (the trainer's normalisation).
"""

from __future__ import annotations

import torch

ADVANTAGE_KINDS = ("group_norm", "mean_only")


def group_advantages(rewards: torch.Tensor, group_size: int, kind: str = "group_norm",
                     eps: float = 1e-4) -> torch.Tensor:
    """[P * G] rewards (prompt-major: completion g of prompt p at p * G + g) -> [P * G] advantages."""
    if kind not in ADVANTAGE_KINDS:
        raise ValueError(f"advantage kind must be one of {ADVANTAGE_KINDS}, got {kind!r}")
    r = rewards.double().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if kind == "group_norm":
        centred = centred / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centred.flatten().to(rewards.dtype)


def weigh_negatives(advantages: torch.Tensor, weight: float) -> torch.Tensor:
    """Negative advantages times ``weight`` (positive ones unchanged)."""
    return torch.where(advantages < 0, advantages * weight, advantages)


def k3_kl(new: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(new || ref) estimate exp(ref - new) - (ref - new) - 1 (>= 0, differentiable in new)."""
    d = ref - new
    return torch.exp(d) - d - 1


def clipped_surrogate(new: torch.Tensor, old: torch.Tensor, advantage: torch.Tensor,
                      clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample surrogate to maximise, per-sample bool: the clip is active, i.e. the sample gives no
    gradient through the ratio)."""
    ratio = torch.exp(new - old)
    unclipped = ratio * advantage
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage
    active = ((ratio > 1 + clip_eps) & (advantage > 0)) | ((ratio < 1 - clip_eps) & (advantage < 0))
    return torch.minimum(unclipped, clipped), active


def grpo_loss(new: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None, advantage: torch.Tensor,
              clip_eps: float, beta: float, count: int) -> dict[str, torch.Tensor]:
    """The loss to backward for some completions (their share of a global batch of ``count``) and its parts
    (sums over these completions, detached: the trainer adds them over micro-batches and ranks)."""
    surrogate, active = clipped_surrogate(new, old, advantage, clip_eps)
    kl = k3_kl(new, ref) if ref is not None else torch.zeros_like(new)
    per_sample = -surrogate + beta * kl
    return {"loss": per_sample.sum() / count, "kl_sum": kl.detach().sum(), "clipped": active.sum(),
            "ratio_sum": torch.exp(new - old).detach().sum()}
