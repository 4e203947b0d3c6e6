"""Attention: the q/k/v projections with their norms and RoPE, and the masks of both passes.

One mask rule serves the encoder (causal), the decoder at inference (canvas over a prefix cache) and
the decoder at training (block-causal over the whole response). Each query carries
``hi`` (exclusive upper bound on clean key positions), ``lo`` (sliding-window lower bound) and
``block`` (canvas block id, -1 for clean queries); each key carries its position, its canvas block
(-1 for clean keys) and a validity bit:

    clean key  visible  <=>  key_valid & key_pos < hi & (not sliding or key_pos >= lo)
    canvas key visible  <=>  key_valid & key_block == query_block

Encoder query at position p: hi = p + 1, lo = p - W + 1 (W-token causal window incl. itself).
Canvas query of block b whose block starts at position s_b: hi = s_b, lo = s_b - W + 1, which is the
reference's decoder reading the last W - 1 cached tokens; at training the same rule gives "prompt
always visible, clean response only from strictly earlier blocks, noisy canvas only within the own
block" with the block-anchored sliding bound. Invalid (padding) queries see key 0 only, so no row is
ever fully masked (no NaN) and padding keys are never attended by real queries.

Packed rows (several conversations in one row) add optional per-token document ids ``q_doc`` /
``k_doc``: when given, every key (clean or canvas) is visible only if its document id equals the
query's, on top of the rule above. Positions restart at 0 per document, so ``hi`` / ``lo`` compare
positions within the query's own document. Without document ids (the reference path) the rule is
unchanged.

The same ``mask_mod`` evaluates on broadcast index grids (dense boolean mask for SDPA, used on CPU)
and on scalars inside ``flex_attention`` (block-sparse, used on GPU): a single source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blockdiff.model.config import ModelConfig
from blockdiff.model.layers import RMSNorm, apply_rotary


@dataclass
class MaskInfo:
    q_hi: torch.Tensor  # [B, Lq] long
    q_lo: torch.Tensor  # [B, Lq] long
    q_block: torch.Tensor  # [B, Lq] long, -1 for clean queries
    q_valid: torch.Tensor  # [B, Lq] bool
    k_pos: torch.Tensor  # [B, Lk] long
    k_block: torch.Tensor  # [B, Lk] long, -1 for clean keys
    k_valid: torch.Tensor  # [B, Lk] bool
    q_doc: torch.Tensor | None = None  # [B, Lq] long document id (packed rows), None: one document
    k_doc: torch.Tensor | None = None  # [B, Lk] long

    def mask_mod(self, sliding: bool):
        q_hi, q_lo, q_block, q_valid = self.q_hi, self.q_lo, self.q_block, self.q_valid
        k_pos, k_block, k_valid = self.k_pos, self.k_block, self.k_valid
        q_doc, k_doc = self.q_doc, self.k_doc
        if (q_doc is None) != (k_doc is None):
            raise ValueError("q_doc and k_doc must be given together")

        def mod(b, h, q, kv):
            kb = k_block[b, kv]
            kp = k_pos[b, kv]
            clean = (kb < 0) & (kp < q_hi[b, q])
            if sliding:
                clean = clean & (kp >= q_lo[b, q])
            canvas = (kb >= 0) & (kb == q_block[b, q])
            visible = k_valid[b, kv] & (clean | canvas)
            if q_doc is not None:
                visible = visible & (k_doc[b, kv] == q_doc[b, q])
            return visible | (~q_valid[b, q] & (kv == 0))

        return mod

    def dense(self, sliding: bool) -> torch.Tensor:
        """Boolean [B, 1, Lq, Lk] mask (True = attend) for the SDPA path."""
        B, Lq = self.q_hi.shape
        Lk = self.k_pos.shape[1]
        dev = self.q_hi.device
        b = torch.arange(B, device=dev)[:, None, None, None]
        q = torch.arange(Lq, device=dev)[None, None, :, None]
        kv = torch.arange(Lk, device=dev)[None, None, None, :]
        return self.mask_mod(sliding)(b, None, q, kv)

    def block_mask(self, sliding: bool, block_size: int = 128):
        """flex_attention's BlockMask from the dense mask, block by block. ``create_block_mask`` evaluates
        the same rule under four nested vmaps: tens of ms of CPU per mask, paid three times per training
        step and on every rank (profiled on H200). Here it is a dozen broadcast kernels."""
        from torch.nn.attention.flex_attention import BlockMask  # flex is imported only when a run uses it

        mask = self.dense(sliding)  # [B, 1, Lq, Lk]
        B, _, Lq, Lk = mask.shape
        nq, nk = -(-Lq // block_size), -(-Lk // block_size)
        mask = F.pad(mask, (0, nk * block_size - Lk, 0, nq * block_size - Lq))  # padding = not visible
        seen = mask.view(B, 1, nq, block_size, nk, block_size).sum((3, 5), dtype=torch.int32)
        full = seen == block_size * block_size
        partial = (seen > 0) & ~full

        def ordered(blocks):  # visible kv blocks first, each row's count beside them
            idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
            return blocks.sum(-1, dtype=torch.int32), idx.to(torch.int32)

        return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block_size,
                                        mask_mod=self.mask_mod(sliding), seq_lengths=(Lq, Lk))


class Masks:
    """Per-forward attention masks, built once per layer type and reused by every layer."""

    def __init__(self, info: MaskInfo, backend: str):
        self.info = info
        self.backend = backend
        self._cache: dict[bool, object] = {}

    def get(self, sliding: bool):
        if sliding not in self._cache:
            if self.backend == "flex":
                self._cache[sliding] = self.info.block_mask(sliding)
            else:
                self._cache[sliding] = self.info.dense(sliding)
        return self._cache[sliding]


_compiled_flex = None


def _flex(q, k, v, block_mask, kernel_options):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        # Sequence lengths vary between batches and passes: let dynamo go dynamic after the first
        # recompile instead of specialising on every (Lq, Lk) until the recompile limit.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        _compiled_flex = torch.compile(flex_attention, dynamic=None)
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=1.0, enable_gqa=True, kernel_options=kernel_options)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, backend: str) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, Hkv, Lk, D] -> [B, H, Lq, D]. Scale is 1.0 (q/k are RMS-normed)."""
    if backend == "flex":
        # head_dim 512 (full layers) exceeds shared memory with default tiles on Hopper: smaller tiles
        opts = {"BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 1} if q.shape[-1] > 256 else None
        return _flex(q, k, v, mask, opts)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        H, Hkv, D = config.num_attention_heads, config.kv_heads[layer], config.head_dims[layer]
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, D
        self.sliding = config.is_sliding(layer)
        self.layer_type = config.layer_types[layer]
        self.q_proj = nn.Linear(config.hidden_size, H * D, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, Hkv * D, bias=False)
        # Full layers share K and V: values are the v-normed raw key projection
        self.v_proj = None if config.k_eq_v(layer) else nn.Linear(config.hidden_size, Hkv * D, bias=False)
        self.o_proj = nn.Linear(H * D, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(D, config.rms_norm_eps)
        self.k_norm = RMSNorm(D, config.rms_norm_eps)
        self.v_norm = RMSNorm(D, config.rms_norm_eps, with_scale=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        masks: Masks,
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Returns the attention output and this call's own (k, v) [B, Hkv, L, D] (rotated, normed)."""
        B, L, _ = x.shape
        cos, sin = rope
        q = apply_rotary(self.q_norm(self.q_proj(x).view(B, L, self.num_heads, self.head_dim)), cos, sin)
        k_raw = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim)
        v_raw = k_raw if self.v_proj is None else self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim)
        k = apply_rotary(self.k_norm(k_raw), cos, sin).transpose(1, 2)
        v = self.v_norm(v_raw).transpose(1, 2)
        q = q.transpose(1, 2)
        if prefix_kv is not None:
            k_all = torch.cat([prefix_kv[0].to(k.dtype), k], dim=2)
            v_all = torch.cat([prefix_kv[1].to(v.dtype), v], dim=2)
        else:
            k_all, v_all = k, v
        out = attend(q, k_all, v_all, masks.get(self.sliding), masks.backend)
        out = out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
        return self.o_proj(out), (k, v)
