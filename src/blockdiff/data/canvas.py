"""Canvas examples and batches for block-diffusion SFT.

An example is ``prompt + response`` where the response (the final assistant turn: what the model emits
after its generation prompt, e.g. reply + ``<turn|>\n``, see ``chat.tokenize_conversation``) is EOS-filled
up to a multiple of ``canvas_length``; the EOS fill is supervised (the model must learn to stop). The response
forms ``num_blocks`` canvases of ``canvas_length`` tokens each, denoised jointly under a
block-causal mask.

Truncation policy (sequence cap ``seq_length``):

* if ``prompt_length + num_blocks * canvas_length > seq_length``, whole trailing response
  blocks are dropped until it fits; at least one block is kept. The example is marked
  ``truncated=True`` and its sequence is exactly ``prompt + k * canvas_length`` tokens (the
  last kept block holds response tokens only, possibly without end-of-turn/EOS);
* the prompt is never truncated: if even ``prompt + one block`` exceeds ``seq_length``, the
  example is skipped (``prompt_policy="skip"``: ``build_example`` returns None and the caller
  counts it) or rejected (``prompt_policy="fail"``: DataError).

Multi-turn SFT (``data.mask_history: false``, ``build_multiturn_example``): every assistant turn
(content + end-of-turn) is its own canvas segment, EOS-filled to a multiple of ``canvas_length``.
The fill is written into the CLEAN sequence too, right after the turn, so canvas positions equal
clean positions; later turns are therefore conditioned on (and the encoder's AR loss reads) the
earlier turns including their EOS fill. Each segment's canvas sees the clean tokens before it (the
history, earlier blocks of its own turn) under the unchanged block-causal mask. Truncation: segments
are kept in order while they fit in ``seq_length``; the first one that does not fit keeps as many
whole blocks as fit (if at least one does) and everything after it is dropped (``truncated=True``).
If not even the first turn's context + one block fits, the prompt policy applies as above.
``mask_history: true`` is the reference path (final turn only) and builds exactly today's examples.

Packing (``data.packing: true``, ``collate_packed``): a micro-batch's conversations are regrouped into
rows of at most ``seq_length`` tokens by ``packing.pack_rows`` (best-fit decreasing at the row capacity
that minimises the padded clean + canvas tokens; never more padding than one conversation per row). Each token
carries its conversation's document id and a position restarting at 0 per conversation; the model's
masks keep conversations apart in the encoder and the decoder. Every conversation keeps its own sample
id and noise stream, so the plan changes the layout only, never what is trained on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from blockdiff.data.chat import tokenize_conversation, tokenize_turns
from blockdiff.data.jsonl import load_dataset_rows
from blockdiff.data.packing import pack_rows
from blockdiff.errors import DataError

logger = logging.getLogger(__name__)

PROMPT_POLICIES = ("skip", "fail")


@dataclass
class Example:
    input_ids: list[int]  # prompt + num_blocks * canvas_length tokens
    prompt_length: int
    num_blocks: int
    sample_id: int  # stable index of the source row (seeds the per-sample noise)
    truncated: bool
    # multi-turn: (start position, number of blocks) per supervised turn; None: one segment
    # (prompt_length, num_blocks), the reference layout. num_blocks is then the total over segments
    # and prompt_length the first segment's start.
    segments: list[tuple[int, int]] | None = None

    def segment_list(self) -> list[tuple[int, int]]:
        return self.segments if self.segments is not None else [(self.prompt_length, self.num_blocks)]


def build_example(input_ids, supervised, prompt_length, *, canvas_length: int, seq_length: int,
                  eos_id: int, sample_id: int, prompt_policy: str = "skip") -> Example | None:
    """Turn a tokenized conversation into a canvas Example (see module docstring)."""
    if prompt_policy not in PROMPT_POLICIES:
        raise DataError(f"expected one of {PROMPT_POLICIES}, got {prompt_policy!r}", field="prompt_policy")
    if canvas_length <= 0 or seq_length <= 0:
        raise DataError(f"canvas_length ({canvas_length}) and seq_length ({seq_length}) must be positive",
                        field="canvas_length")
    input_ids, supervised = list(input_ids), list(supervised)
    if len(input_ids) != len(supervised):
        raise DataError(f"input_ids ({len(input_ids)}) and supervised ({len(supervised)}) differ in length",
                        field="supervised")
    # The supervised tokens must be the contiguous suffix starting at prompt_length.
    if not (0 <= prompt_length < len(input_ids)) or any(supervised[:prompt_length]) \
            or not all(supervised[prompt_length:]):
        raise DataError("supervised tokens must be a non-empty contiguous suffix starting at "
                        f"prompt_length={prompt_length}", field="supervised")
    if prompt_length + canvas_length > seq_length:
        if prompt_policy == "fail":
            raise DataError(f"prompt is {prompt_length} tokens; prompt + one canvas block "
                            f"({canvas_length}) exceeds seq_length {seq_length}", field="messages")
        return None

    prompt, response = input_ids[:prompt_length], input_ids[prompt_length:]
    num_blocks = -(-len(response) // canvas_length)  # ceil
    response = response + [eos_id] * (num_blocks * canvas_length - len(response))
    max_blocks = (seq_length - prompt_length) // canvas_length
    truncated = num_blocks > max_blocks
    if truncated:
        num_blocks = max_blocks
        response = response[: num_blocks * canvas_length]
    return Example(prompt + response, prompt_length, num_blocks, sample_id, truncated)


def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of True."""
    out, i = [], 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


def build_multiturn_example(input_ids, supervised, *, canvas_length: int, seq_length: int, eos_id: int,
                            sample_id: int, prompt_policy: str = "skip") -> Example | None:
    """Every supervised run (assistant turn) becomes a canvas segment (see module docstring)."""
    if prompt_policy not in PROMPT_POLICIES:
        raise DataError(f"expected one of {PROMPT_POLICIES}, got {prompt_policy!r}", field="prompt_policy")
    if canvas_length <= 0 or seq_length <= 0:
        raise DataError(f"canvas_length ({canvas_length}) and seq_length ({seq_length}) must be positive",
                        field="canvas_length")
    input_ids, supervised = list(input_ids), [bool(m) for m in supervised]
    if len(input_ids) != len(supervised):
        raise DataError(f"input_ids ({len(input_ids)}) and supervised ({len(supervised)}) differ in length",
                        field="supervised")
    runs = _runs(supervised)
    if not runs or runs[0][0] == 0:
        raise DataError("supervised tokens must form non-empty runs after a non-empty prompt", field="supervised")
    C = canvas_length
    out: list[int] = []
    segments: list[tuple[int, int]] = []
    truncated = False
    prev = 0
    for a, e in runs:
        out += input_ids[prev:a]
        start = len(out)
        n = -(-(e - a) // C)
        if start + C > seq_length:  # not even one block of this turn fits
            truncated = True
            break
        fits = (seq_length - start) // C
        turn = input_ids[a:e] + [eos_id] * (n * C - (e - a))
        if n > fits:
            n, turn, truncated = fits, turn[: fits * C], True
        out += turn
        segments.append((start, n))
        prev = e
        if truncated:
            break
    if not segments:
        if prompt_policy == "fail":
            raise DataError(f"prompt is {runs[0][0]} tokens; prompt + one canvas block "
                            f"({C}) exceeds seq_length {seq_length}", field="messages")
        return None
    out = out[: segments[-1][0] + segments[-1][1] * C]
    return Example(out, segments[0][0], sum(n for _, n in segments), sample_id, truncated, segments)


@dataclass
class CanvasBatch:
    input_ids: torch.Tensor  # [B, L] long, right-padded with pad_id
    valid: torch.Tensor  # [B, L] bool, False on padding
    prompt_lengths: torch.Tensor  # [B] long
    num_blocks: torch.Tensor  # [B] long
    sample_ids: torch.Tensor  # [B] long; packed batches: [N] over conversations in row-major order
    block_size: int = field(default=256)
    # Multi-turn / packed rows (None on the reference path). ``segments`` [B, S, 4] long: per canvas
    # segment (column of its first token, its position, number of blocks, document = index of its
    # conversation in ``sample_ids``), 0-block padding. ``positions`` [B, L]: RoPE positions restarting
    # per packed conversation; ``doc_ids`` [B, L]: conversation index per token (-1 on padding).
    # In packed batches ``prompt_lengths`` / ``num_blocks`` are per row: first segment's column, total blocks.
    segments: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.doc_ids is not None

    def segment_table(self) -> torch.Tensor:
        """[B, S, 4] segments; the reference path's one segment per row is (P, P, num_blocks, row)."""
        if self.segments is not None:
            return self.segments
        P = self.prompt_lengths
        return torch.stack([P, P, self.num_blocks, torch.arange(len(P), device=P.device)], 1)[:, None, :]

    @property
    def canvas_length(self) -> int:
        return self.block_size

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def supervised_mask(self) -> torch.Tensor:
        """[B, L] bool: canvas (response) positions, i.e. valid positions past the prompt (multi-turn /
        packed rows: the columns covered by the canvas segments)."""
        pos = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        if self.segments is None:
            return self.valid & (pos[None, :] >= self.prompt_lengths[:, None])
        col, n = self.segments[..., 0:1], self.segments[..., 2:3] * self.block_size  # [B, S, 1]
        return self.valid & ((pos[None, None, :] >= col) & (pos[None, None, :] < col + n)).any(1)

    def to(self, device, non_blocking: bool = False) -> "CanvasBatch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        opt = lambda t: None if t is None else move(t)  # noqa: E731
        return CanvasBatch(move(self.input_ids), move(self.valid), move(self.prompt_lengths),
                           move(self.num_blocks), move(self.sample_ids), self.block_size,
                           opt(self.segments), opt(self.positions), opt(self.doc_ids))

    def real_tokens(self) -> int:
        return int(self.valid.sum())

    def padded_tokens(self) -> int:
        return self.input_ids.numel()


def _segment_tensor(rows: list[list[tuple[int, int, int, int]]]) -> torch.Tensor:
    S = max(len(r) for r in rows)
    t = torch.zeros(len(rows), S, 4, dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            t[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return t


def collate(examples: list[Example], canvas_length: int, pad_id: int = 0,
            pad_to_multiple: int | None = None) -> CanvasBatch:
    """Right-pad examples into a CanvasBatch (L = longest, rounded up to ``pad_to_multiple``)."""
    if not examples:
        raise DataError("cannot collate an empty list of examples")
    length = max(len(e.input_ids) for e in examples)
    if pad_to_multiple:
        length = -(-length // pad_to_multiple) * pad_to_multiple
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    valid = torch.zeros((len(examples), length), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        valid[i, : len(e.input_ids)] = True
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    segments = None
    if any(e.segments is not None for e in examples):  # multi-turn rows
        segments = _segment_tensor([[(s, s, n, i) for s, n in e.segment_list()] for i, e in enumerate(examples)])
    return CanvasBatch(ids, valid, as_long([e.prompt_length for e in examples]),
                       as_long([e.num_blocks for e in examples]),
                       as_long([e.sample_id for e in examples]), canvas_length, segments)


def collate_packed(examples: list[Example], canvas_length: int, seq_length: int, pad_id: int = 0,
                   pad_to_multiple: int | None = None) -> tuple[CanvasBatch, list[int]]:
    """Pack ``examples`` into rows of at most ``seq_length`` tokens (``packing.pack_rows``: the fewest
    padded clean + canvas tokens, given the rounding of the row width up to ``pad_to_multiple``, and
    never more padded clean tokens than ``collate`` would give).

    Returns the batch and the order of its conversations (indices into ``examples``, row-major:
    ``sample_ids`` and the document ids follow it). Positions restart at 0 per conversation."""
    if not examples:
        raise DataError("cannot collate an empty list of examples")
    groups = pack_rows([len(e.input_ids) for e in examples], seq_length, pad_to_multiple,
                       [e.num_blocks for e in examples], canvas_length)
    length = max(sum(len(examples[i].input_ids) for i in g) for g in groups)
    if pad_to_multiple:
        length = -(-length // pad_to_multiple) * pad_to_multiple
    B = len(groups)
    ids = torch.full((B, length), pad_id, dtype=torch.long)
    valid = torch.zeros((B, length), dtype=torch.bool)
    positions = torch.zeros((B, length), dtype=torch.long)
    docs = torch.full((B, length), -1, dtype=torch.long)
    seg_rows, order, plen, nblk = [], [], [], []
    for b, g in enumerate(groups):
        col, segs = 0, []
        for i in g:
            e, d = examples[i], len(order)
            n = len(e.input_ids)
            ids[b, col: col + n] = torch.tensor(e.input_ids, dtype=torch.long)
            valid[b, col: col + n] = True
            positions[b, col: col + n] = torch.arange(n)
            docs[b, col: col + n] = d
            segs += [(col + s, s, k, d) for s, k in e.segment_list()]
            order.append(i)
            col += n
        seg_rows.append(segs)
        plen.append(segs[0][0])
        nblk.append(sum(s[2] for s in segs))
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    batch = CanvasBatch(ids, valid, as_long(plen), as_long(nblk), as_long([examples[i].sample_id for i in order]),
                        canvas_length, _segment_tensor(seg_rows), positions, docs)
    return batch, order


def fill_token_id(tokenizer, eos_id: int | list[int] | None = None) -> int:
    """The id that EOS-fills canvases: ``eos_id`` (the model config's; a list: its first entry), else the
    tokenizer's EOS."""
    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    if isinstance(eos_id, (list, tuple)):  # generation configs list several stop ids; fill uses the first
        eos_id = eos_id[0] if eos_id else None
    if eos_id is None:
        raise DataError("tokenizer has no eos_token_id; pass eos_id explicitly", field="eos_id")
    return int(eos_id)


def build_row_example(tokenizer, messages: list[dict], *, canvas_length: int, seq_length: int, eos_id: int,
                      sample_id: int, prompt_policy: str = "skip", mask_history: bool = True, tools=None,
                      file=None, line=None) -> tuple[list[int], list[bool], Example | None]:
    """Tokenize one chat row and build its canvas Example, as ``SFTDataset`` does for every row.

    Returns ``(input_ids, supervised, example)``: the tokenized conversation (``supervised`` marks the
    final reply with ``mask_history``, every assistant turn without; ``tools``: the row's declarations)
    and its Example (None: skipped,
    prompt too long). A DataError gets ``file`` / ``line`` where it names none."""
    try:
        if mask_history:  # reference: the final assistant turn only
            ids, sup, plen = tokenize_conversation(tokenizer, messages, tools=tools)
            ex = build_example(ids, sup, plen, canvas_length=canvas_length, seq_length=seq_length,
                               eos_id=eos_id, sample_id=sample_id, prompt_policy=prompt_policy)
        else:  # every assistant turn
            ids, sup = tokenize_turns(tokenizer, messages, tools=tools)
            ex = build_multiturn_example(ids, sup, canvas_length=canvas_length, seq_length=seq_length,
                                         eos_id=eos_id, sample_id=sample_id, prompt_policy=prompt_policy)
    except DataError as e:
        raise e.with_location(file=file, line=line) from None
    return list(ids), [bool(m) for m in sup], ex


class SFTDataset(torch.utils.data.Dataset):
    """Map-style dataset of canvas Examples built from chat rows and a tokenizer.

    ``source`` is a path / dataset name (see ``jsonl.load_dataset_rows``) or an iterable of
    validated rows. ``sample_id`` is the row's index in the source, so it does not shift when
    other rows are skipped. Stats: ``n_rows, n_kept, n_skipped_prompt_too_long, n_truncated``.
    """

    def __init__(self, source, tokenizer, *, canvas_length: int, seq_length: int,
                 prompt_policy: str = "skip", split: str = "train", eos_id: int | None = None,
                 mask_history: bool = True):
        eos_id = fill_token_id(tokenizer, eos_id)
        if isinstance(source, (str, os.PathLike)):
            file = os.fspath(source)
            located = load_dataset_rows(source, split=split, with_lines=True)
        else:
            file = None
            located = ((None, row) for row in source)

        self.canvas_length = canvas_length
        self.seq_length = seq_length
        self.examples: list[Example] = []
        self.n_rows = self.n_skipped_prompt_too_long = self.n_truncated = 0
        for index, (line, row) in enumerate(located):
            self.n_rows += 1
            _, _, ex = build_row_example(tokenizer, row["messages"], canvas_length=canvas_length,
                                         seq_length=seq_length, eos_id=eos_id, sample_id=index,
                                         prompt_policy=prompt_policy, mask_history=mask_history, tools=row.get("tools"),
                                         file=file,
                                         line=line if line is not None else index + 1)
            if ex is None:
                self.n_skipped_prompt_too_long += 1
                continue
            self.n_truncated += ex.truncated
            self.examples.append(ex)
        if not self.examples:
            raise DataError(
                f"dataset is empty after filtering: {self.n_rows} rows read, "
                f"{self.n_skipped_prompt_too_long} rows skipped because prompt + one canvas block "
                f"({canvas_length}) exceeds seq_length {seq_length}", file=file)
        if self.n_skipped_prompt_too_long or self.n_truncated:
            logger.warning("%s: %d rows, %d skipped (prompt too long), %d truncated", file or "dataset",
                           self.n_rows, self.n_skipped_prompt_too_long, self.n_truncated)

    @classmethod
    def from_config(cls, data, tokenizer, eos_id, path=None) -> "SFTDataset":
        """The dataset a run reads: ``data`` is the config's data section; ``path`` another file built the same
        way (the validation set: its own file, so the train split name does not apply)."""
        return cls(path or data.train_path, tokenizer, canvas_length=data.canvas_length, seq_length=data.seq_length,
                   prompt_policy=data.prompt_too_long, split="train" if path else data.split, eos_id=eos_id,
                   mask_history=data.mask_history)

    @property
    def n_kept(self) -> int:
        return len(self.examples)

    def stats(self) -> dict[str, int]:
        return {"n_rows": self.n_rows, "n_kept": self.n_kept,
                "n_skipped_prompt_too_long": self.n_skipped_prompt_too_long, "n_truncated": self.n_truncated}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def collate(self, examples: list[Example], pad_id: int = 0, pad_to_multiple: int | None = None):
        return collate(examples, self.canvas_length, pad_id=pad_id, pad_to_multiple=pad_to_multiple)


def global_order(n: int, epoch: int, seed: int) -> list[int]:
    """Seeded permutation of ``range(n)`` for ``epoch``: identical on every rank and world size
    (each rank then takes its slice of the same global order)."""
    gen = torch.Generator()
    gen.manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1))  # distinct stream per epoch
    return torch.randperm(n, generator=gen).tolist()
