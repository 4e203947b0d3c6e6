"""PNG curves of an RL run: reward and accuracy of the rollouts (and held-out accuracy when logged), KL and
clip fraction, next to SFT's loss / grad-norm / lr panels (``train.metrics.plot_run``)."""

from __future__ import annotations

from pathlib import Path

from blockdiff.train.metrics import plot_run, read_metrics, save_panel


def is_rl_run(run_dir) -> bool:
    """Whether ``run_dir``'s metrics are those of ``blockdiff rl`` (what ``blockdiff plot`` draws for it)."""
    return any("reward_mean" in r for r in read_metrics(run_dir))


def plot_rl(run_dir, out_dir=None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = plot_run(run_dir, out_dir)
    logged = read_metrics(run_dir)
    rows = [r for r in logged if "reward_mean" in r]
    evals = [r for r in logged if "eval_accuracy" in r]
    out = Path(out_dir or run_dir)
    steps = [r["step"] for r in rows]
    panels = [("reward.png", "reward", [("reward_mean", "rollout reward (mean)")]),
              ("accuracy.png", "exact match", [("accuracy", "rollout accuracy")]),
              ("kl.png", "KL / clip fraction", [("kl", "KL to the reference"), ("clip_fraction", "clip fraction")])]
    for name, ylabel, series in panels:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in series:
            ax.plot(steps, [r.get(key) for r in rows], label=label)
        if name == "reward.png":
            lo = [r["reward_mean"] - r["reward_std"] for r in rows]
            hi = [r["reward_mean"] + r["reward_std"] for r in rows]
            ax.fill_between(steps, lo, hi, alpha=0.2, label="± std over completions")
        if name == "accuracy.png" and evals:
            ax.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], marker="o", label="held-out")
        written.append(save_panel(fig, ax, out / name, ylabel, f"{Path(run_dir).name}: {ylabel}"))
    return written
