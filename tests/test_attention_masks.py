"""The flex_attention BlockMask built from the dense mask equals torch's ``create_block_mask`` on the same rule."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from blockdiff.model.attention import MaskInfo


def _info(B, Lq, Lk, canvas: bool, docs: bool, seed: int) -> MaskInfo:
    g = torch.Generator().manual_seed(seed)
    k_pos = torch.arange(Lk).repeat(B, 1)
    lengths = torch.randint(Lk // 2, Lk + 1, (B, 1), generator=g)
    lengths[0] = Lk  # one row without padding
    k_valid = torch.arange(Lk) < lengths  # right padding
    k_block = torch.where(torch.arange(Lk) >= Lk - Lq, (torch.arange(Lk) - (Lk - Lq)) // 128, -1).repeat(B, 1) \
        if canvas else torch.full((B, Lk), -1)
    q_pos = k_pos[:, Lk - Lq:]
    hi = q_pos + 1 if not canvas else torch.randint(1, Lk, (B, Lq), generator=g)
    info = MaskInfo(q_hi=hi, q_lo=hi - 260, q_block=k_block[:, Lk - Lq:], q_valid=k_valid[:, Lk - Lq:],
                    k_pos=k_pos, k_block=k_block, k_valid=k_valid)
    if docs:
        info.k_doc = torch.randint(0, 3, (B, Lk), generator=g).sort(dim=1).values
        info.q_doc = info.k_doc[:, Lk - Lq:]
    return info


@pytest.mark.parametrize("B,Lq,Lk,canvas,docs", [(2, 384, 384, False, False), (2, 300, 300, False, True),
                                                  (3, 256, 700, True, False), (2, 256, 520, True, True)])
@pytest.mark.parametrize("sliding", [False, True])
def test_block_mask_equals_create_block_mask(B, Lq, Lk, canvas, docs, sliding):
    info = _info(B, Lq, Lk, canvas, docs, seed=Lq + Lk)
    ours = info.block_mask(sliding)
    ref = create_block_mask(info.mask_mod(sliding), B, None, Lq, Lk, device="cpu")
    assert ours.shape == ref.shape
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert torch.equal(ours.to_dense(), ref.to_dense())  # partial + full blocks, block by block
    for a, b, n in ((ours.kv_indices, ref.kv_indices, ref.kv_num_blocks),
                    (ours.full_kv_indices, ref.full_kv_indices, ref.full_kv_num_blocks)):
        keep = torch.arange(a.shape[-1]) < n[..., None]  # only the first n indices of a row are read
        assert torch.equal(a[keep], b[keep])
    if not docs and not canvas:  # both kinds of block occur (documents and canvas blocks can leave none full)
        assert ours.full_kv_num_blocks.sum() > 0 and ours.kv_num_blocks.sum() > 0


@pytest.mark.slow
def test_compiled_flex_attention_with_our_block_mask_equals_dense_sdpa():
    """End to end on CPU: inductor's flex kernel (which skips blocks the BlockMask leaves out and calls
    mask_mod only on partial blocks) gives SDPA's output under the dense mask. A mask missing one visible
    block gives a different output, so the comparison does see the block structure."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    g = torch.Generator().manual_seed(1)
    for B, Lq, Lk, canvas, docs, sliding in [(2, 300, 300, False, True, True), (3, 256, 700, True, False, False)]:
        info = _info(B, Lq, Lk, canvas, docs, seed=Lq + Lk)
        q, k, v = (torch.randn(B, 2, n, 64, generator=g) for n in (Lq, Lk, Lk))
        bm = info.block_mask(sliding)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=info.dense(sliding))
        assert (flex(q, k, v, block_mask=bm) - ref).abs().max() < 1e-5
    fewer = bm.kv_num_blocks.clone()
    fewer[0, 0, 0] -= 1  # forget the last partial block of the first query block
    broken = BlockMask.from_kv_blocks(fewer, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                                      BLOCK_SIZE=128, mask_mod=bm.mask_mod, seq_lengths=(Lq, Lk))
    assert (flex(q, k, v, block_mask=broken) - ref).abs().max() > 1e-3
