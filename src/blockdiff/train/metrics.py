"""Per-step metrics: JSONL (the source of truth), TensorBoard and optionally Weights & Biases."""

from __future__ import annotations

import json
import logging
import resource
import time
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


class StepProfiler:
    """torch-profiler window over training steps ``[start, start + steps)`` (``logging.profile_at``), per rank.

    Writes ``<run>/profile/rank<R>.txt`` (ops by device and by CPU time), ``rank<R>.json`` (wall time per
    step; device busy time split into communication kernels (NCCL) and compute) and a chrome trace."""

    def __init__(self, run_dir, start: int, steps: int, rank: int, device: torch.device, host_ops: bool = True):
        self.start, self.steps, self.rank, self.device = start, steps, rank, device
        self.host_ops = host_ops or device.type != "cuda"
        self.dir = Path(run_dir) / "profile"
        self.prof = None

    def before_step(self, step: int) -> None:
        if self.start and step + 1 == self.start:  # steps are numbered from 1 in the logs
            from torch.profiler import profile

            self._sync()
            self.prof = profile(activities=self.activities())
            self.prof.start()
            self.t0, self.done = time.perf_counter(), 0

    def activities(self) -> list:
        from torch.profiler import ProfilerActivity  # only a profiled run pays for it; matplotlib below is optional

        return ([ProfilerActivity.CPU] if self.host_ops else []) + (
            [ProfilerActivity.CUDA] if self.device.type == "cuda" else [])

    def after_step(self, step: int) -> None:
        if self.prof is not None:
            self.done += 1
            if self.done == self.steps:
                self.close()

    def close(self) -> None:
        """End the window (also when training ends inside it) and write the files."""
        if self.prof is None or not self.done:
            return
        self._sync()
        wall = time.perf_counter() - self.t0
        self.prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        events = self.prof.key_averages()
        steps = self.done
        summary = {"rank": self.rank, "steps": steps, "wall_s_per_step": wall / steps}
        if self.device.type == "cuda":  # kernels only (CPU ops' device times would count them twice)
            kernels = [e for e in events if e.device_type.name == "CUDA"]
            comm = sum(e.self_device_time_total for e in kernels if "nccl" in e.key.lower())
            total = sum(e.self_device_time_total for e in kernels)
            summary.update(comm_kernel_s_per_step=comm / 1e6 / steps,
                           compute_kernel_s_per_step=(total - comm) / 1e6 / steps)
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        text = events.table(sort_by=sort, row_limit=40, max_name_column_width=70)
        if self.host_ops:
            text += "\n\n" + events.table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=70)
        (self.dir / f"rank{self.rank}.txt").write_text(text)
        (self.dir / f"rank{self.rank}.json").write_text(json.dumps(summary, indent=1))
        self.prof.export_chrome_trace(str(self.dir / f"rank{self.rank}.trace.json"))
        log.info("profile of steps %d-%d written to %s: %s", self.start, self.start + steps - 1, self.dir, summary)
        self.prof = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def save_panel(fig, ax, path: Path, ylabel: str, title: str, legend: bool = True) -> Path:
    """Label, title and write one per-step panel as a PNG (the figure is closed); returns ``path``."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(run_dir, out_dir=None) -> list[Path]:
    """Loss-curve PNGs like the seed's "Inspect" step: training + diffusion (+ AR) loss with the validation
    loss beside them (``eval.loss_every``), grad norm, lr; and the periodic sampled accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = read_metrics(run_dir)
    rows = [r for r in logged if "loss" in r]
    val = [r for r in logged if "val_loss" in r]
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
        if name == "loss.png" and val:  # the validation loss (held-out rows, fixed noise) beside training
            for key, label in (("val_loss", "validation loss"), ("val_diffusion_loss", "validation diffusion loss")):
                ax.plot([r["step"] for r in val], [r[key] for r in val], marker="o", markersize=3, label=label)
        written.append(save_panel(fig, ax, out / name, ylabel, f"{Path(run_dir).name}: {ylabel}"))
    evals = [r for r in logged if "eval_accuracy" in r]
    if evals:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], marker="o")
        ax.set_ylim(0, 1)
        written.append(save_panel(fig, ax, out / "eval_accuracy.png", "held-out exact match",
                                  f"{Path(run_dir).name}: periodic eval", legend=False))
    return written
