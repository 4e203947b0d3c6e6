"""Corruption statistics, determinism by global sample index, frozen router, pass-1 without grad,
chunked softcapped CE against a plain reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from blockdiff.data.canvas import CanvasBatch
from blockdiff.objective import (
    ObjectiveSettings,
    compute_loss,
    count_scored,
    draw_noise,
    freeze_router,
    softcapped_ce_sum,
)
from test_model_training_forward import C, V, tiny_model


def batch_of(prompt_lengths, num_blocks, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(prompt_lengths)
    L = max(p + n * C for p, n in zip(prompt_lengths, num_blocks))
    ids = torch.randint(3, V, (B, L), generator=g)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for b, (p, n) in enumerate(zip(prompt_lengths, num_blocks)):
        valid[b, : p + n * C] = True
    ids[~valid] = 0
    return CanvasBatch(ids, valid, torch.tensor(prompt_lengths), torch.tensor(num_blocks),
                       torch.arange(B), block_size=C)


def test_corruption_statistics():
    n = 4000
    batch = batch_of([3] * n, [2] * n)
    eps = 0.2
    noise = draw_noise(batch, torch.arange(n), seed=1, vocab_size=V, eps=eps, sc_prob=0.5)
    t = noise.t
    assert t.min() >= eps and t.max() <= 1
    # t ~ U(eps, 1): mean and variance
    assert abs(t.mean().item() - (1 + eps) / 2) < 0.01
    assert abs(t.var().item() - (1 - eps) ** 2 / 12) < 0.005
    # corruption rate given t is t
    rate = noise.corrupted.float().mean(1)
    assert abs((rate - t).mean().item()) < 0.01
    # replacements are uniform over the whole vocabulary (chi-square-ish bound)
    repl = noise.noisy[noise.corrupted]
    counts = torch.bincount(repl, minlength=V).float()
    expected = repl.numel() / V
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < V + 6 * math.sqrt(2 * V)
    assert (counts > 0).all()  # ids 0..2 (special) included: uniform over the WHOLE vocabulary
    # self-conditioning coin and block choice
    assert abs(noise.self_condition.float().mean().item() - 0.5) < 0.03
    assert abs(noise.block.float().mean().item() - 0.5) < 0.03
    # uncorrupted canvas positions keep the clean token
    assert torch.equal(noise.noisy[~noise.corrupted], noise.clean[~noise.corrupted])


def test_prompt_never_corrupted_and_padding_untouched():
    batch = batch_of([5, 2], [1, 2])
    noise = draw_noise(batch, torch.tensor([10, 11]), seed=0, vocab_size=V, eps=1.0 - 1e-6, sc_prob=0.5)
    # the canvas covers exactly the response; the prompt is not part of it
    assert torch.equal(noise.layout.positions[:, 0], batch.prompt_lengths)
    assert not noise.corrupted[~noise.layout.valid].any()
    assert noise.corrupted[noise.layout.valid].float().mean() > 0.9
    assert torch.equal(noise.clean[0, :C], batch.input_ids[0, 5 : 5 + C])


def test_noise_identical_across_splits():
    """The same global sample gets the same noise whatever the world size or accumulation split."""
    batch = batch_of([3, 4, 5, 6], [2, 1, 2, 1])
    stream = torch.tensor([40, 41, 42, 43])
    whole = draw_noise(batch, stream, seed=7, vocab_size=V, eps=1e-3, sc_prob=0.5)
    for i in range(4):
        one = batch_of([[3, 4, 5, 6][i]], [[2, 1, 2, 1][i]])
        one.input_ids = batch.input_ids[i : i + 1, : one.input_ids.shape[1]]
        part = draw_noise(one, stream[i : i + 1], seed=7, vocab_size=V, eps=1e-3, sc_prob=0.5)
        R = part.noisy.shape[1]
        assert torch.equal(part.noisy[0], whole.noisy[i, :R])
        assert part.t[0] == whole.t[i] and part.block[0] == whole.block[i]
        assert part.self_condition[0] == whole.self_condition[i]
    other = draw_noise(batch, stream + 4, seed=7, vocab_size=V, eps=1e-3, sc_prob=0.5)
    assert not torch.equal(other.noisy, whole.noisy)


def test_chunked_softcapped_ce_matches_reference():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    tgt = torch.randint(50, (37,), generator=g)
    tw = torch.rand(37, generator=g)
    got = softcapped_ce_sum(h, w, tgt, tw, 30.0, chunk=8)
    gh, gw = torch.autograd.grad(got, (h, w))
    ref = (F.cross_entropy(30 * torch.tanh((h @ w.t()) / 30), tgt, reduction="none") * tw).sum()
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)


@pytest.mark.parametrize("loss_type", ["all_supervised", "corrupted_only", "reweighted", "leave_one_out"])
def test_loss_types_finite_and_normalised(loss_type):
    model = tiny_model().train()
    batch = batch_of([4, 6], [2, 1])
    settings = ObjectiveSettings(loss_type=loss_type, eps=0.3)
    noise = draw_noise(batch, torch.tensor([0, 1]), seed=0, vocab_size=V, eps=0.3, sc_prob=1.0)
    nd, na = count_scored(batch, noise, settings)
    assert nd == int(noise.scored(loss_type).sum()) and na == int((batch.valid[:, 1:] & batch.valid[:, :-1]).sum())
    out = compute_loss(model, batch, noise, settings, nd, na)
    assert torch.isfinite(out["loss"])
    # normalisation by the global counts: doubling the count halves each part
    out2 = compute_loss(model, batch, noise, settings, 2 * nd, 2 * na)
    torch.testing.assert_close(out2["loss"], out["loss"] / 2)
    if loss_type == "all_supervised":  # every position of the chosen block is scored
        assert nd == 2 * C


def test_frozen_router_and_pass1_without_grad():
    model = tiny_model().train()
    assert freeze_router(model) == 3 * len(model.layers)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grad_modes = []
    model.layers[0].register_forward_hook(lambda m, i, o: grad_modes.append(torch.is_grad_enabled()))
    batch = batch_of([4, 5], [2, 2])
    settings = ObjectiveSettings()
    noise = draw_noise(batch, torch.tensor([0, 1]), seed=3, vocab_size=V, eps=1e-3, sc_prob=1.0)
    out = compute_loss(model, batch, noise, settings, *count_scored(batch, noise, settings))
    # encoder (grad), pass 1 (no grad), pass 2 (grad)
    assert grad_modes == [True, False, True]
    out["loss"].backward()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    for n, p in model.named_parameters():
        if ".router." in n:
            assert p.grad is None and torch.equal(p, before[n]), n
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("experts" in n for n in moved) and any("self_conditioning" in n for n in moved)
