"""MasterAdamW (master_adamw.py) on CPU, where its update runs eagerly: torch.optim.AdamW's numerics over
several steps (weight decay, a changing lr, clipping, a skipped non-finite step), the persistent bf16
working copies equal to the masters cast after every step, gradients summed in fp32 over micro-batches,
checkpoints in AdamW's format (resume bit-exact, interchangeable with torch's AdamW), and the trainer
driving it end to end."""

import pytest
import torch

from blockdiff.train import master_adamw
from blockdiff.checkpoint.training import load_checkpoint, save_checkpoint
from blockdiff.train.master_adamw import MasterAdamW
from blockdiff.objective.loss import ObjectiveSettings, compute_loss, count_scored, draw_noise, freeze_router
from blockdiff.parallel.parallelize import clip_gradients
from blockdiff.train.precision import compute_context, working_weights
from helpers import V, batch_of, cfg_for, final_weights, inject, tiny_model, trajectory

BETAS, EPS, WD = (0.9, 0.95), 1e-6, 0.1
CPU = torch.device("cpu")


class Holder(torch.nn.Module):
    def __init__(self, tensors):
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in tensors])


def _assert_working_current(opt, params):
    for p in params:
        assert torch.equal(opt.working.of(p), p.detach().bfloat16())


def test_update_equals_torch_adamw_and_a_nonfinite_step_changes_nothing():
    torch.manual_seed(0)
    start = [torch.randn(6, 5), torch.randn(7), torch.randn(1)]
    holder = Holder(start)
    params = list(holder.ps)
    opt = MasterAdamW(holder, params, lr=1e-2, betas=BETAS, eps=EPS, weight_decay=WD)
    ref_params = [torch.nn.Parameter(t.clone()) for t in start]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False, fused=False)
    skip_at = 3
    for i in range(6):
        lr = 1e-2 * (1 + i) / 6  # the scheduler's warmup: group["lr"] changes every step
        for group in opt.param_groups + ref.param_groups:
            group["lr"] = lr
        grads = [(4 * torch.randn(p.shape)).bfloat16() for p in params]  # norm far above the clip
        if i == skip_at:
            grads[1][2] = float("nan")
        for p, g in zip(params, grads):
            opt.working.of(p).grad = g
        norm = clip_gradients(params, opt, 1.0)
        if i == skip_at:
            before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]
            opt.found_inf = (~torch.isfinite(norm)).float()
            opt.step()
            for p, (b, state) in zip(params, before):  # bit for bit, the step count included
                assert torch.equal(p, b) and all(torch.equal(opt.state[p][k], state[k]) for k in state)
            opt.found_inf = torch.zeros(())
        else:
            assert float(norm) > 1.0 and float(opt.grad_scale) > 1.0  # clipping is active
            for q, g in zip(ref_params, grads):
                q.grad = g.float() / opt.grad_scale
            opt.step()
            ref.step()
        _assert_working_current(opt, params)
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p.detach(), q.detach())  # fp32 rounding
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt.state[p][key], ref.state[q][key])
            assert float(opt.state[p]["step"]) == float(ref.state[q]["step"])
        opt.zero_grad()
        ref.zero_grad()
        assert all(opt.working.of(p).grad is None for p in params)
    assert not torch.equal(params[0].detach(), start[0])


def test_a_parameter_without_gradient_is_not_updated():
    holder = Holder([torch.ones(3), torch.ones(2)])
    a, b = holder.ps
    opt = MasterAdamW(holder, [a, b], lr=0.1, weight_decay=0.5)
    opt.working.of(a).grad = torch.ones(3, dtype=torch.bfloat16)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2)) and b not in opt.state  # no decay, no state, as torch's AdamW
    assert not torch.equal(a.detach(), torch.ones(3)) and float(opt.state[a]["step"]) == 1


def _model():
    model = tiny_model(seed=3)
    freeze_router(model)
    return model


def _backward(model, ctx, seed):
    batch = batch_of([3, 5], [2, 1], seed=seed)
    settings = ObjectiveSettings()
    noise = draw_noise(batch, torch.arange(2) + 2 * seed, seed=0, vocab_size=V, eps=1e-3, sc_prob=0.5)
    nd, na = count_scored(batch, noise, settings)
    with ctx:
        out = compute_loss(model, batch, noise, settings, nd, na)
        out["loss"].backward()
    return float(out["loss"].detach())


@pytest.mark.slow
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_gradients_match_the_cast_per_step_path(micro_batches):
    """The forward reads the persistent copies (tied embedding included); one micro-batch leaves its bf16
    gradients on them, as the casts' path computes them; several sum into the masters' fp32 ``.grad``
    exactly as that path sums them."""
    old, new = _model(), _model()
    params = [p for p in new.parameters() if p.requires_grad]
    opt = MasterAdamW(new, params, lr=1e-3)
    assert opt.working.of(new.embed_tokens.weight) is not None
    for seed in range(micro_batches):
        a = _backward(old, working_weights(old, torch.bfloat16), seed)
        b = _backward(new, compute_context(new, CPU, "bfloat16", opt), seed)
        assert a == b
    assert all(new.get_parameter(n) is p for n, p in new.named_parameters())  # fp32 masters back in the slots
    holders = opt.grad_holders(params)
    for (n, q), p, h in zip(((n, q) for n, q in old.named_parameters() if q.requires_grad), params, holders):
        assert (h is p) == (micro_batches > 1), n  # fp32 sums only when there were several micro-batches
        assert h.grad.dtype == (torch.float32 if micro_batches > 1 else torch.bfloat16)
        torch.testing.assert_close(h.grad.float(), q.grad, rtol=0, atol=0, msg=n)


def _train(model, opt, steps, first=0, micro_batches=1):
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(first, first + steps):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * (step + 1)
        for micro in range(micro_batches):
            _backward(model, compute_context(model, CPU, "bfloat16", opt), micro_batches * step + micro)
        clip_gradients(params, opt, 1.0)
        opt.step()
        opt.zero_grad()


@pytest.mark.slow
def test_checkpoint_resume_is_bit_exact_and_interchangeable_with_torch_adamw(tmp_path):
    def make(kind="master"):
        model = _model()
        params = [p for p in model.parameters() if p.requires_grad]
        if kind == "master":
            return model, MasterAdamW(model, params, lr=1e-3, betas=BETAS, weight_decay=WD)
        return model, torch.optim.AdamW(params, lr=1e-3, betas=BETAS, weight_decay=WD, fused=True)

    straight, opt = make()
    _train(straight, opt, 4)
    first, opt1 = make()
    _train(first, opt1, 2)
    ckpt = save_checkpoint(tmp_path / "run", 2, first, opt1, {})
    resumed, opt2 = make()
    load_checkpoint(ckpt, resumed, opt2)
    with opt2.working.swapped_in():  # the copies are derived from the loaded masters
        for mod, name, p in opt2.working.slots:
            assert torch.equal(mod._parameters[name], p.detach().bfloat16())
    _train(resumed, opt2, 2, first=2)
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the same file loads into torch's fused AdamW (the sharded runs' and CPU's optimizer), and back
    other, topt = make("torch")
    load_checkpoint(ckpt, other, topt)
    assert {k: v.shape for k, v in topt.state_dict()["state"][0].items()} == \
        {k: v.shape for k, v in opt1.state_dict()["state"][0].items()}
    ckpt2 = save_checkpoint(tmp_path / "run2", 2, other, topt, {})
    back, opt3 = make()
    load_checkpoint(ckpt2, back, opt3)
    _train(back, opt3, 2, first=2)
    for a, b in zip(straight.parameters(), back.parameters()):
        assert torch.equal(a, b)


@pytest.fixture
def master_on_cpu(monkeypatch):
    """The trainer picks MasterAdamW on one CUDA device; force it on CPU (bf16 working weights). Yields the
    optimizers it built."""
    built = []

    class Recorded(MasterAdamW):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append(self)

    monkeypatch.setattr(master_adamw, "uses_master_adamw", lambda *a: True)
    monkeypatch.setattr(master_adamw, "MasterAdamW", Recorded)
    yield built


BF16 = ["--model.dtype", "bfloat16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from blockdiff.data.synthetic import write_splits

    train_path, _ = write_splits(tmp_path_factory.mktemp("data"), 40, 4, seed=0)
    return str(train_path)


@pytest.mark.slow
def test_trainer_with_master_adamw_resumes_identically(master_on_cpu, data, tmp_path):
    from blockdiff.train.loop import train
    bf16 = [*BF16, "--train.micro_batch_size", "1"]  # 2 micro-batches per step
    straight = train(cfg_for(data, tmp_path / "straight", 4, "--checkpoint.every_steps", "0", *bf16))
    train(cfg_for(data, tmp_path / "resumed", 2, "--checkpoint.every_steps", "2", *bf16))
    resumed = train(cfg_for(data, tmp_path / "resumed", 4, "--checkpoint.every_steps", "2", *bf16))
    assert len(master_on_cpu) == 3 and all(o.state for o in master_on_cpu)
    assert trajectory(straight) == trajectory(resumed)
    a, b = final_weights(straight, 4), final_weights(resumed, 4)
    assert all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)  # fp32 masters stored


def test_trainer_with_master_adamw_skips_a_nonfinite_step(master_on_cpu, data, tmp_path, monkeypatch):
    """The NaN-skip of the trainer (tests/test_reliability.py) with MasterAdamW: weights, moments and step
    counts of the skipped step's checkpoint equal the previous one's, bit for bit."""
    from safetensors.torch import load_file

    from blockdiff.train.loop import train
    inject(monkeypatch, 3, "grad")  # one micro-batch per step: the third step's gradient is NaN
    run = tmp_path / "run"
    train(cfg_for(data, run, 3, "--checkpoint.every_steps", "1", "--checkpoint.keep_last", "3",
                  "--train.nan_policy", "skip", *BF16))
    assert len(master_on_cpu) == 1
    w2, w3 = final_weights(run, 2), final_weights(run, 3)
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    o2, o3 = (load_file(str(run / "checkpoints" / f"step_{s:08d}" / "optimizer.safetensors")) for s in (2, 3))
    assert o2.keys() == o3.keys() and all(torch.equal(o2[k], o3[k]) for k in o2)
    assert any(k.endswith("::step") and float(v) == 2 for k, v in o3.items())
    w1 = final_weights(run, 1)
    assert not all(torch.equal(w1[k], w2[k]) for k in w1)  # the steps around it did train
