"""Corruption statistics, determinism by global sample index, frozen router, pass-1 without grad,
chunked softcapped CE and soft embeddings against plain references, the embedding's pad row."""

import math

import pytest
import torch
import torch.nn.functional as F

from blockdiff.objective.loss import (
    ObjectiveSettings,
    compute_loss,
    count_scored,
    draw_noise,
    freeze_router,
    self_conditioning_signal,
    softcapped_ce_sum,
)
from blockdiff.objective.soft_embed import soft_embeddings
from helpers import C, V, batch_of, tiny_model


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


def test_soft_embeddings_equal_plain_autograd_and_keep_no_vocab_wide_tensor():
    """The chunked soft embeddings (pass 2's self-conditioning input) equal the plain formula in value and
    in the embedding's gradient; the autograd graph keeps only the hidden states and the weight, never an
    [N, V] tensor (the plain formula keeps several); a frozen weight keeps nothing."""
    g = torch.Generator().manual_seed(0)
    N, H, Vw, cap, scale = 37, 16, 300, 30.0, 4.0
    h = torch.randn(N, H, generator=g) * 3
    w = torch.randn(Vw, H, generator=g, requires_grad=True)
    d_soft = torch.randn(N, H, generator=g)

    def saved_shapes(fn):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            out = fn()
        return out, shapes

    got, saved = saved_shapes(lambda: soft_embeddings(h, w, cap, scale, chunk=8))
    assert sorted(saved) == sorted([(N, H), (Vw, H)]), saved
    (gw,) = torch.autograd.grad(got, w, d_soft)

    def plain():  # as transformers: the pass-1 logits carry no gradient, the matmul with the embedding does
        logits = cap * torch.tanh(h @ w.detach().t() / cap)
        return torch.softmax(logits, dim=-1) @ w * scale
    ref, saved_ref = saved_shapes(plain)
    assert (N, Vw) in saved_ref  # the hooks do see vocabulary-wide tensors where they are kept
    (rw,) = torch.autograd.grad(ref, w, d_soft)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(gw, rw)

    frozen, saved = saved_shapes(lambda: soft_embeddings(h, w.detach(), cap, scale, chunk=8))
    assert saved == [] and not frozen.requires_grad
    # the same formula as the model's inference path (softcapped head, then soft embeddings)
    model = tiny_model()
    hid = torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(
            soft_embeddings(hid.flatten(0, 1), model.embed_tokens.weight, model.config.final_logit_softcapping,
                            model.embed_scale, chunk=3),
            model.soft_embeddings(model.lm_logits(hid)).flatten(0, 1))


def test_pass2_soft_embeddings_only_for_self_conditioned_tokens():
    """Examples without the coin get zero soft embeddings and send no gradient through them; the
    embedding does get one from the self-conditioned examples (the recipe's gradient itself:
    tests/test_objective_reference.py)."""
    model = tiny_model().train()
    batch = batch_of([4, 6, 5], [2, 1, 2])
    noise = draw_noise(batch, torch.tensor([0, 1, 2]), seed=0, vocab_size=V, eps=0.3, sc_prob=0.5)
    noise.self_condition = torch.tensor([True, False, True])
    index = noise.self_conditioned_index()
    on = (noise.self_condition[:, None] & noise.layout.valid).flatten()
    assert torch.equal(index, on.nonzero().squeeze(1))
    h1 = torch.randn(*noise.noisy.shape, 32)
    soft = self_conditioning_signal(model, h1, index, chunk=3)
    assert not soft[1].any() and soft[0].abs().sum() > 0 and not soft[~noise.layout.valid].any()
    (gh,) = torch.autograd.grad(soft.sum(), model.embed_tokens.weight)
    assert gh.abs().sum() > 0
    assert self_conditioning_signal(model, h1, index[:0]) is None


def test_pad_row_gets_no_lookup_gradient():
    model = tiny_model().train()
    model.init_weights(torch.Generator().manual_seed(0))
    assert not model.embed_tokens.weight[model.config.pad_token_id].any()  # zero-initialised, as in transformers
    ids = torch.tensor([[0, 5, 7, 0, 9]])
    model.embed(ids).pow(2).sum().backward()
    grad = model.embed_tokens.weight.grad
    assert not grad[0].any() and grad[[5, 7, 9]].abs().sum(1).gt(0).all()
    # the whole objective still trains the pad row, through the tied head (as transformers does)
    model.zero_grad()
    batch = batch_of([4, 6], [2, 1])
    settings = ObjectiveSettings()
    noise = draw_noise(batch, torch.tensor([0, 1]), seed=0, vocab_size=V, eps=0.3, sc_prob=1.0)
    compute_loss(model, batch, noise, settings, *count_scored(batch, noise, settings))["loss"].backward()
    assert model.embed_tokens.weight.grad[0].abs().sum() > 0
