"""Convert GSM8K to chat JSONL for DiffusionGemma SFT.

    python examples/dllm_sft/prep_gsm8k.py                      # -> gsm8k_chat_train.jsonl + gsm8k_chat_test.jsonl
    python examples/dllm_sft/prep_gsm8k.py --split test         # -> gsm8k_chat_test.jsonl only
    python examples/dllm_sft/prep_gsm8k.py --dataset /path/to/saved_gsm8k --output out.jsonl

Each line is ``{"messages":[{"role":"user","content":Q},{"role":"assistant","content":A}]}``
with the answer verbatim (worked solution ending in ``#### N``). ``--dataset`` is a hub name
or a local path (a ``save_to_disk`` directory or anything ``datasets.load_dataset`` reads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Iterator

try:
    from blockdiff.errors import DataError
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
    from blockdiff.errors import DataError


def convert(rows: Iterable[dict], source: str | None = None) -> Iterator[dict]:
    """GSM8K rows ``{"question", "answer"}`` -> chat rows; DataError names the bad row/field."""
    for index, row in enumerate(rows, start=1):
        for key in ("question", "answer"):
            value = row.get(key) if isinstance(row, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"expected a non-empty string, got {type(value).__name__}",
                                file=source, line=index, field=key)
        yield {"messages": [{"role": "user", "content": row["question"]},
                            {"role": "assistant", "content": row["answer"]}]}


def load_rows(dataset: str, config: str | None, split: str):
    try:
        import datasets
    except ImportError:
        raise SystemExit("prep_gsm8k needs the 'datasets' package: pip install datasets") from None
    if os.path.isdir(dataset) and any(
            os.path.exists(os.path.join(dataset, n)) for n in ("dataset_dict.json", "state.json")):
        ds = datasets.load_from_disk(dataset)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        return ds
    return datasets.load_dataset(dataset, config, split=split)


def write_jsonl(rows: Iterable[dict], output: str) -> int:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    n = 0
    tmp = output + ".tmp"  # write then rename: a failed conversion leaves no half-written file
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=["train", "test", "all"], default=None,
                        help="default: all (train and test: the example YAMLs validate on the test split), "
                             "train with --output")
    parser.add_argument("--output", default=None, help="default: gsm8k_chat_{split}.jsonl (one split only)")
    parser.add_argument("--dataset", default="openai/gsm8k", help="hub name or local path")
    parser.add_argument("--config", default="main", help="dataset config (hub datasets only)")
    args = parser.parse_args(argv)
    split = args.split or ("train" if args.output else "all")
    if split == "all" and args.output:
        parser.error("--output names one file: give --split train or --split test with it")
    for name in (["train", "test"] if split == "all" else [split]):
        output = args.output or f"gsm8k_chat_{name}.jsonl"
        rows = load_rows(args.dataset, args.config, name)
        try:
            n = write_jsonl(convert(rows, source=args.dataset), output)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"wrote {n} rows to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
