"""Choose RL settings on the demo's dev split: one ``run_demo_rl(..., evaluate="dev")`` per setting, several in
parallel on CPU, then a table of dev accuracy before and after with the paired standard error.

The dev split is the last ``--n-dev`` rows of the SFT demo's training prompts, which RL never reads; the
held-out test split is not touched, so it can be scored once for the setting chosen here.

    python examples/dllm_rl/sweep_dev.py --sft-export runs/demo/run/export --out runs/rl_sweep \\
        --settings examples/dllm_rl/sweep_settings.yaml --jobs 8 --threads 2

``--settings``: a YAML mapping of a setting's name to its overrides of the demo RL config, e.g.
``lr1e-4: [--optimizer.lr, "1e-4"]``.

``--curve 12,48,144``: each setting's run is scored on dev after each of these step counts (the run resumes
from its checkpoint to the next count), giving dev accuracy along one trajectory. ``--device cuda``: RL and the
scoring on the GPU (several runs share it); default: CPU, as the demo.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml


def _one(args) -> None:
    """Child process: one setting (``--child NAME``)."""
    import torch

    torch.set_num_threads(args.threads)
    from blockdiff.rl.demo import run_demo_rl

    overrides = [str(o) for o in yaml.safe_load(Path(args.settings).read_text())[args.child]]
    out = Path(args.out) / args.child
    sft_scores = json.loads((Path(args.out) / SFT_SCORES).read_text())
    for steps in _curve(args):
        extra = ["--train.max_steps", str(steps)] if steps else []
        report = run_demo_rl(out, Path(args.sft_export), overrides + extra, seed=SEED, n_dev=args.n_dev,
                             evaluate="dev", eval_device=args.device, eval_samples=args.eval_samples,
                             sft_scores=sft_scores)
        if steps:
            (out / f"demo_rl_report_dev_{steps}.json").write_text(json.dumps(report, indent=1))


SFT_SCORES = "sft_dev_scores.json"  # the shared starting point's dev draws, scored once for every setting
SEED = 0  # the demo's data and scoring seed: the shared scores and every setting's run use the same one


def _score_sft(args) -> None:
    import torch

    from blockdiff.data.jsonl import read_chat_jsonl
    from blockdiff.rl.demo import exact_match_per_prompt, prepare_splits

    torch.set_num_threads(args.jobs * args.threads)
    shared = Path(args.out) / "sft"
    _, dev_path, _ = prepare_splits(shared, Path(args.sft_export), seed=SEED, n_dev=args.n_dev)
    draws = exact_match_per_prompt(Path(args.sft_export), read_chat_jsonl(dev_path), SEED,
                                   shared / "eval_dev_sft.jsonl", args.device, args.eval_samples)
    (Path(args.out) / SFT_SCORES).write_text(json.dumps(draws))


def _curve(args) -> list[int | None]:
    return [int(s) for s in args.curve.split(",")] if args.curve else [None]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft-export", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--settings", required=True)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-dev", type=int, default=500)
    p.add_argument("--curve", help="comma-separated step counts to score dev after, along one run per setting")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--eval-samples", type=int, default=8, help="sampler draws per dev prompt (default 8)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--score-sft", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.score_sft:
        return _score_sft(args)
    if args.child:
        return _one(args)
    names = list(yaml.safe_load(Path(args.settings).read_text()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # this folder on the path: settings may name its example rewards ("grounded_reward:grounded")
    path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": path}
    if args.device == "cpu":  # the GPU hidden, so RL runs where the scoring does
        env["CUDA_VISIBLE_DEVICES"] = ""
    if not (out / SFT_SCORES).exists():
        subprocess.run([sys.executable, __file__, "--score-sft", *sys.argv[1:]], env=env, check=True)
    pending, running, t0 = list(names), {}, time.time()
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            log = open(out / f"{name}.log", "w")
            cmd = [sys.executable, __file__, "--child", name, *sys.argv[1:]]
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[name]
                print(f"{name}: exit {proc.returncode} at {time.time() - t0:.0f} s", flush=True)
        time.sleep(1)
    rows = []
    for name in names:
        for steps in _curve(args):
            label = f"{name} @{steps}" if steps else name
            report = out / name / (f"demo_rl_report_dev_{steps}.json" if steps else "demo_rl_report_dev.json")
            if report.exists():
                r = json.loads(report.read_text())
                rows.append({"setting": label, **{k: r[k] for k in ("n", "sft_accuracy", "rl_accuracy", "difference",
                                                                   "paired_se", "difference_in_se", "rl_seconds")}})
            else:
                rows.append({"setting": label, "error": f"no report (see {out / name}.log)"})
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    print("| setting | dev SFT -> RL | difference (paired SE) | RL s |\n|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['setting']} | {r['error']} | | |")
        else:
            print(f"| {r['setting']} | {r['sft_accuracy']:.3f} -> {r['rl_accuracy']:.3f} | {r['difference']:+.3f} "
                  f"({r['paired_se']:.3f}) | {r['rl_seconds']} |")


if __name__ == "__main__":
    main()
