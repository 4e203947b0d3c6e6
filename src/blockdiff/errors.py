"""Shared exception types.

Every error that points at user input says *where*: ``file:line: field 'x': message``.
Absent parts are omitted, so ``DataError("bad")`` is just ``"bad"``.
"""

from __future__ import annotations

import os


def format_location(msg: str, file=None, line=None, field=None) -> str:
    """Prefix ``msg`` with ``file:line: field 'name': `` (only the parts that are given)."""
    prefix = ""
    if file is not None:
        prefix = os.fspath(file) if isinstance(file, os.PathLike) else str(file)
        if line is not None:
            prefix += f":{line}"
        prefix += ": "
    elif line is not None:
        prefix = f"line {line}: "
    if field is not None:
        prefix += f"field '{field}': "
    return prefix + msg


class BlockdiffError(Exception):
    """Base class of every error blockdiff raises on purpose.

    Carries an optional location (file, 1-based line, field) that is folded into the message.
    """

    def __init__(self, msg: str, file=None, line=None, field=None):
        self.msg = msg
        self.file = file
        self.line = line
        self.field = field
        super().__init__(format_location(msg, file=file, line=line, field=field))

    def with_location(self, file=None, line=None, field=None) -> "BlockdiffError":
        """A copy of this error with missing location parts filled in (existing parts win)."""
        return type(self)(
            self.msg,
            file=self.file if self.file is not None else file,
            line=self.line if self.line is not None else line,
            field=self.field if self.field is not None else field,
        )


class DataError(BlockdiffError):
    """Bad training/eval data: malformed JSONL, wrong chat structure, unusable tokenizer template."""


class ConfigError(BlockdiffError):
    """Bad configuration value (YAML key, CLI flag)."""


class CheckpointError(BlockdiffError):
    """Missing, incomplete or incompatible checkpoint."""
