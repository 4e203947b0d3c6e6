"""The training forward (whole response, block-causal) equals the inference forward block by block,
and never leaks clean tokens of the own or later blocks."""

import pytest
import torch

from blockdiff.model.diffusion_gemma import canvas_layout
from helpers import C, V, tiny_model


def make_batch(prompt_lengths, num_blocks, seed=1):
    g = torch.Generator().manual_seed(seed)
    B = len(prompt_lengths)
    L = max(p + n * C for p, n in zip(prompt_lengths, num_blocks)) + 3  # trailing padding
    R = max(num_blocks) * C
    ids = torch.randint(3, V, (B, L), generator=g)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for b, (p, n) in enumerate(zip(prompt_lengths, num_blocks)):
        valid[b, : p + n * C] = True
    ids[~valid] = 0
    canvas = torch.randint(3, V, (B, R), generator=g)
    return ids, valid, torch.tensor(prompt_lengths), torch.tensor(num_blocks), canvas


def training_logits(model, ids, valid, P, N, canvas, soft=None, sc_mask=None):
    _, cache = model.encode(ids, valid)
    layout = canvas_layout(P, N, canvas.shape[1], C)
    return model.lm_logits(model.decode(canvas, cache, layout, soft_embeds=soft, sc_mask=sc_mask))


@pytest.mark.parametrize("prompt_lengths,num_blocks", [([7, 7], [1, 1]), ([5, 9, 3], [2, 3, 1])])
def test_training_forward_equals_blockwise_inference(prompt_lengths, num_blocks):
    model = tiny_model()
    ids, valid, P, N, canvas = make_batch(prompt_lengths, num_blocks)
    with torch.no_grad():
        soft = torch.randn(len(P), canvas.shape[1], 32)
        sc_mask = torch.tensor([True, False, True][: len(P)])
        train = training_logits(model, ids, valid, P, N, canvas, soft, sc_mask)
        assert torch.isfinite(train).all()
        for b, (p, n) in enumerate(zip(prompt_lengths, num_blocks)):
            for blk in range(n):
                s = slice(blk * C, (blk + 1) * C)
                prefix = ids[b : b + 1, : p + blk * C]  # prompt + clean earlier blocks
                _, cache = model.encode(prefix)
                sm = sc_mask[b : b + 1]
                ref = model.lm_logits(model.decode(canvas[b : b + 1, s], cache, soft_embeds=soft[b : b + 1, s], sc_mask=sm))
                torch.testing.assert_close(train[b, s], ref[0], atol=1e-4, rtol=0)


def test_leakage_block_causal():
    model = tiny_model(window=6)
    P, n = 6, 3
    ids, valid, Pt, Nt, canvas = make_batch([P], [n])
    with torch.no_grad():
        base = training_logits(model, ids, valid, Pt, Nt, canvas)
        for blk in range(n):
            own = slice(blk * C, (blk + 1) * C)
            # clean tokens of the own block and every later block: no effect on this block
            for later in range(blk, n):
                changed = ids.clone()
                changed[0, P + later * C : P + (later + 1) * C] = torch.randint(3, V, (C,))
                out = training_logits(model, changed, valid, Pt, Nt, canvas)
                torch.testing.assert_close(out[0, own], base[0, own], atol=1e-6, rtol=0)
            # noisy canvas of other blocks: no effect
            other = canvas.clone()
            for o in range(n):
                if o != blk:
                    other[0, o * C : (o + 1) * C] = torch.randint(3, V, (C,))
            out = training_logits(model, ids, valid, Pt, Nt, other)
            torch.testing.assert_close(out[0, own], base[0, own], atol=1e-6, rtol=0)
            # the clean block right before (inside the sliding window) does change it
            if blk > 0:
                changed = ids.clone()
                changed[0, P + (blk - 1) * C : P + blk * C] = torch.randint(3, V, (C,))
                out = training_logits(model, changed, valid, Pt, Nt, canvas)
                assert (out[0, own] - base[0, own]).abs().max() > 1e-4
        # padding tokens never matter
        padded = ids.clone()
        padded[~valid] = 7
        torch.testing.assert_close(training_logits(model, padded, valid, Pt, Nt, canvas), base, atol=1e-6, rtol=0)


def test_sliding_lower_bound_is_block_anchored():
    """With window 6 and canvas 4, block 2 (start P+8) must not see clean positions < P+8-6+1 on
    sliding layers, but the full-attention layer still sees the whole prompt."""
    model = tiny_model(window=6)
    P, n = 6, 3
    ids, valid, Pt, Nt, canvas = make_batch([P], [n])
    with torch.no_grad():
        base = training_logits(model, ids, valid, Pt, Nt, canvas)
        changed = ids.clone()
        changed[0, 0:2] = torch.randint(3, V, (2,))  # far outside every sliding window of block 2
        out = training_logits(model, changed, valid, Pt, Nt, canvas)
        # still visible through the full-attention layer
        assert (out[0, 8:12] - base[0, 8:12]).abs().max() > 1e-5


def test_padding_rows_are_finite_and_backward_works():
    model = tiny_model().train()
    ids, valid, P, N, canvas = make_batch([5, 2], [2, 1])
    logits = training_logits(model, ids, valid, P, N, canvas)
    assert torch.isfinite(logits).all()
    logits[:, :4].logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
