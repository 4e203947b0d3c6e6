"""Data pipeline: chat JSONL -> tokenized conversations -> canvas batches."""

from __future__ import annotations

from pathlib import Path


def tiny_tokenizer_path() -> Path:
    """Directory of the tiny tokenizer shipped with the package (CPU demo and tests)."""
    return Path(__file__).with_name("tokenizer")


def load_tiny_tokenizer():
    """The shipped tiny tokenizer as a transformers fast tokenizer (a fresh instance)."""
    from transformers import AutoTokenizer  # lazy: keeps `import blockdiff.data` cheap

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_path()))
