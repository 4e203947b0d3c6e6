"""Chat JSONL reading with validation that says exactly where the data is wrong.

One JSON object per line: ``{"messages": [...], "tools": [...]}`` (OpenAI chat format: system or developer
first, user / assistant turns, assistant ``tool_calls`` answered by ``tool`` turns, optional
``reasoning_content``; ``messages.validate_row`` has the rules). Blank lines are skipped. Every violation
raises ``DataError(msg, file=..., line=..., field=...)`` with a 1-based line number, before any training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from blockdiff.data.messages import validate_row
from blockdiff.errors import DataError

__all__ = ["iter_chat_jsonl", "load_dataset_rows", "read_chat_jsonl", "validate_row"]


def iter_chat_jsonl(path, with_lines: bool = False) -> Iterator:
    """Yield validated rows of a local chat JSONL file (``(line, row)`` if ``with_lines``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found" if not path.exists() else "not a regular file", file=path)
    with open(path, "rb") as f:  # bytes: decode per line so a bad byte gets its line number
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"invalid UTF-8 at byte {e.start} of the line; expected UTF-8 text",
                                file=path, line=lineno) from None
            if not text.strip():
                continue
            if lineno == 1 and text.startswith("\ufeff"):  # tolerate a UTF-8 byte-order mark
                text = text[1:]
            try:
                obj = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as e:
                detail = e.msg if isinstance(e, json.JSONDecodeError) else "nesting too deep"
                col = f" at column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
                raise DataError(f"malformed JSON: {detail}{col}; expected one JSON object per line",
                                file=path, line=lineno) from None
            row = validate_row(obj, file=path, line=lineno)
            yield (lineno, row) if with_lines else row


def read_chat_jsonl(path) -> list[dict]:
    """All validated rows of a local chat JSONL file."""
    return list(iter_chat_jsonl(path))


def _is_saved_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("dataset_dict.json", "state.json"))


def load_dataset_rows(source, split: str = "train", with_lines: bool = False) -> Iterator:
    """Validated chat rows from a local ``.jsonl`` file, a directory holding ``{split}.jsonl``,
    a ``datasets.save_to_disk`` directory, or a hub dataset name (needs ``datasets``).

    With ``with_lines`` yields ``(line, row)``; for ``datasets`` sources line = 1-based row index.
    """
    path = Path(os.fspath(source))
    if path.suffix == ".jsonl" or path.is_file():
        yield from iter_chat_jsonl(path, with_lines=with_lines)
        return
    if path.is_dir() and (path / f"{split}.jsonl").is_file():
        yield from iter_chat_jsonl(path / f"{split}.jsonl", with_lines=with_lines)
        return
    try:
        import datasets  # lazy: optional dependency (pip install 'blockdiff[data]')
    except ImportError:
        raise DataError("reading a datasets directory or hub dataset needs the 'datasets' package "
                        "(pip install datasets); or pass a local .jsonl file", file=source) from None
    if _is_saved_dataset_dir(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"split {split!r} not found; available: {sorted(ds)}", file=source)
            ds = ds[split]
    else:
        ds = datasets.load_dataset(str(source), split=split)
    for index, obj in enumerate(ds, start=1):
        row = validate_row(obj, file=source, line=index)
        yield (index, row) if with_lines else row
