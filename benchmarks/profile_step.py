"""Torch-profiler summary of one blockdiff recipe step (real shapes, reduced depth) on one GPU.

Prints the top CUDA-time ops and a per-pass wall breakdown; writes the table to --out.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from blockdiff.train.bench import blockdiff_step_fn, make_batch
from blockdiff.model.config import REAL_SHAPES, hf_config_dict


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--response", type=int, default=256)
    p.add_argument("--attn", default="auto")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile per layer (the bench's blockdiff:compile)")
    p.add_argument("--rows", type=int, default=35)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    hf_cfg = hf_config_dict(**{**REAL_SHAPES, "num_hidden_layers": args.layers})
    batch = make_batch(args.batch, args.prompt, args.response, 256, 262144, dev)
    model, step = blockdiff_step_fn(hf_cfg, batch, args, dev, compile=args.compile)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    step()
    torch.cuda.synchronize()
    print(f"step {time.perf_counter() - t:.3f} s", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("step"):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60)
    print(table)
    cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60)
    print(cpu)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n\n" + cpu)


if __name__ == "__main__":
    main()
