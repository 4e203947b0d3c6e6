"""The MoE kernels against plain references: sync-free expert counts, the token <-> expert-row
permutation (values and gradients), and the whole experts block against a per-token loop."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blockdiff.model.moe import Experts, _RowsToTokens, _TokensToRows, expert_counts
from helpers import tiny_model


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 16), st.lists(st.integers(0, 15), max_size=64))
def test_expert_counts_equal_bincount(E, ids):
    flat = torch.tensor([i % E for i in ids], dtype=torch.long)
    got = expert_counts(flat.sort().values, E)
    assert torch.equal(got, torch.bincount(flat, minlength=E))


def _permutation(T, K, E, seed):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    order = torch.argsort(index.reshape(-1), stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(T * K))
    return order // K, inverse


def test_permutation_values_and_gradients():
    T, K, E, H = 7, 3, 5, 4
    token, inverse = _permutation(T, K, E, 0)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    rows = _TokensToRows.apply(x, token, inverse, K, x.dtype)
    assert torch.equal(rows, x.detach()[token])
    h = torch.randn(T * K, H, dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(T, H, dtype=torch.float64).index_add_(0, token, h.detach())
    torch.testing.assert_close(_RowsToTokens.apply(h, token, inverse, K), ref)
    assert torch.autograd.gradcheck(lambda a: _TokensToRows.apply(a, token, inverse, K, a.dtype), (x,))
    assert torch.autograd.gradcheck(lambda a: _RowsToTokens.apply(a, token, inverse, K), (h,))


def test_rows_in_compute_dtype_keep_fp32_gradients():
    """Under bf16 autocast the rows leave as bf16 (half the bytes to permute and exchange); the gradient
    of the fp32 residual stream sums a token's K bf16 row gradients in fp32, as a cast after the
    gather would."""
    T, K, E, H = 11, 4, 6, 8
    token, inverse = _permutation(T, K, E, 1)
    x = torch.randn(T, H, requires_grad=True)
    rows = _TokensToRows.apply(x, token, inverse, K, torch.bfloat16)
    assert rows.dtype == torch.bfloat16 and torch.equal(rows, x.detach().bfloat16()[token])
    g = torch.randn(T * K, H).bfloat16()
    (grad,) = torch.autograd.grad(rows, x, g)
    ref = torch.zeros(T, H, dtype=torch.float64).index_add_(0, token, g.double())
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad.double(), ref, rtol=1e-6, atol=1e-6)
    # what the fp32 rows cast later gave: the same sums
    x2 = x.detach().clone().requires_grad_()
    (grad2,) = torch.autograd.grad(_TokensToRows.apply(x2, token, inverse, K, x2.dtype).bfloat16(), x2, g)
    torch.testing.assert_close(grad, grad2, rtol=1e-6, atol=1e-6)


def test_experts_block_equals_per_token_loop():
    model = tiny_model(seed=2).double()
    layer = model.layers[0]
    ex: Experts = layer.experts
    T, H = 9, model.config.hidden_size
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    weights, index = layer.router(x)
    out = ex(x, weights.double(), index)

    def expert(e, v):
        gate, up = (v @ ex.gate_up_proj[e].t()).chunk(2, dim=-1)
        return (ex.act(gate) * up) @ ex.down_proj[e].t()

    ref = torch.stack([sum(weights[t, k] * expert(int(index[t, k]), x[t]) for k in range(index.shape[1]))
                       for t in range(T)])
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, (x, ex.gate_up_proj, ex.down_proj), g, retain_graph=True)
    ref_grads = torch.autograd.grad(ref, (x, ex.gate_up_proj, ex.down_proj), g)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b)
