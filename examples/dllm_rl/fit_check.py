"""Does RL learn what it is rewarded for? GRPO on a handful of fixed prompts (every step samples the same
prompts again), then greedy exact match on those prompts before and after, and the rollout accuracy per step.

A check of the whole loop (sampler, rewards, advantages, the ELBO estimator, the update) apart from
generalisation: on prompts it trains on, the policy should become right more often.

    python examples/dllm_rl/fit_check.py --sft-export runs/demo/run/export --data runs/demo/data/train.jsonl \\
        --out runs/rl_fit --prompts 16 -- --optimizer.lr 3e-4 --rl.kl_beta 0 --train.max_steps 30
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from blockdiff.config.schema import load_config
from blockdiff.data.jsonl import read_chat_jsonl
from blockdiff.rl.demo import demo_rl_config_path, exact_match_per_prompt
from blockdiff.rl.loop import rl_train
from blockdiff.train.metrics import read_metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft-export", required=True)
    p.add_argument("--data", required=True, help="chat JSONL; its first --prompts rows are the prompts")
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("overrides", nargs="*", help="overrides of the demo RL config (after --)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "prompts.jsonl"
    rows_path.write_text("".join(Path(args.data).read_text().splitlines(keepends=True)[:args.prompts]))
    cfg = load_config(demo_rl_config_path(), ["--model.name_or_path", args.sft_export, "--data.train_path",
                                              str(rows_path), "--train.output_dir", str(out / "rl"),
                                              "--rl.prompts_per_step", str(args.prompts), *args.overrides])
    run_dir = rl_train(cfg)
    rows = read_chat_jsonl(rows_path)
    before = exact_match_per_prompt(Path(args.sft_export), rows, 0, out / "greedy_sft.jsonl")[0]
    after = exact_match_per_prompt(run_dir / "export", rows, 0, out / "greedy_rl.jsonl")[0]
    curve = [round(r["accuracy"], 3) for r in read_metrics(run_dir) if "accuracy" in r]
    report = {"prompts": len(rows), "greedy_correct_sft": sum(before), "greedy_correct_rl": sum(after),
              "rollout_accuracy_per_step": curve, "overrides": args.overrides}
    (out / "fit_report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
