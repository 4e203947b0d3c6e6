"""DiffusionGemma text model: one shared MoE transformer stack run twice.

- ``encode``: causal over clean tokens (sliding window on sliding layers); returns the final hidden
  states (for the AR co-loss) and the per-layer K/V every later canvas reads.
- ``decode``: bidirectional over a noisy canvas, queries reading [encoder K/V ; canvas K/V], with the
  self-conditioning block on the input embeddings.

The training forward (whole response as several canvas blocks under the block-causal mask) and the
inference forward (prefix once, then one canvas block against it) are the same two calls with
different canvas layouts; see ``canvas_layout`` and ``attention.MaskInfo``.

Parameter names equal transformers' ``model.decoder.*`` names minus that prefix (``hf_names``), so
checkpoint I/O is a rename. The encoder's ``layer_scalar`` is kept as its own buffer because the
reference checkpoint stores it separately.

Plain single-device PyTorch: nothing distributed is imported here (``blockdiff.parallel.parallelize`` wraps it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blockdiff.model.attention import Attention, Masks, MaskInfo
from blockdiff.model.config import ModelConfig, check_attn_backend
from blockdiff.model.hf import save as hf_save
from blockdiff.model.layers import GatedMLP, RMSNorm, Rotary
from blockdiff.model.moe import Experts, Router


@dataclass
class KVCache:
    """Per-layer encoder K/V ([B, Hkv, S, D] each) with the positions and validity of its tokens."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    positions: torch.Tensor  # [B, S] long
    valid: torch.Tensor  # [B, S] bool
    docs: torch.Tensor | None = None  # [B, S] long document ids (packed rows), None: one document

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    def next_position(self) -> torch.Tensor:
        """[B] position after the last valid cached token (0 for an empty row)."""
        masked = torch.where(self.valid, self.positions, torch.full_like(self.positions, -1))
        return masked.max(dim=1).values + 1

    def detach(self) -> "KVCache":
        return KVCache([(k.detach(), v.detach()) for k, v in self.kv], self.positions, self.valid, self.docs)


@dataclass
class CanvasLayout:
    """Where canvas tokens sit: positions, block ids, the first position of their block, validity."""

    positions: torch.Tensor  # [B, R]
    blocks: torch.Tensor  # [B, R]
    block_starts: torch.Tensor  # [B, R]
    valid: torch.Tensor  # [B, R]
    columns: torch.Tensor | None = None  # [B, R] index of each canvas token in the clean row (None: = positions)
    docs: torch.Tensor | None = None  # [B, R] document id (packed rows; -1 on invalid slots), None: one document

    def gather_columns(self) -> torch.Tensor:
        return self.positions if self.columns is None else self.columns


def segment_layout(segments: torch.Tensor, width: int, canvas_length: int, packed: bool = False) -> CanvasLayout:
    """Layout of several canvas segments per row (multi-turn SFT and packed rows).

    ``segments`` [B, S, 4] long holds, per segment, (column of its first token in the clean row, its
    position (RoPE / mask position, restarting per packed conversation), number of blocks, document
    id); rows with fewer segments are padded with 0 blocks. The row's canvas concatenates the
    segments' blocks in order: block ids are unique within the row (0, 1, 2, ... over all its
    segments), and block k of a segment starting at position s has ``block_starts`` = s + k *
    canvas_length, so the mask rule of ``attention.MaskInfo`` lets it see the clean tokens before it
    (earlier turns, earlier blocks of its own turn) and never its own block's or later clean tokens.
    With one segment (position = column = prompt length) this is ``canvas_layout``'s valid part.
    ``packed`` adds the document ids to the layout (for the document-aware mask).
    """
    B, C = segments.shape[0], canvas_length
    pos = torch.zeros(B, width, dtype=torch.long)
    col = torch.zeros(B, width, dtype=torch.long)
    blk = torch.full((B, width), -1, dtype=torch.long)
    bst = torch.zeros(B, width, dtype=torch.long)
    doc = torch.full((B, width), -1, dtype=torch.long)
    valid = torch.zeros(B, width, dtype=torch.bool)
    off = torch.arange(C)
    for b, row in enumerate(segments.tolist()):
        k = 0  # block id within the row
        for c0, p0, n, d in row:
            for j in range(n):
                s = slice(k * C, (k + 1) * C)
                pos[b, s], col[b, s] = p0 + j * C + off, c0 + j * C + off
                blk[b, s], bst[b, s], doc[b, s], valid[b, s] = k, p0 + j * C, d, True
                k += 1
    dev = segments.device
    return CanvasLayout(pos.to(dev), blk.to(dev), bst.to(dev), valid.to(dev), col.to(dev),
                        doc.to(dev) if packed else None)


def canvas_layout(prompt_lengths: torch.Tensor, num_blocks: torch.Tensor, width: int, canvas_length: int) -> CanvasLayout:
    """Layout of responses of ``num_blocks`` canvas blocks starting right after each prompt.

    Canvas token j of row b sits at position prompt_lengths[b] + j, in block j // canvas_length.
    """
    j = torch.arange(width, device=prompt_lengths.device)[None, :]
    blocks = (j // canvas_length).expand(prompt_lengths.shape[0], -1)
    start = prompt_lengths[:, None]
    return CanvasLayout(
        positions=start + j,
        blocks=blocks,
        block_starts=start + blocks * canvas_length,
        valid=j < (num_blocks[:, None] * canvas_length),
    )


class SelfConditioning(GatedMLP):
    """post_norm(embeds + MLP(pre_norm(soft_embeds))); post_norm has no scale."""

    def __init__(self, config: ModelConfig):
        super().__init__(config.hidden_size, config.intermediate_size, config.hidden_activation)
        self.pre_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)

    def forward(self, embeds: torch.Tensor, soft_embeds: torch.Tensor) -> torch.Tensor:
        return self.post_norm(embeds + super().forward(self.pre_norm(soft_embeds)))


class Layer(nn.Module):
    """Attention, then the dense MLP and the MoE in parallel on the same residual."""

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.index = index
        self.self_attn = Attention(config, index)
        self.mlp = GatedMLP(H, config.intermediate_size, config.hidden_activation)
        self.router = Router(config)
        self.experts = Experts(config)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(H, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(H, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(H, eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))

    def forward(self, x, rope, masks: Masks, prefix_kv=None, encoder: bool = False):
        attn, kv = self.self_attn(self.input_layernorm(x), rope, masks, prefix_kv)
        x = x + self.post_attention_layernorm(attn)

        flat = x.reshape(-1, x.shape[-1])
        weights, index = self.router(flat)  # the router reads the raw residual
        # the dense MLP runs between the MoE's two halves: under expert parallelism the GPU has it queued
        # while the host waits for the exchanged row counts (Experts.forward)
        moe, dense = self.experts(self.pre_feedforward_layernorm_2(flat), weights, index, meanwhile=lambda: (
            self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))))
        moe = self.post_feedforward_layernorm_2(moe.view_as(x))
        x = x + self.post_feedforward_layernorm(dense + moe)
        scalar = self.encoder_layer_scalar if encoder else self.layer_scalar
        return x * scalar.to(x.dtype), kv


class DiffusionGemma(nn.Module):
    """The DiffusionGemma text model (``blockdiff.DiffusionGemma``): transformers-format checkpoints in and
    out (``from_pretrained`` / ``save_pretrained``), the two passes ``encode`` / ``decode``, and
    ``denoise_logits``, the logits of transformers' ``DiffusionGemmaForBlockDiffusion`` forward."""

    def __init__(self, config: ModelConfig, attn_backend: str = "auto"):
        super().__init__()
        check_attn_backend(attn_backend)
        self.config = config
        self.attn_backend = attn_backend
        # padding_idx as in transformers: the pad row gets no gradient from lookups (it still does through
        # the tied head and the soft embeddings)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)
        self.rotary = Rotary(config)
        self.embed_scale = config.hidden_size**0.5

    # ---- construction -----------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init as the reference does: normal(0, initializer_range), norms and scales at 1, the
        embedding's pad row at 0."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std)
            else:
                p.fill_(1.0)
        self.embed_tokens.weight[self.config.pad_token_id].zero_()
        for layer in self.layers:
            layer.layer_scalar.fill_(1.0)
            layer.encoder_layer_scalar.fill_(1.0)
        self.rotary.__init__(self.config)
        self.rotary.to(self.embed_tokens.weight.device)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, dtype: torch.dtype = torch.float32, **kwargs) -> "DiffusionGemma":
        """Load the text model of a transformers DiffusionGemma checkpoint (a local directory or a hub id)
        in ``dtype``. Keyword arguments of ``hf.io.load_pretrained``: ``device``, ``attn_backend``
        (auto / sdpa / flex), ``num_layers`` (the first N layers only), ``revision``. Raises
        CheckpointError naming the file and tensor when the checkpoint does not fit the config."""
        from blockdiff.model.hf.io import load_pretrained  # here: hf.io builds this class (import cycle)

        return load_pretrained(path_or_hub_id, dtype=dtype, **kwargs)

    def save_pretrained(self, out_dir, **kwargs) -> None:
        """Write a checkpoint transformers loads (``DiffusionGemmaForBlockDiffusion.from_pretrained``):
        config.json, safetensors shards and, from the source checkpoint, the tensors this model does not
        hold (the vision tower) and the tokenizer files (a model built from a config gets transformers'
        own vision init). Written to a temporary directory and swapped into place. Keyword arguments of
        ``hf_save.save_pretrained``: ``max_shard_size`` (bytes), ``dtype`` (default: the source checkpoint's),
        ``source_dir``."""
        hf_save.save_pretrained(self, out_dir, **kwargs)

    # ---- helpers ------------------------------------------------------------------------------

    def backend_for(self, device: torch.device) -> str:
        if self.attn_backend != "auto":
            return self.attn_backend
        return "flex" if device.type == "cuda" else "sdpa"

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight
        scale = torch.tensor(self.embed_scale, dtype=w.dtype)
        return F.embedding(ids, w, padding_idx=self.config.pad_token_id) * scale

    def soft_embeddings(self, logits: torch.Tensor) -> torch.Tensor:
        """Self-conditioning input: softmax (fp32) of previous logits times the scaled embedding."""
        w = self.embed_tokens.weight
        probs = torch.softmax(logits.float(), dim=-1).to(w.dtype)
        return (probs @ w) * torch.tensor(self.embed_scale, dtype=w.dtype)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied lm_head, then softcapping in fp32."""
        logits = F.linear(hidden, self.embed_tokens.weight.to(hidden.dtype)).float()
        cap = self.config.final_logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits

    def _run_layers(self, x, positions, info: MaskInfo, prefix: KVCache | None, encoder: bool):
        masks = Masks(info, self.backend_for(x.device))
        if masks.backend != "flex":  # dense masks up front: compiled layers (sampling) then only read them
            for sliding in {layer.self_attn.sliding for layer in self.layers}:
                masks.get(sliding)
        rope = self.rotary(positions)
        new_kv = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, rope[layer.self_attn.layer_type], masks, prefix.kv[i] if prefix else None, encoder)
            new_kv.append(kv)
        return self.norm(x), new_kv

    # ---- the two passes -----------------------------------------------------------------------

    def encode(
        self,
        input_ids: torch.Tensor,
        valid: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        past: KVCache | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Causal pass over clean tokens. Returns (final normed hidden [B, L, H], cache incl. ``past``).

        Default positions count valid tokens (so left or right padding both work), continuing
        after ``past``. ``doc_ids`` [B, L] (packed rows, not with ``past``): tokens attend only
        within their document; pass ``positions`` restarting at 0 per document with it.
        """
        if doc_ids is not None and past is not None:
            raise ValueError("doc_ids (packed rows) cannot be combined with a past cache")
        B, L = input_ids.shape
        if valid is None:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        if positions is None:
            positions = (torch.cumsum(valid.long(), dim=1) - 1).clamp(min=0)
            if past is not None:
                positions = positions + past.next_position()[:, None]
        W = self.config.sliding_window
        k_pos = positions if past is None else torch.cat([past.positions, positions], 1)
        k_valid = valid if past is None else torch.cat([past.valid, valid], 1)
        info = MaskInfo(
            q_hi=positions + 1, q_lo=positions - W + 1, q_block=torch.full_like(positions, -1), q_valid=valid,
            k_pos=k_pos, k_block=torch.full_like(k_pos, -1), k_valid=k_valid, q_doc=doc_ids, k_doc=doc_ids,
        )
        hidden, new_kv = self._run_layers(self.embed(input_ids), positions, info, past, encoder=True)
        if past is not None:
            new_kv = [(torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for (pk, pv), (k, v) in zip(past.kv, new_kv)]
        return hidden, KVCache(new_kv, k_pos, k_valid, doc_ids)

    def decode(
        self,
        canvas_ids: torch.Tensor,
        cache: KVCache,
        layout: CanvasLayout | None = None,
        soft_embeds: torch.Tensor | None = None,
        sc_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bidirectional pass over canvas tokens reading ``cache``. Returns final normed hidden [B, R, H].

        Without a layout the canvas is one block right after the cache (inference).
        ``soft_embeds`` [B, R, H] is the self-conditioning signal (zeros when None); ``sc_mask`` [B]
        switches it off per example ([B, R]: per canvas token, for packed rows).
        A layout with document ids (packed rows) needs a cache encoded with ``doc_ids``.
        """
        B, R = canvas_ids.shape
        if layout is None:
            start = cache.next_position()
            layout = canvas_layout(start, torch.ones_like(start), R, R)
        embeds = self.embed(canvas_ids)
        if soft_embeds is None:
            soft_embeds = torch.zeros_like(embeds)
        elif sc_mask is not None:
            m = sc_mask.to(soft_embeds.dtype)
            soft_embeds = soft_embeds * (m[:, :, None] if m.dim() == 2 else m[:, None, None])
        x = self.self_conditioning(embeds, soft_embeds.to(embeds.dtype))
        W = self.config.sliding_window
        info = MaskInfo(
            q_hi=layout.block_starts, q_lo=layout.block_starts - W + 1, q_block=layout.blocks, q_valid=layout.valid,
            k_pos=torch.cat([cache.positions, layout.positions], 1),
            k_block=torch.cat([torch.full_like(cache.positions, -1), layout.blocks], 1),
            k_valid=torch.cat([cache.valid, layout.valid], 1),
        )
        if (layout.docs is None) != (cache.docs is None):
            raise ValueError("packed rows need document ids in both the canvas layout and the cache")
        if layout.docs is not None:
            info.q_doc, info.k_doc = layout.docs, torch.cat([cache.docs, layout.docs], 1)
        hidden, _ = self._run_layers(x, layout.positions, info, cache, encoder=False)
        return hidden

    # ---- transformers-equivalent inference call -------------------------------------------------

    def denoise_logits(
        self,
        prompt_ids: torch.Tensor,
        canvas_ids: torch.Tensor,
        self_conditioning_logits: torch.Tensor | None = None,
        self_conditioning_mask: torch.Tensor | None = None,
        prompt_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Same meaning as ``DiffusionGemmaForBlockDiffusion(input_ids=prompt_ids, decoder_input_ids=
        canvas_ids, self_conditioning_logits=..., self_conditioning_mask=...).logits``."""
        _, cache = self.encode(prompt_ids, valid=prompt_valid)
        soft = None if self_conditioning_logits is None else self.soft_embeddings(self_conditioning_logits)
        return self.lm_logits(self.decode(canvas_ids, cache, soft_embeds=soft, sc_mask=self_conditioning_mask))
