"""Canvas examples and batches for block-diffusion SFT.

An example is ``prompt + response`` where the response (the final assistant turn: content +
end-of-turn, see ``chat.tokenize_conversation``) is EOS-filled up to a multiple of
``canvas_length``; the EOS fill is supervised (the model must learn to stop). The response
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
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Iterable

import torch

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


@dataclass
class CanvasBatch:
    input_ids: torch.Tensor  # [B, L] long, right-padded with pad_id
    valid: torch.Tensor  # [B, L] bool, False on padding
    prompt_lengths: torch.Tensor  # [B] long
    num_blocks: torch.Tensor  # [B] long
    sample_ids: torch.Tensor  # [B] long
    block_size: int = field(default=256)

    @property
    def canvas_length(self) -> int:
        return self.block_size

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def supervised_mask(self) -> torch.Tensor:
        """[B, L] bool: canvas (response) positions, i.e. valid positions past the prompt."""
        pos = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return self.valid & (pos[None, :] >= self.prompt_lengths[:, None])

    def to(self, device, non_blocking: bool = False) -> "CanvasBatch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return CanvasBatch(move(self.input_ids), move(self.valid), move(self.prompt_lengths),
                           move(self.num_blocks), move(self.sample_ids), self.block_size)


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
    return CanvasBatch(ids, valid, as_long([e.prompt_length for e in examples]),
                       as_long([e.num_blocks for e in examples]),
                       as_long([e.sample_id for e in examples]), canvas_length)


class SFTDataset(torch.utils.data.Dataset):
    """Map-style dataset of canvas Examples built from chat rows and a tokenizer.

    ``source`` is a path / dataset name (see ``jsonl.load_dataset_rows``) or an iterable of
    validated rows. ``sample_id`` is the row's index in the source, so it does not shift when
    other rows are skipped. Stats: ``n_rows, n_kept, n_skipped_prompt_too_long, n_truncated``.
    """

    def __init__(self, source, tokenizer, *, canvas_length: int, seq_length: int,
                 prompt_policy: str = "skip", split: str = "train", eos_id: int | None = None):
        from blockdiff.data.chat import tokenize_conversation
        from blockdiff.data.jsonl import load_dataset_rows

        eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
        if isinstance(eos_id, (list, tuple)):  # generation configs list several stop ids; fill uses the first
            eos_id = eos_id[0] if eos_id else None
        if eos_id is None:
            raise DataError("tokenizer has no eos_token_id; pass eos_id explicitly", field="eos_id")
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
            try:
                ids, sup, plen = tokenize_conversation(tokenizer, row["messages"])
                ex = build_example(ids, sup, plen, canvas_length=canvas_length, seq_length=seq_length,
                                   eos_id=eos_id, sample_id=index, prompt_policy=prompt_policy)
            except DataError as e:
                raise e.with_location(file=file, line=line if line is not None else index + 1) from None
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


def iter_global_batches(order: Iterable[int], global_batch: int) -> Iterable[list[int]]:
    """Consecutive ``global_batch``-sized chunks of ``order`` (a trailing partial chunk is dropped
    so every step has the same global batch)."""
    order = list(order)
    for start in range(0, len(order) - global_batch + 1, global_batch):
        yield order[start: start + global_batch]
