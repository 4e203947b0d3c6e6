"""GPU scale-out checks for the lead to run on the device (NCCL). Two sub-commands:

  # equivalence: 1-GPU reference vs N GPUs, same global batch (prints max rel diff per case, JSON)
  python benchmarks/scaling.py equivalence --nproc 2 4

  # weak scaling at real layer shapes, reduced depth (per-GPU micro-batch fixed, global = mb x N)
  torchrun --nproc-per-node=N benchmarks/scaling.py throughput --layers 2 --ep N --steps 10 --micro-batch 8
  # --profile: torch-profiler tables of the last two steps on every rank (and benchmarks/trace_breakdown.py
  # of their traces); --tiny: CPU smoke run (gloo)

``throughput`` trains through ``blockdiff.train.loop.train`` (the production loop: FSDP2 + EP + AC) on
synthetic data and prints one JSON line on rank 0: tokens/s per GPU, median step time, peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def equivalence(args) -> None:
    import torch
    from safetensors.torch import load_file

    from blockdiff.data.synthetic import write_splits

    tmp = Path(tempfile.mkdtemp(prefix="blockdiff-eq-"))
    data = str(write_splits(tmp / "data", 40, 8, seed=0)[0])
    common = ["--data.train_path", data, "--model.num_layers", "2", "--train.global_batch_size", "4",
              "--train.micro_batch_size", "1", "--objective.self_conditioning_prob", "1.0",
              "--model.dtype", "float32", "--model.attn_backend", args.attn]
    results = {}

    def run(n, ep):
        out = tmp / f"g{n}_{ep}.st"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               str(ROOT / "tests" / "dist_worker.py"), "grads", str(out), *common,
               "--train.output_dir", str(tmp / f"run{n}_{ep}"), "--parallel.ep", str(ep)]
        subprocess.run(cmd, cwd=ROOT, timeout=900)
        return load_file(str(out))

    ref = run(1, 1)
    for n in args.nproc:
        for ep in sorted({1, n}):
            got = run(n, ep)
            worst = max(float((got[k] - ref[k]).abs().max() / (ref[k].abs().max() + 1e-12)) for k in ref)
            results[f"n{n}_ep{ep}"] = {"max_rel_diff": worst, "loss": got["sums"].tolist(),
                                       "ref_loss": ref["sums"].tolist()}
    results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps(results, indent=1))


def throughput(args) -> None:
    import torch

    from blockdiff.config.schema import demo_config_path, load_config
    from blockdiff.data.synthetic import write_splits
    from blockdiff.train.metrics import read_metrics
    from blockdiff.model.config import REAL_SHAPES, hf_config_dict
    from blockdiff.train.loop import train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    base = Path(args.workdir)
    data = base / "data" / "train.jsonl"
    if rank == 0 and not data.exists():
        write_splits(base / "data", 2000, 8, seed=0)
    out = base / f"run_w{world}_ep{args.ep}_{os.environ.get('TORCHELASTIC_RUN_ID', 'x')}"
    if world > 1:
        import torch.distributed as dist

        from blockdiff.parallel.distributed import init_distributed

        init_distributed()  # as train() would: the GPU is bound before NCCL starts (no device-id guessing)
        dist.barrier()
    shapes = dict(REAL_SHAPES)
    canvas = shapes.pop("canvas_length")
    mc = hf_config_dict(**shapes, canvas_length=canvas, num_hidden_layers=args.layers)
    mb = args.micro_batch
    cfg = load_config(demo_config_path(), [
        "--data.train_path", str(data), "--data.seq_length", str(args.seq_length),
        *([] if args.tiny else ["--data.canvas_length", str(canvas)]), "--train.output_dir", str(out), "--train.max_steps", str(args.steps),
        "--train.micro_batch_size", str(mb), "--train.global_batch_size", str(mb * world * args.accumulate),
        "--train.log_every", "1", "--parallel.ep", str(args.ep), "--parallel.activation_checkpointing",
        str(args.ac).lower(), "--model.dtype", args.dtype, "--checkpoint.every_steps", "0",
        "--checkpoint.save_final", "false", "--checkpoint.export_final", "false", "--logging.progress", "false", "--logging.tensorboard", "false",
        "--objective.self_conditioning_prob", "1.0", "--scheduler.warmup_steps", "0",
        "--scheduler.decay_steps", "1000", "--train.resume", "never",
        # --profile: the last two steps run under the torch profiler (excluded from the medians)
        "--logging.profile_at", str(args.steps - 1 if args.profile else 0),
        "--logging.profile_host_ops", str(not args.profile_device_only).lower(),
        "--parallel.compile", str(args.compile).lower(),
        "--parallel.reshard_after_forward", str(args.reshard_after_forward).lower()])
    if not args.tiny:  # --tiny: the demo's own small model (a CPU smoke run of this script)
        cfg.model.from_config = mc
    if args.routing == "balanced":
        balanced_routing()
    loads = record_expert_loads() if args.expert_load else None
    train(cfg)
    if loads is not None:
        (out / f"expert_load_rank{rank}.json").write_text(json.dumps(loads))
    if world > 1:
        dist.barrier()  # every rank's profile (and expert-load) files are written
    if rank == 0:
        rows = [r for r in read_metrics(out) if "tokens_per_s" in r][args.warmup:]
        rows = rows[:-2] if args.profile else rows
        step = statistics.median(r["step_time_s"] for r in rows)
        tps = statistics.median(r["tokens_per_s"] for r in rows)
        print(json.dumps({
            "world_size": world, "ep": args.ep, "layers": "demo" if args.tiny else args.layers, "micro_batch_per_gpu": mb,
            "accumulate": args.accumulate, "losses": [round(r["loss"], 5) for r in read_metrics(out) if "loss" in r],
            "seq_length": args.seq_length, "dtype": args.dtype, "activation_checkpointing": args.ac, "compile": args.compile,
            "reshard_after_forward": args.reshard_after_forward, "routing": args.routing,
            "tokens_per_s_per_gpu": tps / world, "tokens_per_s": tps, "step_time_s": step,
            "step_times_s": [round(r["step_time_s"], 4) for r in rows],
            "peak_mem_gib": max(r["peak_mem_gib"] for r in rows),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "final_loss": rows[-1]["loss"] if rows else None,
            "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries") if torch.cuda.is_available() else None,
            **({"expert_load": expert_load_summary(out, world)} if args.expert_load else {})}))
        if args.profile:  # every rank wrote <run>/profile/rank<R>.json; print them and rank 0's top ops
            for r in range(world):
                print(json.dumps({"profile": json.loads((out / "profile" / f"rank{r}.json").read_text())}))
            print("\n".join((out / "profile" / "rank0.txt").read_text().splitlines()[:32]))
            from trace_breakdown import breakdown  # same folder

            print(json.dumps({"trace_breakdown": breakdown(out / "profile", steps=2)}, default=str))
    sys.stdout.flush()
    os._exit(0)


def balanced_routing() -> None:
    """--routing balanced: every token picks top_k experts uniformly at random (global RNG, so activation
    checkpointing's recomputation draws the same), weighted by the router's renormalised probabilities of
    those experts. The router's own work still runs. A random-init router sends most tokens to a few
    experts (``--expert-load``), which a trained router with its load balancing does not; this bounds the
    other side."""
    import torch

    from blockdiff.model.moe import Router

    def forward(self, x):
        h = self.norm(x) * self.scale * self.root_size
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        index = torch.rand(probs.shape, device=probs.device).topk(self.top_k, dim=-1).indices
        weights = probs.gather(-1, index)
        return weights / weights.sum(-1, keepdim=True) * self.per_expert_scale[index], index

    Router.forward = forward


def record_expert_loads() -> list[int]:
    """Rows each expert-parallel call hands to this rank's experts (recomputations included: they run the
    experts again), appended to the returned list as the run goes."""
    from blockdiff.parallel.experts import ExpertDispatcher

    loads, dispatch = [], ExpertDispatcher.dispatch

    def counting(self, rows, counts, *ticket):
        local_rows, local_counts, ctx = dispatch(self, rows, counts, *ticket)
        loads.append(int(local_rows.shape[0]))
        return local_rows, local_counts, ctx

    ExpertDispatcher.dispatch = counting
    return loads


def expert_load_summary(out: Path, world: int) -> dict:
    """Per call, the most loaded rank's rows over the mean: the expert GEMMs of a call end when the most
    loaded rank's do, so this is the slowdown of the expert compute against a perfectly balanced split."""
    per_rank = [json.loads((out / f"expert_load_rank{r}.json").read_text()) for r in range(world)]
    ratios = [max(call) / (sum(call) / world) for call in zip(*per_rank) if sum(call)]
    if not ratios:
        return {}
    return {"calls": len(ratios), "max_over_mean_median": statistics.median(ratios),
            "max_over_mean_mean": statistics.fmean(ratios), "max_over_mean_worst": max(ratios),
            "rows_per_call_mean": statistics.fmean(sum(c) / world for c in zip(*per_rank))}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("equivalence")
    e.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    e.add_argument("--attn", default="sdpa", choices=["sdpa", "flex", "auto"],
                   help="attention backend of the tiny model (sdpa: no flex compile in each of the 5 launches; "
                        "flex vs sdpa is checked by benchmarks/gpu_checks.py)")
    t = sub.add_parser("throughput")
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--ep", type=int, default=1)
    t.add_argument("--steps", type=int, default=8)
    t.add_argument("--warmup", type=int, default=3, help="steps excluded from the medians")
    t.add_argument("--micro-batch", type=int, default=2)
    t.add_argument("--accumulate", type=int, default=1,
                   help="micro-batches per GPU per step (global batch = micro-batch x GPUs x accumulate): "
                        "1 GPU with --accumulate N sees the global batch of N GPUs")
    t.add_argument("--seq-length", type=int, default=1024)
    t.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    t.add_argument("--ac", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--workdir", default="/tmp/blockdiff-scaling")
    t.add_argument("--profile", action="store_true", help="profile the last two steps on every rank")
    t.add_argument("--profile-device-only", action="store_true",
                   help="with --profile: GPU kernels only, no host ops (logging.profile_host_ops false)")
    t.add_argument("--routing", default="model", choices=["model", "balanced"],
                   help="model: the random-init router's choices; balanced: uniformly random experts per token")
    t.add_argument("--expert-load", action="store_true",
                   help="record the rows each rank's experts get per expert-parallel call (ep > 1)")
    t.add_argument("--compile", action="store_true", help="parallel.compile: torch.compile per layer")
    t.add_argument("--reshard-after-forward", action=argparse.BooleanOptionalAction, default=True,
                   help="parallel.reshard_after_forward")
    t.add_argument("--tiny", action="store_true", help="the demo's small model instead of the real shapes")
    args = ap.parse_args()
    equivalence(args) if args.cmd == "equivalence" else throughput(args)


if __name__ == "__main__":
    main()
