"""``blockdiff data preview``: the first rows of ``data.train_path`` exactly as the trainer sees them.

Each row goes through the trainer's own pieces: ``train.load_tokenizer``, the model config's EOS (the
canvas fill), ``train.check_consistency`` and ``canvas.build_row_example`` (what ``SFTDataset`` builds for
every row) under the run's ``seq_length``, ``canvas_length``, ``prompt_too_long`` and ``mask_history``.
No weights are read: the model config comes from ``model.from_config`` or the checkpoint's
``config.json``. Packing (``data.packing``) only regroups whole conversations per micro-batch, so a
row's tokens are the same with it on or off; the summary says how many packed rows the kept ones fill.

A row's supervised spans are its assistant replies as trained: content + end-of-turn, then the EOS
fill up to a whole number of canvas blocks (the fill is supervised too: the model learns to stop).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from itertools import islice

from blockdiff.config.schema import load_config
from blockdiff.data.canvas import _runs, build_row_example, fill_token_id
from blockdiff.data.jsonl import load_dataset_rows
from blockdiff.data.packing import pack_rows
from blockdiff.errors import ConfigError
from blockdiff.train.loading import model_config as run_model_config
from blockdiff.train.setup import check_consistency, load_tokenizer

OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧ around supervised text when not colouring


@dataclass
class Span:
    """One supervised assistant turn of a row (positions index the row's training sequence)."""

    start: int
    n_tokens: int  # reply tokens kept (content + end-of-turn)
    n_fill_tokens: int  # EOS fill after them, up to the block boundary
    n_blocks: int
    text: str


@dataclass
class RowPreview:
    line: int  # 1-based line in the JSONL (row index for ``datasets`` sources)
    prompt_text: str  # everything before the first supervised token
    supervised_text: str  # the supervised replies (without the EOS fill), concatenated
    n_prompt_tokens: int
    n_supervised_tokens: int
    n_fill_tokens: int
    n_blocks: int
    n_tokens: int  # the training sequence: prompt + blocks (+ clean history between turns)
    truncated: bool
    skipped: bool = False
    reason: str | None = None  # why truncated or skipped
    spans: list[Span] = field(default_factory=list)
    # (kind, text) for rendering: kind is "prompt" (context), "supervised" or "fill" (its label)
    pieces: list[tuple[str, str]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("pieces")
        return out


# ---- building ------------------------------------------------------------------------------------


def preview_rows(cfg, rows: int = 5, tokenizer=None) -> list[RowPreview]:
    """The first ``rows`` rows of ``cfg.data.train_path`` as the trainer builds them.

    Raises the trainer's errors (DataError / ConfigError naming file, line and field) for bad input."""
    if rows < 1:
        raise ConfigError(f"expected a positive number of rows, got {rows}", field="--rows")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    model_config = run_model_config(cfg)
    check_consistency(cfg, model_config, tokenizer)
    d = cfg.data
    eos_id = fill_token_id(tokenizer, model_config.eos_token_id)
    located = load_dataset_rows(d.train_path, split=d.split, with_lines=True)
    out = []
    for index, (line, row) in enumerate(islice(located, rows)):
        line = line if line is not None else index + 1
        ids, sup, ex = build_row_example(tokenizer, row["messages"], canvas_length=d.canvas_length,
                                         seq_length=d.seq_length, eos_id=eos_id, sample_id=index,
                                         prompt_policy=d.prompt_too_long, mask_history=d.mask_history,
                                         tools=row.get("tools"), file=d.train_path, line=line)
        out.append(_describe(tokenizer, line, ids, sup, ex, d.canvas_length, d.seq_length))
    return out


def _describe(tokenizer, line, ids, sup, ex, C: int, S: int) -> RowPreview:
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=False)  # noqa: E731 - markers stay visible
    runs = _runs(sup)
    if ex is None:  # prompt + one block does not fit (prompt_too_long: skip)
        P = runs[0][0]
        return RowPreview(line, decode(ids[:P]), "", P, 0, 0, 0, 0, False, True,
                          f"prompt of {P} tokens + one canvas block ({C}) exceeds seq_length {S}",
                          pieces=[("prompt", decode(ids[:P]))])
    seq, spans, pieces, prev = ex.input_ids, [], [], 0
    for (a, e), (start, n_blocks) in zip(runs, ex.segment_list()):
        kept = min(e - a, n_blocks * C)
        fill = n_blocks * C - kept
        spans.append(Span(start, kept, fill, n_blocks, decode(seq[start:start + kept])))
        pieces += [("prompt", decode(seq[prev:start])), ("supervised", spans[-1].text),
                   ("fill", f"\u27e8{fill} x EOS fill\u27e9" if fill else "")]
        prev = start + n_blocks * C
    reason = _truncation(runs, spans, C, S) if ex.truncated else None
    return RowPreview(line, decode(seq[:spans[0].start]), "".join(s.text for s in spans), spans[0].start,
                      sum(s.n_tokens for s in spans), sum(s.n_fill_tokens for s in spans), ex.num_blocks,
                      len(seq), ex.truncated, False, reason, spans, pieces)


def _truncation(runs, spans, C: int, S: int) -> str:
    last, (a, e) = spans[-1], runs[len(spans) - 1]
    out = []
    if last.n_tokens < e - a:
        out.append(f"reply needs {-(-(e - a) // C)} blocks ({e - a} tokens), {last.n_blocks} fit in "
                   f"seq_length {S} after {last.start} tokens: {last.n_tokens} of {e - a} tokens kept")
    if len(spans) < len(runs):
        out.append(f"{len(runs) - len(spans)} of {len(runs)} assistant turns dropped (no block fits)")
    return "; ".join(out)


# ---- rendering -----------------------------------------------------------------------------------


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _header(r: RowPreview, C: int) -> str:
    if r.skipped:
        return f"line {r.line}: SKIPPED: {r.reason}"
    turns = f", {len(r.spans)} supervised turns" if len(r.spans) > 1 else ""
    state = f"TRUNCATED: {r.reason}" if r.truncated else "ok"
    return (f"line {r.line}: prompt {r.n_prompt_tokens} tokens, supervised {r.n_supervised_tokens} "
            f"(+{r.n_fill_tokens} EOS fill), {_count(r.n_blocks, 'block')} of {C}{turns}, "
            f"{r.n_tokens} tokens: {state}")


def summary(previews: list[RowPreview], cfg) -> str:
    d = cfg.data
    kept = [r for r in previews if not r.skipped]
    text = (f"{_count(len(previews), 'row')} of {d.train_path}: {len(kept)} kept, "
            f"{sum(r.truncated for r in kept)} truncated, {len(previews) - len(kept)} skipped; "
            f"{_count(sum(r.n_supervised_tokens for r in kept), 'supervised token')} in "
            f"{_count(sum(r.n_blocks for r in kept), 'block')} (seq_length {d.seq_length}, "
            f"canvas_length {d.canvas_length}, mask_history {str(d.mask_history).lower()})")
    if d.packing and kept:
        n = len(pack_rows([r.n_tokens for r in kept], d.seq_length, None, [r.n_blocks for r in kept],
                          d.canvas_length))
        text += f"; packing on: as one micro-batch they fill {_count(n, 'row')} of <= {d.seq_length} tokens"
    return text


def render_plain(previews: list[RowPreview], cfg) -> str:
    """Text with the supervised replies between ⟦ ⟧ and the fill as ``⟨k x EOS fill⟩``."""
    out = []
    for r in previews:
        out.append(f"--- {_header(r, cfg.data.canvas_length)}")
        text = ""
        for kind, piece in r.pieces:
            if kind == "supervised":
                text += OPEN + piece + CLOSE
            else:
                text += piece
        out.append(text)
    out.append(f"--- {summary(previews, cfg)}")
    return "\n".join(out) + "\n"


def render_rich(previews: list[RowPreview], cfg, console) -> None:
    """The same view in colour: supervised text highlighted, fill dimmed, truncation / skips flagged."""
    from rich.text import Text  # rich is optional here: without it the preview prints plain text

    for r in previews:
        style = "bold red" if r.skipped else "bold yellow" if r.truncated else "bold cyan"
        console.print(Text(_header(r, cfg.data.canvas_length), style=style))
        text = Text()
        for kind, piece in r.pieces:
            if kind == "supervised":
                text.append(piece, style="black on green")
            elif kind == "fill":
                text.append(piece, style="dim green")
            else:
                text.append(piece)
        console.print(text)
    console.print(Text(summary(previews, cfg), style="bold"))


def _rich_console():
    """A rich Console on stdout when stdout is a terminal and rich is installed, else None."""
    if not sys.stdout.isatty():
        return None
    try:
        from rich.console import Console  # optional (see render_rich)
    except ImportError:
        return None
    return Console(highlight=False, soft_wrap=True)


def cli_data(argv) -> int:
    """``blockdiff data <subcommand>``: ``preview``."""
    if not argv or argv[0] != "preview":
        got = f"unknown data command {argv[0]!r}" if argv else "no data command"
        raise ConfigError(f"{got}; expected: blockdiff data preview -c FILE [--rows N] [--json]")
    p = argparse.ArgumentParser(prog="blockdiff data preview",
                                description="show the first rows of data.train_path as the trainer sees them")
    p.add_argument("-c", "--config", required=True, help="YAML config file (the one you train with)")
    p.add_argument("--rows", type=int, default=5, help="number of rows (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--plain", action="store_true", help="no colour: ⟦ ⟧ around supervised text")
    args, overrides = p.parse_known_args(argv[1:])
    cfg = load_config(args.config, overrides)
    previews = preview_rows(cfg, args.rows)
    if args.json:
        for r in previews:
            print(json.dumps(r.to_json(), ensure_ascii=False))
        return 0
    console = None if args.plain else _rich_console()
    if console is None:
        sys.stdout.write(render_plain(previews, cfg))
    else:
        render_rich(previews, cfg, console)
    return 0
