"""bf16 working weights (precision.working_weights): one cast per parameter, gradients in the fp32
masters, activation checkpointing recomputes with the same casts, parameters restored on exit."""

import copy

import pytest
import torch

from blockdiff.objective.loss import ObjectiveSettings, compute_loss, count_scored, draw_noise, freeze_router
from blockdiff.parallel.parallelize import apply_activation_checkpointing
from blockdiff.train.precision import working_weights
from helpers import V, batch_of, tiny_model


def _grads(model, dtype=None, seed=0):
    batch = batch_of([3, 5], [2, 1], seed=seed)
    settings = ObjectiveSettings()
    noise = draw_noise(batch, torch.arange(2), seed=seed, vocab_size=V, eps=1e-3, sc_prob=0.5)
    nd, na = count_scored(batch, noise, settings)
    model.zero_grad(set_to_none=True)
    if dtype is None:
        out = compute_loss(model, batch, noise, settings, nd, na)
        out["loss"].backward()
    else:
        with working_weights(model, dtype):
            out = compute_loss(model, batch, noise, settings, nd, na)
            out["loss"].backward()
    return float(out["loss"].detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _model():
    model = tiny_model(seed=3)
    freeze_router(model)
    return model


def test_gradients_reach_the_fp32_masters_through_the_casts():
    """float64 working weights: the plumbing (every parameter swapped, tied embedding included, grads
    summed back into fp32 ``param.grad``) reproduces the plain fp32 gradients."""
    model = _model()
    params = dict(model.named_parameters())
    ref_loss, ref = _grads(model)
    loss, got = _grads(model, torch.float64)
    assert all(model.get_parameter(n) is p and p.dtype == torch.float32 for n, p in params.items())
    assert set(got) == set(ref) and all(g.dtype == torch.float32 for g in got.values())
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for n in ref:  # fp32 vs fp64 rounding, relative to each gradient's norm
        assert (got[n] - ref[n]).norm() <= 1e-4 * ref[n].norm() + 1e-9, n


def test_bf16_working_weights_compute_what_bf16_parameters_compute():
    """The FSDP2 ``param_dtype=bf16`` semantics: the same loss and gradients, bit for bit, as a model
    whose parameters are bf16 (buffers such as the RoPE tables stay fp32 in both)."""
    model = _model()
    bf16_model = copy.deepcopy(model)
    for p in bf16_model.parameters():
        p.data = p.data.to(torch.bfloat16)
    loss, got = _grads(model, torch.bfloat16)
    ref_loss, ref = _grads(bf16_model)
    assert loss == ref_loss
    assert set(got) == set(ref)
    for n in ref:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n], ref[n].float(), rtol=0, atol=0, msg=n)


def test_each_parameter_cast_once_including_the_tied_embedding():
    model = _model()
    before = {n: p for n, p in model.named_parameters()}
    with working_weights(model, torch.bfloat16):
        inside = dict(model.named_parameters())
        assert all(t.dtype == torch.bfloat16 for t in inside.values())
        assert all(type(t) is torch.Tensor for t in inside.values())  # casts, not new leaf Parameters
        # trainable: the cast is in the graph (grads flow back to the master); frozen router: no graph
        assert inside["embed_tokens.weight"].grad_fn is not None
        assert all(inside[n].grad_fn is None for n, p in before.items() if not p.requires_grad)
        # reading the slot twice gives the same tensor: one cast per step, not one per use
        assert model.embed_tokens.weight is model.embed_tokens.weight
    assert all(model.get_parameter(n) is p for n, p in before.items())


@pytest.mark.slow
def test_activation_checkpointing_recomputes_with_the_working_weights():
    plain, checkpointed = _model(), _model()
    apply_activation_checkpointing(checkpointed)
    loss_a, a = _grads(plain, torch.bfloat16)
    loss_b, b = _grads(checkpointed, torch.bfloat16)
    assert loss_a == loss_b
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=n)


def test_parameters_restored_when_the_step_raises():
    model = _model()
    before = dict(model.named_parameters())
    with pytest.raises(RuntimeError, match="boom"):
        with working_weights(model, torch.bfloat16):
            raise RuntimeError("boom")
    assert all(model.get_parameter(n) is p for n, p in before.items())
