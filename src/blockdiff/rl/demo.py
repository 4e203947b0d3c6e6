"""``blockdiff demo --rl``: GRPO on the SFT demo's export (CPU, a few minutes), then held-out exact match before
and after on prompts RL never saw, with the paired standard error of the difference."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from blockdiff.config.schema import load_config


def demo_rl_config_path() -> str:
    from blockdiff.config.schema import demo_config_path

    return os.path.join(os.path.dirname(demo_config_path()), "demo_rl.yaml")


def paired_se(before: list[bool], after: list[bool]) -> float:
    """Standard error of mean(after - before) over the same prompts (sample std of the differences / sqrt n)."""
    d = [float(a) - float(b) for a, b in zip(after, before)]
    n = len(d)
    if n < 2:
        return float("nan")
    mean = sum(d) / n
    return math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)


def held_out_correct(model_dir: Path, rows: list[dict], seed: int, out_jsonl: Path) -> list[bool]:
    """Per-row exact match of the export at ``model_dir`` with the SFT demo's low-temperature sampler."""
    from transformers import AutoTokenizer

    from blockdiff.infer.evaluate import evaluate_gsm8k
    from blockdiff.infer.sampling import SamplerSettings
    from blockdiff.model.diffusion_gemma import DiffusionGemma

    model = DiffusionGemma.from_pretrained(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    settings = SamplerSettings.from_generation_config(model_dir, seed=seed, max_new_tokens=model.config.canvas_length,
                                                      t_max=0.1, t_min=0.05)
    evaluate_gsm8k(model, tokenizer, rows, settings, batch_size=100, out_jsonl=out_jsonl)
    return [json.loads(ln)["correct"] for ln in out_jsonl.read_text().splitlines()]


def split_dev(train_path: Path, n_dev: int) -> tuple[Path, Path]:
    """The last ``n_dev`` training rows as a dev split (for choosing RL settings; RL never reads them) and the
    rest as RL's prompts, written next to ``train_path`` (deterministic: the same rows every run)."""
    lines = train_path.read_text().splitlines(keepends=True)
    rl_path, dev_path = train_path.with_name("rl_train.jsonl"), train_path.with_name("dev.jsonl")
    rl_path.write_text("".join(lines[:-n_dev]))
    dev_path.write_text("".join(lines[-n_dev:]))
    return rl_path, dev_path


def run_demo_rl(out: Path, sft_export: Path | None, overrides: list[str], *, seed: int = 0, n_train: int = 4000,
                n_test: int = 200, level: str = "easy", n_dev: int = 500, evaluate: str = "held_out") -> dict:
    """``evaluate``: "held_out" (the SFT demo's test split) or "dev" (``n_dev`` training prompts RL never reads:
    the split to choose settings on, so the held-out set is scored once, for the chosen setting)."""
    from blockdiff.data.jsonl import read_chat_jsonl
    from blockdiff.rl.loop import rl_train

    out = Path(out)
    sft_export = Path(sft_export or out / "run" / "export")
    data = out / "data"
    if not (sft_export / "config.json").exists():  # the SFT demo first: its data, run and export
        from blockdiff.cli.demo import main as sft_demo

        sft_demo(["--out", str(out), "--seed", str(seed), "--n-train", str(n_train), "--n-test", str(n_test),
                  "--level", level])
    train_path, test_path = data / "train.jsonl", data / "test.jsonl"
    if not test_path.exists():  # an export from elsewhere: the SFT demo's split, written again (deterministic)
        from blockdiff.data.synthetic import write_splits

        write_splits(data, n_train, n_test, seed=seed, level=level)
    rl_path, dev_path = split_dev(train_path, n_dev)
    cfg = load_config(demo_rl_config_path(), ["--model.name_or_path", str(sft_export), "--data.train_path",
                                              str(rl_path), "--train.output_dir", str(out / "rl"), *overrides])
    t0 = time.perf_counter()
    run_dir = rl_train(cfg)
    rl_seconds = time.perf_counter() - t0
    rows = read_chat_jsonl(test_path if evaluate == "held_out" else dev_path)  # never read by RL
    before = held_out_correct(sft_export, rows, seed, run_dir / f"eval_{evaluate}_sft.jsonl")
    after = held_out_correct(Path(cfg.checkpoint.export_dir or run_dir / "export"), rows, seed,
                             run_dir / f"eval_{evaluate}_rl.jsonl")
    n = len(rows)
    report = {"evaluated": evaluate, "n": n, "sft_accuracy": sum(before) / n, "rl_accuracy": sum(after) / n,
              "difference": (sum(after) - sum(before)) / n, "paired_se": paired_se(before, after),
              "rl_steps": cfg.train.max_steps, "rl_seconds": round(rl_seconds, 1),
              "completions_per_step": cfg.rl.prompts_per_step * cfg.rl.group_size, "sft_export": str(sft_export),
              "run_dir": str(run_dir)}
    report["difference_in_se"] = report["difference"] / report["paired_se"] if report["paired_se"] else float("nan")
    report_path = out / ("demo_rl_report.json" if evaluate == "held_out" else "demo_rl_report_dev.json")
    report_path.write_text(json.dumps(report, indent=1))
    print("\n=== blockdiff demo --rl ===")
    print(f"GRPO: {report['rl_steps']} steps x {report['completions_per_step']} completions in {report['rl_seconds']} s "
          f"on CPU")
    print(f"{evaluate.replace('_', '-')} exact match (n={n}): SFT {report['sft_accuracy']:.3f} -> "
          f"RL {report['rl_accuracy']:.3f} "
          f"(difference {report['difference']:+.3f}, paired SE {report['paired_se']:.3f})")
    print(f"report: {report_path}  run: {run_dir}")
    return report
