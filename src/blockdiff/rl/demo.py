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


def paired_se(before: list[float], after: list[float]) -> float:
    """Standard error of mean(after - before) over the same prompts (sample std of the differences / sqrt n)."""
    d = [float(a) - float(b) for a, b in zip(after, before)]
    n = len(d)
    if n < 2:
        return float("nan")
    mean = sum(d) / n
    return math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)


def exact_match_per_prompt(model_dir: Path, rows: list[dict], seed: int, out_jsonl: Path, device: str = "cpu",
                           samples: int = 1) -> list[list[bool]]:
    """Exact match of the export at ``model_dir`` with the SFT demo's low-temperature sampler: ``samples`` draws
    per row, ``[draw][row]``. Draw j of row i has the sampler seed ``seed + j * len(rows) + i``, so no two draws
    share one. ``out_jsonl`` gets every draw's rows, each with its ``sample`` index."""
    from transformers import AutoTokenizer

    from blockdiff.infer.evaluate import evaluate_gsm8k
    from blockdiff.infer.sampling import SamplerSettings
    from blockdiff.model.diffusion_gemma import DiffusionGemma

    model = DiffusionGemma.from_pretrained(str(model_dir)).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    draws, lines = [], []
    for j in range(samples):
        settings = SamplerSettings.from_generation_config(model_dir, seed=seed + j * len(rows),
                                                          max_new_tokens=model.config.canvas_length,
                                                          t_max=0.1, t_min=0.05)
        evaluate_gsm8k(model, tokenizer, rows, settings, batch_size=100, out_jsonl=out_jsonl, device=device)
        records = [json.loads(ln) for ln in out_jsonl.read_text().splitlines()]
        draws.append([r["correct"] for r in records])
        lines += [json.dumps({"sample": j, **r}, ensure_ascii=False) for r in records]
    out_jsonl.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    return draws


def compare(before: list[list[bool]], after: list[list[bool]]) -> dict:
    """Accuracy before and after over the same prompts, each prompt's score the mean of its draws, and the paired
    standard error of the difference over prompts (the draws of a prompt are one unit: the sampler's noise
    within it averages out, the prompts' spread stays)."""
    def per_prompt(draws: list[list[bool]]) -> list[float]:
        return [sum(column) / len(draws) for column in zip(*draws)]

    b, a = per_prompt(before), per_prompt(after)
    n = len(b)
    out = {"n": n, "samples_per_prompt": len(before), "sft_accuracy": sum(b) / n, "rl_accuracy": sum(a) / n,
           "difference": (sum(a) - sum(b)) / n, "paired_se": paired_se(b, a)}
    out["difference_in_se"] = out["difference"] / out["paired_se"] if out["paired_se"] else float("nan")
    return out


def prepare_splits(out: Path, sft_export: Path, *, seed: int = 0, n_train: int = 4000, n_test: int = 200,
                   level: str = "easy", n_dev: int = 500) -> tuple[Path, Path, Path]:
    """The RL prompts, the dev split and the held-out split under ``out / "data"``: the SFT demo's splits (the
    SFT demo runs first when ``sft_export`` holds no model), the training rows cut by ``split_dev``."""
    data = Path(out) / "data"
    if not (Path(sft_export) / "config.json").exists():  # the SFT demo first: its data, run and export
        from blockdiff.cli.demo import main as sft_demo

        sft_demo(["--out", str(out), "--seed", str(seed), "--n-train", str(n_train), "--n-test", str(n_test),
                  "--level", level])
    test_path = data / "test.jsonl"
    if not test_path.exists():  # an export from elsewhere: the SFT demo's split, written again (deterministic)
        from blockdiff.data.synthetic import write_splits

        write_splits(data, n_train, n_test, seed=seed, level=level)
    return (*split_dev(data / "train.jsonl", n_dev), test_path)


def split_dev(train_path: Path, n_dev: int) -> tuple[Path, Path]:
    """The last ``n_dev`` training rows as a dev split (for choosing RL settings; RL never reads them) and the
    rest as RL's prompts, written next to ``train_path`` (deterministic: the same rows every run)."""
    lines = train_path.read_text().splitlines(keepends=True)
    rl_path, dev_path = train_path.with_name("rl_train.jsonl"), train_path.with_name("dev.jsonl")
    rl_path.write_text("".join(lines[:-n_dev]))
    dev_path.write_text("".join(lines[-n_dev:]))
    return rl_path, dev_path


def run_demo_rl(out: Path, sft_export: Path | None, overrides: list[str], *, seed: int = 0, n_train: int = 4000,
                n_test: int = 200, level: str = "easy", n_dev: int = 500, evaluate: str = "held_out",
                eval_device: str = "cpu", eval_samples: int = 8, sft_scores: list[list[bool]] | None = None) -> dict:
    """``evaluate``: "held_out" (the SFT demo's test split) or "dev" (``n_dev`` training prompts RL never reads:
    the split to choose settings on, so the held-out set is scored once, for the chosen setting). A run dir
    that already holds RL checkpoints resumes (a larger ``--train.max_steps`` continues the run).
    ``eval_samples``: sampler draws per prompt (``exact_match_per_prompt``); 8 by default, because one draw of the
    low-temperature sampler is noisy: two seeds of the same model differ by a paired SE of about 0.026 on 300
    prompts, as large as the effect RL has (the guide's RL section). ``sft_scores``: the SFT export's
    ``exact_match_per_prompt`` on the same rows, seed and draws, when the caller already has them (a sweep scores
    the shared starting point once); None scores it here."""
    from blockdiff.data.jsonl import read_chat_jsonl
    from blockdiff.rl.loop import rl_train

    out = Path(out)
    sft_export = Path(sft_export or out / "run" / "export")
    rl_path, dev_path, test_path = prepare_splits(out, sft_export, seed=seed, n_train=n_train, n_test=n_test,
                                                  level=level, n_dev=n_dev)
    cfg = load_config(demo_rl_config_path(), ["--model.name_or_path", str(sft_export), "--data.train_path",
                                              str(rl_path), "--train.output_dir", str(out / "rl"), *overrides])
    rows = read_chat_jsonl(test_path if evaluate == "held_out" else dev_path)  # never read by RL
    if sft_scores is not None and (len(sft_scores) != eval_samples or any(len(d) != len(rows) for d in sft_scores)):
        raise ValueError(f"sft_scores: {len(sft_scores)} draws of {[len(d) for d in sft_scores][:1]} rows given, "
                         f"{eval_samples} draws of the {len(rows)} {evaluate} rows expected")
    t0 = time.perf_counter()
    run_dir = rl_train(cfg)
    rl_seconds = time.perf_counter() - t0
    before = sft_scores if sft_scores is not None else exact_match_per_prompt(
        sft_export, rows, seed, run_dir / f"eval_{evaluate}_sft.jsonl", eval_device, eval_samples)
    after = exact_match_per_prompt(Path(cfg.checkpoint.export_dir or run_dir / "export"), rows, seed,
                                   run_dir / f"eval_{evaluate}_rl.jsonl", eval_device, eval_samples)
    report = {"evaluated": evaluate, **compare(before, after),
              "first_sample": compare(before[:1], after[:1]),  # one draw per prompt, as a plain eval scores
              "rl_steps": cfg.train.max_steps, "rl_seconds": round(rl_seconds, 1),
              "completions_per_step": cfg.rl.prompts_per_step * cfg.rl.group_size, "sft_export": str(sft_export),
              "run_dir": str(run_dir)}
    report_path = out / ("demo_rl_report.json" if evaluate == "held_out" else "demo_rl_report_dev.json")
    report_path.write_text(json.dumps(report, indent=1))
    print("\n=== blockdiff demo --rl ===")
    print(f"GRPO: {report['rl_steps']} steps x {report['completions_per_step']} completions in "
          f"{report['rl_seconds']} s")
    first = report["first_sample"]
    print(f"{evaluate.replace('_', '-')} exact match (n={report['n']} prompts x {eval_samples} draws): "
          f"SFT {report['sft_accuracy']:.3f} -> RL {report['rl_accuracy']:.3f} "
          f"(difference {report['difference']:+.3f}, paired SE {report['paired_se']:.3f}); "
          f"first draw only: {first['difference']:+.3f} (paired SE {first['paired_se']:.3f})")
    print(f"report: {report_path}  run: {run_dir}")
    return report
