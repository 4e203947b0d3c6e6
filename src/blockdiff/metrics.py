"""Per-step metrics: JSONL (the source of truth), TensorBoard and optionally Weights & Biases."""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path

import torch

log = logging.getLogger("blockdiff")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class MetricsLogger:
    def __init__(self, run_dir, enabled: bool, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str | None = None, config: dict | None = None, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step or None)
            except Exception as e:  # tensorboard not installed: JSONL still has everything
                log.warning("TensorBoard logging off: %s", e)
        if wandb:
            try:
                import wandb as wb

                self.wandb = wb.init(project=wandb_project or "blockdiff", config=config, resume="allow")
            except Exception as e:
                log.warning("Weights & Biases logging off: %s", e)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the curve has no duplicates."""
        if not self.path.exists():
            return
        keep = []
        for ln in self.path.read_text().splitlines():
            try:
                row = json.loads(ln) if ln.strip() else None
            except json.JSONDecodeError:  # a line torn by kill -9 mid-append: drop it
                row = None
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(ln)
        self.path.write_text("".join(k + "\n" for k in keep))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_run(run_dir, out_dir=None) -> list[Path]:
    """Loss-curve PNGs like the seed's "Inspect" step: training + diffusion (+ AR) loss, grad norm, lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training rows to plot")
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows]
    written = []
    panels = [
        ("loss.png", "loss", [("loss", "training loss (diffusion + AR)"), ("diffusion_loss", "diffusion loss"),
                              ("ar_loss", "AR loss")]),
        ("grad_norm.png", "grad norm", [("grad_norm", "grad norm")]),
        ("lr.png", "learning rate", [("lr", "lr")]),
    ]
    for name, ylabel, series in panels:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in series:
            if key in rows[0]:
                ax.plot(steps, [r.get(key) for r in rows], label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{Path(run_dir).name}: {ylabel}")
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)
    evals = [r for r in read_metrics(run_dir) if "eval_accuracy" in r]
    if evals:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out exact match")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(f"{Path(run_dir).name}: periodic eval")
        fig.tight_layout()
        fig.savefig(out / "eval_accuracy.png", dpi=100)
        plt.close(fig)
        written.append(out / "eval_accuracy.png")
    return written
