"""The real load path at full depth: a random-init checkpoint at the released shapes, written by transformers.

    python benchmarks/real_load.py write --out /tmp/dg30 [--layers 30] [--rows 64]

writes ``--out``: a ``DiffusionGemmaForBlockDiffusion`` at the released text shapes (``REAL_SHAPES``, 30 layers
by default) saved by transformers in bf16 like the released checkpoint (~50 GB), the shipped tiny tokenizer's
files (so the directory is self-contained) and ``train.jsonl``: chat rows long enough that every row fills
``prompt ~ 700 + canvas 256`` tokens, so measured activation memory is comparable with ``blockdiff plan``'s
estimate at the config's sequence length. Then ``blockdiff plan`` and ``blockdiff train`` run on that
directory (docs/performance.md has the exact commands).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch


def write_checkpoint(out: Path, layers: int) -> None:
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from blockdiff.model.config import REAL_SHAPES, hf_config_dict

    cfg = DiffusionGemmaConfig(**hf_config_dict(**{**REAL_SHAPES, "num_hidden_layers": layers}))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.perf_counter()
    with torch.device(device):
        model = DiffusionGemmaForBlockDiffusion._from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, max_shard_size="5GB")
    del model
    print(json.dumps({"written": str(out), "params": n, "layers": layers, "seconds": time.perf_counter() - t}))


def write_data(out: Path, rows: int, prompt_words: int, reply_words: int, seed: int = 0) -> None:
    from blockdiff.data.synthetic import vocabulary_words

    words = sorted(vocabulary_words())
    rng = random.Random(seed)
    with open(out / "train.jsonl", "w") as f:
        for _ in range(rows):
            q = " ".join(rng.choice(words) for _ in range(prompt_words))
            a = " ".join(rng.choice(words) for _ in range(reply_words)) + "\n#### 42"
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--out", required=True)
    w.add_argument("--layers", type=int, default=30)
    w.add_argument("--rows", type=int, default=64)
    w.add_argument("--prompt-words", type=int, default=690)
    w.add_argument("--reply-words", type=int, default=240)
    args = p.parse_args(argv)
    from blockdiff.data import tiny_tokenizer_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_checkpoint(out, args.layers)
    for f in tiny_tokenizer_path().iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    write_data(out, args.rows, args.prompt_words, args.reply_words)


if __name__ == "__main__":
    main()
