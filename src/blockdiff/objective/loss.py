"""The block-diffusion SFT objective: corruption, two-pass self-conditioning, losses.

Reference behaviour (the default):
- per example t = eps + (1 - eps) * U(0, 1); every supervised canvas position is replaced, with
  probability t, by a token drawn uniformly from the whole vocabulary (no [MASK]); prompts never.
- pass 1: decoder over the noisy canvas without gradients and without self-conditioning; its
  softcapped logits -> fp32 softmax -> @ embedding * sqrt(hidden) = soft embeddings. The embedding gets a
  gradient through that last matmul (``soft_embed``), the logits none.
- pass 2: the same canvas with the soft embeddings for a random p-share of the examples (zeros for the
  rest); the only decoder pass with gradients.
- loss: cross-entropy over ALL supervised positions of one uniformly chosen block per example, summed
  and divided by the global count of scored tokens; plus the encoder's next-token loss over the clean
  sequence times ``ar_loss_weight``, token-normalised (``ar_loss_reduction: token``) or the mean over the
  global batch's conversations of each one's mean over its own AR tokens (``example``).

Multi-turn and packed rows (``data.mask_history: false`` / ``data.packing: true``): a row holds
several canvas segments (one per supervised turn) of one or several conversations. The draws are
per CONVERSATION, keyed by its own stream index: t, the scored block (uniform over ALL the
conversation's blocks, across its turns), the self-conditioning coin, then the per-token uniforms
and replacements over its blocks in order. A conversation therefore gets the same noise packed or
not, and a single-segment conversation gets exactly the reference draws. The losses stay
normalised by the global counts (an ``example`` is a conversation, not a row).

All randomness comes from a generator keyed by (seed, global stream index of the sample), so the same
sample gets the same noise, block and self-conditioning coin on any world size, accumulation split
or after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from blockdiff.data.canvas import CanvasBatch, collate, collate_packed
from blockdiff.objective.fused_ce import linear_softcap_ce_sum
from blockdiff.model.diffusion_gemma import CanvasLayout, DiffusionGemma, canvas_layout, segment_layout
from blockdiff.objective.soft_embed import soft_embeddings

AR_LOSS_REDUCTIONS = ("token", "example")


@dataclass
class ObjectiveSettings:
    eps: float = 1e-3
    self_conditioning_prob: float = 0.5
    loss_type: str = "all_supervised"
    ar_loss_weight: float = 1.0
    ar_loss_scope: str = "sequence"  # "sequence" (whole clean sequence) or "response"
    ar_loss_reduction: str = "token"  # "token" (over the global batch's AR tokens) or "example" (see module doc)
    chunk_tokens: int = 1024  # tokens per chunk of the vocabulary-wide logits

    @classmethod
    def from_config(cls, section) -> "ObjectiveSettings":
        """From the config's ``objective`` section: every field of both takes the section's value."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls) if hasattr(section, f.name)})


@dataclass
class Noise:
    """Per-example draws, all on the batch's device."""

    t: torch.Tensor  # [N] corruption level per conversation (N = B unless packed)
    corrupted: torch.Tensor  # [B, R] bool (only ever True on valid canvas positions)
    noisy: torch.Tensor  # [B, R] canvas token ids after corruption
    clean: torch.Tensor  # [B, R] clean response ids
    layout: CanvasLayout
    block: torch.Tensor  # [N] the block (index among its conversation's blocks) the loss scores
    self_condition: torch.Tensor  # [N] bool coin
    # [B, R] conversation index (into the [N] draws) and block index within that conversation of every
    # canvas token (0 on invalid slots); None: the reference layout (row b = conversation b, row block ids)
    conv: torch.Tensor | None = None
    conv_block: torch.Tensor | None = None
    _scored_index: dict = field(default_factory=dict, repr=False)  # loss type -> flat indices (cache)
    _self_conditioned_index: torch.Tensor | None = field(default=None, repr=False)  # cache

    def token_conv(self) -> torch.Tensor:
        if self.conv is not None:
            return self.conv
        B, R = self.noisy.shape
        return torch.arange(B, device=self.noisy.device)[:, None].expand(B, R)

    def token_t(self) -> torch.Tensor:
        """[B, R] corruption level of each canvas token's conversation."""
        return self.t[:, None].expand_as(self.noisy) if self.conv is None else self.t[self.conv]

    def token_self_condition(self) -> torch.Tensor:
        """sc_mask for the decoder: [B] on the reference layout, [B, R] per token otherwise."""
        return self.self_condition if self.conv is None else self.self_condition[self.conv]

    def scored(self, loss_type: str) -> torch.Tensor:
        """[B, R] bool: positions that enter the diffusion loss."""
        if self.conv is None:
            in_block = self.layout.valid & (self.layout.blocks == self.block[:, None])
        else:
            in_block = self.layout.valid & (self.conv_block == self.block[self.conv])
        if loss_type in ("corrupted_only", "reweighted"):
            return in_block & self.corrupted
        return in_block

    def scored_index(self, loss_type: str) -> torch.Tensor:
        """Flat indices (into [B * R]) of ``scored(loss_type)``. The host read this needs happens at the
        first call, which the trainer makes while counting tokens before the step's work is queued; a
        boolean-mask index after the decoder would stall the host on the whole forward (and its
        backward once more)."""
        if loss_type not in self._scored_index:
            self._scored_index[loss_type] = self.scored(loss_type).flatten().nonzero().squeeze(1)
        return self._scored_index[loss_type]

    def self_conditioned_index(self) -> torch.Tensor:
        """Flat indices (into [B * R]) of the valid canvas tokens whose conversation drew the
        self-conditioning coin: the rows pass 2's soft embeddings are computed for (zeros elsewhere). Read
        on the host at the first call, as ``scored_index``."""
        if self._self_conditioned_index is None:
            sc = self.token_self_condition()
            sc = sc[:, None].expand_as(self.noisy) if sc.dim() == 1 else sc
            self._self_conditioned_index = (sc & self.layout.valid).flatten().nonzero().squeeze(1)
        return self._self_conditioned_index


def sample_generator(seed: int, stream_index: int) -> torch.Generator:
    # splitmix-style mixing so neighbouring indices give unrelated streams
    x = (seed * 0x9E3779B97F4A7C15 + stream_index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 63)
    return torch.Generator().manual_seed(x)


def conversation_draws(seed: int, stream_index: int, num_blocks: int, canvas_length: int, *, vocab_size: int,
                       eps: float, sc_prob: float):
    """The draws of one conversation, in their fixed order: t = eps + (1 - eps) U, the scored block (uniform
    over its ``num_blocks``), the self-conditioning coin, then one uniform and one replacement token per
    canvas position of its blocks in order. Sized by the conversation itself (never by the batch), so they do
    not depend on batching, packing or the world size."""
    g = sample_generator(seed, int(stream_index))
    t = eps + (1 - eps) * torch.rand((), generator=g)
    block = torch.randint(int(num_blocks), (), generator=g)
    coin = torch.rand((), generator=g) < sc_prob
    n = int(num_blocks) * canvas_length
    return t, block, coin, torch.rand(n, generator=g), torch.randint(vocab_size, (n,), generator=g)


def draw_noise(batch, stream_index: torch.Tensor, *, seed: int, vocab_size: int, eps: float, sc_prob: float) -> Noise:
    """Corrupt the response of every conversation of ``batch`` (a CanvasBatch) deterministically.

    ``stream_index`` has one entry per conversation (per row unless packed), in ``sample_ids`` order. One row
    per conversation (the reference layout) places each conversation's draws on its row; multi-turn and
    packed rows (``batch.segments``) place them block by block where the conversation's segments sit."""
    C = batch.canvas_length
    conv = conv_block = None
    if batch.segments is None:
        R = int(batch.num_blocks.max()) * C
        layout = canvas_layout(batch.prompt_lengths, batch.num_blocks, R, C)
        clean = torch.gather(batch.input_ids, 1, layout.positions.clamp(max=batch.input_ids.shape[1] - 1))
        blocks = batch.num_blocks.tolist()
        where = [[(b, k) for k in range(n)] for b, n in enumerate(blocks)]  # (row, block of the row) per conv
        rows = len(blocks)
    else:
        table = batch.segments.cpu()
        R = int(table[..., 2].sum(1).max()) * C
        layout = segment_layout(batch.segments, R, C, packed=batch.packed)  # on the batch's device
        clean = torch.gather(batch.input_ids, 1, layout.gather_columns())
        rows = table.shape[0]
        conv = torch.zeros(rows, R, dtype=torch.long)
        conv_block = torch.zeros(rows, R, dtype=torch.long)
        where = [[] for _ in range(len(stream_index))]
        for b, row in enumerate(table.tolist()):
            k = 0
            for _, _, n, d in row:
                for _ in range(n):
                    conv[b, k * C: (k + 1) * C] = d
                    conv_block[b, k * C: (k + 1) * C] = len(where[d])
                    where[d].append((b, k))
                    k += 1
        blocks = [len(w) for w in where]
    N = len(blocks)
    t = torch.empty(N)
    block = torch.empty(N, dtype=torch.long)
    coin = torch.empty(N, dtype=torch.bool)
    u = torch.ones(rows, R)
    repl = torch.zeros(rows, R, dtype=torch.long)
    for d, idx in enumerate(stream_index.tolist()):
        t[d], block[d], coin[d], ud, rd = conversation_draws(seed, idx, blocks[d], C, vocab_size=vocab_size, eps=eps,
                                                             sc_prob=sc_prob)
        for j, (b, k) in enumerate(where[d]):
            u[b, k * C: (k + 1) * C] = ud[j * C: (j + 1) * C]
            repl[b, k * C: (k + 1) * C] = rd[j * C: (j + 1) * C]
    dev = batch.input_ids.device
    t, block, coin, u, repl = (x.to(dev) for x in (t, block, coin, u, repl))
    clean = clean.masked_fill(~layout.valid, 0)
    if conv is None:
        corrupted = (u < t[:, None]) & layout.valid
    else:
        conv, conv_block = conv.to(dev), conv_block.to(dev)
        corrupted = (u < t[conv]) & layout.valid
    noisy = torch.where(corrupted, repl, clean)
    return Noise(t, corrupted, noisy, clean, layout, block, coin, conv, conv_block)


def noisy_micro_batch(examples, stream_index: list[int], settings: ObjectiveSettings, data, *, seed: int,
                      vocab_size: int, device_type: str) -> tuple[CanvasBatch, Noise]:
    """One micro-batch as the objective reads it, built on the host: ``examples`` collated (``data.packing``:
    packed into rows of ``data.seq_length``) and corrupted with the noise of their stream indices (one per
    example), the scored-token indices computed. ``data``: the config's data section. Training and the
    validation loss build theirs here."""
    # on GPU, lengths rounded up to 128 (flex_attention's block) keep compiled shapes few
    pad = 128 if device_type == "cuda" else None
    if data.packing:
        batch, order = collate_packed(examples, data.canvas_length, data.seq_length, pad_to_multiple=pad)
        stream_index = [stream_index[i] for i in order]
    else:
        batch = collate(examples, data.canvas_length, pad_to_multiple=pad)
    noise = draw_noise(batch, torch.tensor(stream_index), seed=seed, vocab_size=vocab_size, eps=settings.eps,
                       sc_prob=settings.self_conditioning_prob)
    noise.scored_index(settings.loss_type)  # cached in the noise, computed here on the host
    return batch, noise


def softcapped_ce_sum(hidden, weight, targets, token_weight, cap, exclude=None, chunk=1024):
    """sum_i token_weight[i] * CE(softcap(hidden[i] @ weight^T), targets[i]) without holding the full
    [N, V] fp32 logits. Without ``exclude``: the fused chunked kernel (``blockdiff.objective.fused_ce``).

    ``exclude`` (optional [N] ids) removes that token's logit from the softmax where it differs from the
    target (the leave-one-out variant): plain autograd over chunks of ``chunk`` rows, each recomputed in
    backward (checkpoint).
    """
    if exclude is None:
        return linear_softcap_ce_sum(hidden, weight, targets, token_weight, cap, chunk=chunk)

    def piece(h, tgt, w, exc):
        logits = F.linear(h, weight.to(h.dtype)).float()
        if cap:
            logits = cap * torch.tanh(logits / cap)
        drop = F.one_hot(exc, logits.shape[-1]).bool() & (exc != tgt)[:, None]
        logits = logits.masked_fill(drop, float("-inf"))
        return (F.cross_entropy(logits, tgt, reduction="none") * w).sum()

    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk):
        e = slice(s, s + chunk)
        args = (hidden[e], targets[e], token_weight[e], exclude[e])
        total = total + (checkpoint(piece, *args, use_reentrant=False) if torch.is_grad_enabled() else piece(*args))
    return total


def self_conditioning_signal(model: DiffusionGemma, hidden: torch.Tensor, index: torch.Tensor,
                             chunk: int = 1024) -> torch.Tensor | None:
    """Pass 2's soft embeddings [B, R, H] from pass 1's hidden states [B, R, H]: computed for the flat
    token ``index`` (``Noise.self_conditioned_index``), zeros elsewhere, as the reference zeroes them per
    example; no gradient flows to examples without the coin. None when no token self-conditions."""
    if len(index) == 0:
        return None
    flat = hidden.flatten(0, 1)
    soft = soft_embeddings(flat.index_select(0, index), model.embed_tokens.weight,
                           model.config.final_logit_softcapping, model.embed_scale, chunk)
    return soft.new_zeros(flat.shape).index_copy(0, index, soft).view_as(hidden)


def ar_targets(batch, scope: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets [B, L-1] and their 0/1 weights for the encoder co-loss."""
    ids, valid = batch.input_ids, batch.valid
    mask = valid[:, 1:] & valid[:, :-1]
    if getattr(batch, "doc_ids", None) is not None:  # packed: never predict across conversations
        mask = mask & (batch.doc_ids[:, 1:] == batch.doc_ids[:, :-1])
    if scope == "response":
        if getattr(batch, "segments", None) is not None:  # multi-turn / packed: the canvas segments
            mask = mask & batch.supervised_mask()[:, 1:]
        else:
            pos = torch.arange(1, ids.shape[1], device=ids.device)[None, :]
            mask = mask & (pos >= batch.prompt_lengths[:, None])
    return ids[:, 1:], mask


def _target_conversation(batch, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, L-1] conversation index of every AR target (rows unless packed) and the number of conversations."""
    if getattr(batch, "doc_ids", None) is not None:
        return batch.doc_ids[:, 1:].clamp(min=0), len(batch.sample_ids)
    B = mask.shape[0]
    return torch.arange(B, device=mask.device)[:, None].expand_as(mask), B


def _per_conversation(conv: torch.Tensor, n: int, mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(n, device=mask.device).scatter_add_(0, conv.flatten(), mask.flatten().float())


def ar_tokens_per_conversation(batch, mask: torch.Tensor) -> torch.Tensor:
    """[N] AR targets of each conversation (``mask`` from ``ar_targets``); no host read."""
    return _per_conversation(*_target_conversation(batch, mask), mask)


def ar_token_weights(batch, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """[B, L-1] weight of every AR target in the AR loss sum, before the global division: 1 (``token``), or
    1 / its conversation's AR target count (``example``: each conversation's sum becomes its mean)."""
    if reduction == "token":
        return mask.float()
    if reduction != "example":
        raise ValueError(f"ar_loss_reduction must be one of {AR_LOSS_REDUCTIONS}, got {reduction!r}")
    conv, n = _target_conversation(batch, mask)
    return mask.float() / _per_conversation(conv, n, mask).clamp(min=1)[conv]


def count_scored(batch, noise: Noise, settings: ObjectiveSettings) -> tuple[int, int]:
    """(diffusion tokens, AR divisor) this micro-batch contributes: summed over the global batch by the
    trainer to normalise every micro-batch's loss by the same global counts. The AR divisor counts tokens
    (``ar_loss_reduction: token``) or conversations with at least one AR target (``example``). Also reads
    the self-conditioned token indices here (on the host, before the step's work is queued)."""
    if settings.self_conditioning_prob > 0:
        noise.self_conditioned_index()
    ar = 0
    if settings.ar_loss_weight:
        mask = ar_targets(batch, settings.ar_loss_scope)[1]
        if settings.ar_loss_reduction == "example":
            ar = int((ar_tokens_per_conversation(batch, mask) > 0).sum())
        else:
            ar = int(mask.sum())
    return len(noise.scored_index(settings.loss_type)), ar


def compute_loss(
    model: DiffusionGemma,
    batch,
    noise: Noise,
    settings: ObjectiveSettings,
    diffusion_tokens: int | torch.Tensor,
    ar_tokens: int | torch.Tensor,
) -> dict[str, torch.Tensor]:
    """One micro-batch of the objective. Returns the loss to backward (already divided by the global
    counts of ``count_scored``, ints or 0-dim tensors on the device) and its parts."""
    cap = model.config.final_logit_softcapping
    weight = model.embed_tokens.weight
    if getattr(batch, "doc_ids", None) is not None:  # packed: per-conversation positions and masks
        enc_hidden, cache = model.encode(batch.input_ids, batch.valid, positions=batch.positions,
                                         doc_ids=batch.doc_ids)
    else:
        enc_hidden, cache = model.encode(batch.input_ids, batch.valid)

    ar_loss = enc_hidden.new_zeros((), dtype=torch.float32)
    if settings.ar_loss_weight:
        tgt, m = ar_targets(batch, settings.ar_loss_scope)
        h = enc_hidden[:, :-1].reshape(-1, enc_hidden.shape[-1])
        w_ar = ar_token_weights(batch, m, settings.ar_loss_reduction)
        ar_loss = softcapped_ce_sum(h, weight, tgt.reshape(-1), w_ar.reshape(-1), cap,
                                    chunk=settings.chunk_tokens) / _at_least_one(ar_tokens)

    soft = None
    # Always run pass 1 when self-conditioning is on: skipping it when no local coin is set would
    # desynchronise the collectives of sharded / expert-parallel ranks.
    if settings.self_conditioning_prob > 0:
        with torch.no_grad():  # pass 1: no gradient, no self-conditioning signal
            h1 = model.decode(noise.noisy, cache.detach(), noise.layout)
        # with grad mode: the embedding's gradient through the soft-embedding matmul (zeros without the coin)
        soft = self_conditioning_signal(model, h1, noise.self_conditioned_index(), settings.chunk_tokens)
    h2 = model.decode(noise.noisy, cache, noise.layout, soft_embeds=soft)

    idx = noise.scored_index(settings.loss_type)
    w = torch.ones(idx.shape, device=idx.device)
    if settings.loss_type == "reweighted":
        w = w / noise.token_t().flatten()[idx]
    exclude = noise.noisy.flatten()[idx] if settings.loss_type == "leave_one_out" else None
    diff_sum = softcapped_ce_sum(h2.flatten(0, 1).index_select(0, idx), weight, noise.clean.flatten()[idx], w, cap,
                                 exclude=exclude, chunk=settings.chunk_tokens)
    diffusion_loss = diff_sum / _at_least_one(diffusion_tokens)
    loss = diffusion_loss + settings.ar_loss_weight * ar_loss
    return {"loss": loss, "diffusion_loss": diffusion_loss.detach(), "ar_loss": ar_loss.detach()}


def _at_least_one(count: int | torch.Tensor):
    """A token count as a divisor (a device tensor stays one: dividing by it needs no host read)."""
    return count.clamp(min=1).float() if isinstance(count, torch.Tensor) else max(count, 1)


def freeze_router(model: DiffusionGemma) -> int:
    """Freeze every router parameter (proj, scale, per_expert_scale). Returns how many tensors."""
    n = 0
    for layer in model.layers:
        for p in layer.router.parameters():
            p.requires_grad_(False)
            n += 1
    return n
