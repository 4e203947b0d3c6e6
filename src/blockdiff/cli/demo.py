"""The embedded CPU demo: synthetic GSM8K-style data -> train a tiny DiffusionGemma -> plot -> export
-> held-out exact-match accuracy with the sampler. Nothing is downloaded."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from transformers import AutoTokenizer

from blockdiff.config.schema import demo_config_path, load_config
from blockdiff.data.jsonl import read_chat_jsonl
from blockdiff.data.synthetic import trivial_baseline_accuracy, write_splits
from blockdiff.infer.evaluate import evaluate_gsm8k
from blockdiff.infer.settings import SamplerSettings
from blockdiff.model.diffusion_gemma import DiffusionGemma
from blockdiff.train.loop import train
from blockdiff.train.metrics import plot_run, read_metrics


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="blockdiff demo")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo config's)")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--level", default="easy", choices=["easy", "standard"],
                   help="synthetic problem difficulty (easy: operands small enough for the tiny model)")
    p.add_argument("--rl", action="store_true", help="GRPO on the SFT demo's export (run first if missing)")
    p.add_argument("--sft-export", default=None, help="--rl: the SFT export to start from (default OUT/run/export)")
    p.add_argument("--eval-samples", type=int, default=8,
                   help="--rl: sampler draws per held-out prompt, before and after (default 8)")
    args, overrides = p.parse_known_args(argv)
    if args.rl:
        from blockdiff.rl.demo import run_demo_rl

        steps = ["--train.max_steps", str(args.steps)] if args.steps is not None else []
        return run_demo_rl(Path(args.out), args.sft_export, steps + list(overrides), seed=args.seed,
                           n_train=args.n_train, n_test=args.n_test, level=args.level,
                           eval_samples=args.eval_samples)

    out = Path(args.out)
    train_path, test_path = write_splits(out / "data", args.n_train, args.n_test, seed=args.seed,
                                        level=args.level)
    ov = ["--data.train_path", str(train_path), "--train.output_dir", str(out / "run"),
          "--data.eval_path", str(test_path), "--eval.loss_every", "50"]  # the validation curve in loss.png
    if args.steps is not None:
        ov += ["--train.max_steps", str(args.steps)]
    cfg = load_config(demo_config_path(), ov + list(overrides))

    t0 = time.perf_counter()
    run_dir = train(cfg)
    train_s = time.perf_counter() - t0
    plots = plot_run(run_dir)

    export_dir = Path(cfg.checkpoint.export_dir or run_dir / "export")
    model = DiffusionGemma.from_pretrained(str(export_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    test_rows = read_chat_jsonl(test_path)
    # Two sampler settings: the checkpoint's reference generation_config (temperature 0.8 -> 0.4), and a
    # low temperature (0.1 -> 0.05), which suits a model this small better.
    reference = SamplerSettings.from_generation_config(export_dir, seed=args.seed, max_new_tokens=cfg.data.canvas_length)
    low_temp = SamplerSettings.from_generation_config(export_dir, seed=args.seed, max_new_tokens=cfg.data.canvas_length,
                                                      t_max=0.1, t_min=0.05)
    t1 = time.perf_counter()
    results = {}
    for name, settings in (("low_temperature", low_temp), ("reference", reference)):
        results[name] = evaluate_gsm8k(model, tokenizer, test_rows, settings, batch_size=100,
                                       out_jsonl=run_dir / f"eval_heldout_{name}.jsonl")
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    first, last = rows[0], rows[-1]
    tail = rows[-max(1, len(rows) // 10):]
    report = {
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.perf_counter() - t1, 1),
        "steps": last["step"],
        "loss_first": round(first["loss"], 3),
        "loss_last_10pct_mean": round(sum(r["loss"] for r in tail) / len(tail), 3),
        "diffusion_loss_first": round(first["diffusion_loss"], 3),
        "diffusion_loss_last_10pct_mean": round(sum(r["diffusion_loss"] for r in tail) / len(tail), 3),
        "heldout_accuracy": results["low_temperature"]["accuracy"],
        "heldout_ci95": [round(x, 3) for x in results["low_temperature"]["ci95"]],
        "heldout_accuracy_reference_sampler": results["reference"]["accuracy"],
        "heldout_ci95_reference_sampler": [round(x, 3) for x in results["reference"]["ci95"]],
        "heldout_n": results["reference"]["n"],
        "trivial_baseline_accuracy": trivial_baseline_accuracy(test_rows),
        "export_dir": str(export_dir),
        "plots": [str(p) for p in plots],
    }
    (out / "demo_report.json").write_text(json.dumps(report, indent=1))
    print("\n=== blockdiff demo ===")
    print(f"trained {report['steps']} steps in {report['train_seconds']} s on CPU")
    print(f"loss {report['loss_first']} -> {report['loss_last_10pct_mean']} (mean of last 10% of steps); "
          f"diffusion loss {report['diffusion_loss_first']} -> {report['diffusion_loss_last_10pct_mean']}")
    print(f"held-out exact match (n={report['heldout_n']}): {report['heldout_accuracy']:.3f} at temperature "
          f"0.1->0.05 (95% CI {report['heldout_ci95']}), {report['heldout_accuracy_reference_sampler']:.3f} with the "
          f"reference sampler settings (95% CI {report['heldout_ci95_reference_sampler']}); trivial baseline "
          f"(always the most common answer) {report['trivial_baseline_accuracy']:.3f}")
    print(f"plots: {', '.join(report['plots'])}\nexport: {export_dir}  report: {out / 'demo_report.json'}")
    return report
