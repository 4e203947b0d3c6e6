"""The sampler's per-token math over the vocabulary, each piece tested against transformers' reference:
the temperature schedule, entropies, the entropy-bound accept rule, categorical sampling, and the stop rules
(adaptive per-row stop, cut at EOS)."""

from __future__ import annotations

import math

import torch


def temperature_at(step: int, num_steps: int, t_max: float, t_min: float) -> float:
    """Temperature of denoising step ``step`` (0-based) out of ``num_steps``.

    The reference counts steps down (cur_step = N..1) and uses t_min + (t_max - t_min) * cur_step / N,
    so step 0 gets t_max and the last step t_min + (t_max - t_min) / N (t_min itself is never reached).
    """
    return t_min + (t_max - t_min) * ((num_steps - step) / num_steps)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats, fp32) of the categorical over the last dim of ``logits``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_bound_accept(logits_or_entropy: torch.Tensor, entropy_bound: float,
                         is_entropy: bool | None = None) -> torch.Tensor:
    """Accept mask [B, C]: tokens sorted by entropy ascending are accepted while
    cumsum(entropy) - entropy <= bound (the sorted entropy is the running max), as the reference.

    Pass logits [B, C, V] or entropies [B, C] (detected by rank unless ``is_entropy`` says).
    """
    if is_entropy is None:
        is_entropy = logits_or_entropy.dim() == 2
    ent = logits_or_entropy if is_entropy else token_entropy(logits_or_entropy)
    sorted_ent, order = torch.sort(ent, dim=-1)
    keep_sorted = torch.cumsum(sorted_ent, dim=-1) - sorted_ent <= entropy_bound
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def new_stability_history(stability_threshold: int, batch: int, canvas: int, device) -> torch.Tensor:
    """Argmax history [S, B, C] filled with -1 (never equal to a token), as the reference starts."""
    return torch.full((stability_threshold, batch, canvas), -1, dtype=torch.long, device=device)


def should_stop(history: torch.Tensor, argmax_canvas: torch.Tensor, entropy: torch.Tensor,
                confidence_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row adaptive stop: argmax equal to the last S argmax canvases (S = len(history); S = 0
    means always stable) and mean entropy < threshold. Returns (stop [B], updated history)."""
    if history.shape[0] == 0:
        stable = torch.ones(argmax_canvas.shape[0], dtype=torch.bool, device=argmax_canvas.device)
    else:
        stable = (history == argmax_canvas[None]).all(dim=-1).all(dim=0)
        history = torch.cat([history[1:], argmax_canvas[None].to(history.dtype)], dim=0)
    confident = entropy.mean(dim=-1) < confidence_threshold
    return stable & confident, history


def sample_categorical(logits: torch.Tensor, uniforms: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Inverse-CDF sampling: one uniform in [0, 1) per token picks from softmax(logits).

    Needs only B*C random numbers (not B*C*V), so per-row generators stay cheap. The CDF is walked in
    two levels (sums of ``chunk``-wide vocabulary slices, then a scan inside the one slice that holds
    the target) so nothing scans the whole 262k vocabulary: a full-width cumsum cost a 2 GB fp32 write
    per step at batch 8 and is the one pass inductor could not fuse. Never lands on a zero-probability
    token: the target stays strictly below each level's total.
    """
    V = logits.shape[-1]
    cs = min(chunk, V)
    logits = logits.float()
    if V % cs:  # pad with -inf (probability 0) to whole chunks
        logits = torch.nn.functional.pad(logits, (0, cs - V % cs), value=-math.inf)
    slices = logits.unflatten(-1, (-1, cs))  # [..., n_chunks, cs]
    top = logits.amax(-1, keepdim=True)
    chunk_sums = torch.exp(slices - top[..., None]).sum(-1)  # [..., n_chunks]
    chunk_cdf = torch.cumsum(chunk_sums, -1)
    total = chunk_cdf[..., -1:]
    target = torch.minimum(uniforms.unsqueeze(-1) * total, _just_below(total))
    which = torch.searchsorted(chunk_cdf, target, right=True).clamp_(max=chunk_cdf.shape[-1] - 1)
    before = chunk_cdf.gather(-1, which) - chunk_sums.gather(-1, which)
    picked = slices.gather(-2, which[..., None].expand(*which.shape, cs)).squeeze(-2)  # [..., cs]
    inner_cdf = torch.cumsum(torch.exp(picked - top), -1)
    inside = torch.minimum(target - before, _just_below(inner_cdf[..., -1:])).clamp_(min=0)
    offset = torch.searchsorted(inner_cdf, inside, right=True).clamp_(max=cs - 1)
    return (which * cs + offset).squeeze(-1).clamp_(max=V - 1)


def _just_below(x: torch.Tensor) -> torch.Tensor:
    """The largest fp32 value below positive ``x`` (a relative step of 2^-23 is one ulp or more)."""
    return x * (1.0 - 2.0**-23)


def cut_at_eos(tokens: list[int], eos_token_ids, keep_stop: bool = False) -> list[int]:
    """Tokens before the first EOS (the EOS itself is dropped; ``keep_stop``: kept, as the last token)."""
    eos = set(eos_token_ids)
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i + keep_stop]
    return tokens
