"""Chat JSONL reading with validation that says exactly where the data is wrong.

Format (OpenAI ``messages``), one JSON object per line::

    {"messages": [{"role": "system", "content": "..."},      # optional, first only
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

Rules: an optional system message first; then user/assistant alternate starting with user; the
last turn is a non-empty assistant reply (the supervised one). Blank lines are skipped. Every
violation raises ``DataError(msg, file=..., line=..., field=...)`` with a 1-based line number.
Validated rows are normalised to ``{"messages": [{"role": r, "content": c}, ...]}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from blockdiff.errors import DataError

ROLES = ("system", "user", "assistant")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def validate_row(obj: Any, file=None, line=None) -> dict:
    """Validate one decoded row; return it normalised or raise DataError naming file/line/field."""

    def fail(msg: str, field: str | None) -> DataError:
        return DataError(msg, file=file, line=line, field=field)

    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object with a 'messages' list, got {_type_name(obj)}", None)
    if "messages" not in obj:
        raise fail("missing; expected a list of {role, content} objects", "messages")
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise fail(f"expected a list of {{role, content}} objects, got {_type_name(messages)}", "messages")
    if not messages:
        raise fail("empty list; expected at least a user and an assistant turn", "messages")

    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise fail(f"expected an object with 'role' and 'content', got {_type_name(msg)}", where)
        role = msg.get("role")
        if role not in ROLES:
            raise fail(f"expected one of {', '.join(repr(r) for r in ROLES)}, got {role!r}", f"{where}.role")
        if "content" not in msg:
            raise fail("missing; expected a string", f"{where}.content")
        content = msg["content"]
        if not isinstance(content, str):
            raise fail(f"expected a string, got {_type_name(content)}", f"{where}.content")
        out.append({"role": role, "content": content})

    # Order: [system] user assistant user assistant ... ; checked after types so the field
    # reported is the first one out of place.
    start = 1 if out[0]["role"] == "system" else 0
    for i, msg in enumerate(out):
        if i < start:
            continue
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if msg["role"] == "system":
            raise fail(f"'system' is only allowed as the first message; expected {expected!r}",
                       f"messages[{i}].role")
        if msg["role"] != expected:
            raise fail(f"wrong turn order: expected {expected!r} (user and assistant alternate, "
                       f"starting with user), got {msg['role']!r}", f"messages[{i}].role")
    last = len(out) - 1
    if not any(m["role"] == "assistant" for m in out):
        raise fail("no assistant turn; expected the conversation to end with an assistant reply", "messages")
    if out[last]["role"] != "assistant":
        raise fail(f"last turn must be 'assistant' (the supervised reply), got {out[last]['role']!r}",
                   f"messages[{last}].role")
    if not out[last]["content"].strip():
        raise fail("empty assistant reply; expected non-empty text", f"messages[{last}].content")
    return {"messages": out}


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
