"""Durability helpers shared by training checkpoints and model exports."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path) -> None:
    """fsync a file or a directory (a directory's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file directly in ``root``, then ``root`` itself."""
    for p in Path(root).iterdir():
        if p.is_file():
            fsync_path(p)
    fsync_path(root)
