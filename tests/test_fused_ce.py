"""The fused chunked softcap cross-entropy (``blockdiff.objective.fused_ce``) against plain autograd, and the
compile-or-eager wrapper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blockdiff.compiled import CompiledOrEager
from blockdiff.objective.fused_ce import linear_softcap_ce_sum


def reference(h, w, tgt, tw, cap):
    logits = F.linear(h, w).float()
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return (F.cross_entropy(logits, tgt, reduction="none") * tw).sum()


def inputs(N=37, H=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g) * 3
    w = torch.randn(V, H, generator=g)
    tgt = torch.randint(V, (N,), generator=g)
    tw = torch.rand(N, generator=g)
    tw[::5] = 0  # unscored rows
    return h, w, tgt, tw


@pytest.mark.parametrize("cap", [30.0, None])
@pytest.mark.parametrize("chunk", [8, 1024])  # ragged last chunk / one chunk
def test_values_and_gradients_equal_plain_autograd(cap, chunk):
    h, w, tgt, tw = inputs()
    a = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    b = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    ref = reference(a[0], a[1], tgt, tw, cap)
    got = linear_softcap_ce_sum(b[0], b[1], tgt, tw, cap, chunk=chunk)
    (0.37 * ref).backward()  # a non-unit upstream gradient
    (0.37 * got).backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(b[0].grad, a[0].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b[1].grad, a[1].grad, rtol=1e-5, atol=1e-6)


def test_no_grad_computes_the_loss_only(monkeypatch):
    """Under no_grad the chunks are asked for no logits gradient (autograd's needs_input_grad would still
    say True for inputs that require grad)."""
    from blockdiff.objective import fused_ce

    asked = []
    real = fused_ce._ce_chunk_compiled

    def spy(enabled, *args):
        asked.append(args[-1])
        return real(enabled, *args)

    monkeypatch.setattr(fused_ce, "_ce_chunk_compiled", spy)
    h, w, tgt, tw = inputs()
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.no_grad():
        got = linear_softcap_ce_sum(hg, wg, tgt, tw, 30.0, chunk=8)
    torch.testing.assert_close(got, reference(h, w, tgt, tw, 30.0))
    assert asked and not any(asked)
    linear_softcap_ce_sum(hg, wg, tgt, tw, 30.0, chunk=8)
    assert asked[-1] is True


def test_frozen_weight_or_frozen_hidden():
    h, w, tgt, tw = inputs()
    hg = h.clone().requires_grad_()
    linear_softcap_ce_sum(hg, w, tgt, tw, 30.0, chunk=8).backward()  # LoRA: the head is frozen
    hr = h.clone().requires_grad_()
    reference(hr, w, tgt, tw, 30.0).backward()
    torch.testing.assert_close(hg.grad, hr.grad, rtol=1e-5, atol=1e-6)
    wg = w.clone().requires_grad_()
    linear_softcap_ce_sum(h, wg, tgt, tw, 30.0, chunk=8).backward()
    wr = w.clone().requires_grad_()
    reference(h, wr, tgt, tw, 30.0).backward()
    torch.testing.assert_close(wg.grad, wr.grad, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_computes_in_bf16_and_returns_fp32_grads():
    h, w, tgt, tw = inputs()
    hb, wb = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_softcap_ce_sum(hb, wb, tgt, tw, 30.0, chunk=8)
    got.backward()
    ref = reference(h.bfloat16(), w.bfloat16(), tgt, tw, 30.0)
    assert hb.grad.dtype == wb.grad.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_compiled_chunks_equal_eager():
    """Inductor (CPU here, CUDA in training) compiles the chunk with a dynamic row count: two chunk sizes,
    one compile, the same numbers as eager."""
    h, w, tgt, tw = inputs(N=40, V=300)
    out = {}
    for compile in (False, True):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_softcap_ce_sum(hh, ww, tgt, tw, 30.0, chunk=16, compile=compile)  # chunks 16, 16, 8
        loss.backward()
        out[compile] = (loss.detach(), hh.grad, ww.grad)
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    """A compiler error is logged once and the eager function serves from then on, with the same result."""
    calls = []

    def broken_compile(fn, **kw):
        def run(*args):
            calls.append(args)
            raise RuntimeError("inductor says no")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    wrapped = CompiledOrEager(lambda a, b: a + b)
    with caplog.at_level("WARNING", logger="blockdiff"):
        assert wrapped(True, 2, 3) == 5
        assert wrapped(True, 4, 5) == 9
    assert len(calls) == 1 and wrapped.failed
    assert sum("running it eagerly" in r.getMessage() for r in caplog.records) == 1
    assert CompiledOrEager(lambda a: a * 2)(False, 4) == 8  # disabled: never compiles
