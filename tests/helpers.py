"""Shared test helpers: tiny DiffusionGemma configs and checkpoints written by transformers itself.

Keep this API stable (other test modules import it):
  tiny_hf_config(...) -> transformers.DiffusionGemmaConfig
  make_hf_checkpoint(tmp_path, seed=0, randomize=True, shard_size=None, **cfg) -> (dir, hf_model)
  load_blockdiff(dir, **kw) -> blockdiff DiffusionGemma
  rank_micro_batches(step, cfg, dataset, dist, vocab_size, settings) -> [(canvas batch, noise)] on the device
  gather_grads(model, dist) -> full gradients by parameter name (rank 0)
  tiny_model(), C, V, batch_of(...), random_example(...), peaked_tiny_model(...): in-process tiny models and batches
  torchrun(n, mode, out, *args), TINY, logged_losses(run_dir): tests/dist_worker.py launches
  cfg_for(data, out, steps, *extra), trajectory(run_dir), final_weights(run_dir, step), inject(...): short runs
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers import DiffusionGemmaConfig

import blockdiff.train.step
from blockdiff.config.schema import demo_config_path, load_config
from blockdiff.data.canvas import CanvasBatch, Example
from blockdiff.model.config import ModelConfig, hf_config_dict
from blockdiff.model.diffusion_gemma import DiffusionGemma
from blockdiff.parallel.parallelize import full_tensor
from blockdiff.train.metrics import read_metrics
from blockdiff.train.step import host_micro_batches, micro_to_device

_HF_CONFIG_DICT_KEYS = set(inspect.signature(hf_config_dict).parameters)


def tiny_hf_config(num_layers=6, sliding_window=6, kv_heads=2, heads=4, canvas=8, vocab=128, **overrides):
    """A tiny DiffusionGemmaConfig (hidden 32, 4 experts top-2, minimal vision tower).

    ``overrides`` that are ``hf_config_dict`` arguments (hidden_size, head_dim, global_head_dim, ...)
    replace those; any other key goes into ``text_config`` (e.g. initializer_range, rms_norm_eps).
    """
    kw = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8, global_head_dim=16,
        num_global_key_value_heads=1, sliding_window=sliding_window, num_experts=4, top_k_experts=2,
        moe_intermediate_size=16, canvas_length=canvas, max_position_embeddings=512,
    )
    text_extra = {}
    for k, v in overrides.items():
        (kw if k in _HF_CONFIG_DICT_KEYS else text_extra)[k] = v
    d = hf_config_dict(**kw)
    d["text_config"].update(text_extra)
    return transformers.DiffusionGemmaConfig(**d)


@torch.no_grad()
def randomize_hf_model(hf_model, seed=0):
    """Make every term matter for parity: noisy 1-D params (norm weights, router scales),
    larger matrices, and distinct encoder/decoder ``layer_scalar`` buffers."""
    g = torch.Generator().manual_seed(seed)
    for _, p in hf_model.named_parameters():
        if p.ndim == 1:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        else:
            p.mul_(4.0)  # std 0.02 -> 0.08: logits far from zero
    for name, b in hf_model.named_buffers():
        if name.endswith("layer_scalar"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return hf_model


def make_hf_checkpoint(tmp_path, seed=0, randomize=True, shard_size=None, **cfg):
    """Build ``DiffusionGemmaForBlockDiffusion(tiny_hf_config(**cfg))`` and save it with transformers.

    Returns (checkpoint dir, the eval-mode transformers model). ``shard_size`` (e.g. "20KB") makes
    transformers write a sharded checkpoint.
    """
    torch.manual_seed(seed)
    hf = transformers.DiffusionGemmaForBlockDiffusion(tiny_hf_config(**cfg))
    if randomize:
        randomize_hf_model(hf, seed)
    hf.eval()
    out = Path(tempfile.mkdtemp(dir=tmp_path, prefix="hf-ckpt-"))
    kw = {} if shard_size is None else {"max_shard_size": shard_size}
    hf.save_pretrained(out, **kw)
    return out, hf


def load_blockdiff(path, **kw) -> DiffusionGemma:
    kw.setdefault("attn_backend", "sdpa")
    return DiffusionGemma.from_pretrained(str(path), **kw).eval()


@torch.no_grad()
def randomize_lora_b(model, seed: int, std: float) -> None:
    """Seeded non-zero LoRA B factors (zero-init B would make every A gradient exactly 0 and the
    comparisons vacuous). Full shapes: call before parallelize slices the expert ones."""
    from blockdiff.lora import ExpertLora, expert_adapters, lora_modules

    g = torch.Generator().manual_seed(seed)
    for m in lora_modules(model).values():
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)
    for a in expert_adapters(model).values():
        for name in ExpertLora.NAMES:
            B = a.factors(name)[1]
            B.copy_(torch.randn(B.shape, generator=g) * std)


def rank_micro_batches(step: int, cfg, dataset, dist, vocab_size: int, settings) -> list[tuple]:
    """This rank's share of the global batch at ``step``, as (canvas batch, noise) micro-batches on the
    device: the trainer's ``host_micro_batches`` moved with ``micro_to_device``."""
    return micro_to_device(host_micro_batches(step, cfg, dataset, dist, vocab_size, settings), dist.device)


@torch.no_grad()
def gather_grads(model, dist) -> dict[str, torch.Tensor]:
    """Full gradients by parameter name (on rank 0). Collective on every rank."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        full = full_tensor(model, name, p.grad)
        if dist.rank == 0:
            out[name] = full.detach().float().cpu()
    return out


# ---- tiny models and batches ---------------------------------------------------------------------

C = 4  # canvas length of tiny_model
V = 96  # its vocabulary


def tiny_model(window=6, seed=0):
    hf = DiffusionGemmaConfig(**hf_config_dict(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
        sliding_window=window, num_experts=4, top_k_experts=2, moe_intermediate_size=16, canvas_length=C,
        max_position_embeddings=256,
    ))
    model = DiffusionGemma(ModelConfig.from_hf(hf), attn_backend="sdpa")
    g = torch.Generator().manual_seed(seed)
    model.init_weights(g)
    with torch.no_grad():  # non-trivial norms and scalars so every term matters
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        for layer in model.layers:
            layer.layer_scalar.fill_(0.8)
            layer.encoder_layer_scalar.fill_(1.2)
    return model.eval()


def batch_of(prompt_lengths, num_blocks, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(prompt_lengths)
    L = max(p + n * C for p, n in zip(prompt_lengths, num_blocks))
    ids = torch.randint(3, V, (B, L), generator=g)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for b, (p, n) in enumerate(zip(prompt_lengths, num_blocks)):
        valid[b, : p + n * C] = True
    ids[~valid] = 0
    return CanvasBatch(ids, valid, torch.tensor(prompt_lengths), torch.tensor(num_blocks),
                       torch.arange(B), block_size=C)


# ---- torchrun launches ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "dist_worker.py")
TIMEOUT = 240

TINY = ["--model.num_layers", "2", "--train.global_batch_size", "4", "--train.micro_batch_size", "1",
        "--objective.self_conditioning_prob", "0.5", "--logging.progress", "false",
        "--logging.tensorboard", "false", "--checkpoint.export_final", "false", "--train.log_every", "1"]


def torchrun_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None), env.pop("RANK", None), env.pop("LOCAL_RANK", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ranks_done(out: Path, world: int, procs_output: str) -> None:
    missing = [r for r in range(world) if not Path(f"{out}.rank{r}.done").exists()]
    assert not missing, f"ranks {missing} did not finish cleanly:\n{procs_output[-6000:]}"


def torchrun(n: int, mode: str, out: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", WORKER, mode,
           str(out), *args]
    p = subprocess.run(cmd, cwd=ROOT, env=torchrun_env(), capture_output=True, text=True, timeout=TIMEOUT)
    check_ranks_done(out, n, p.stdout + p.stderr)


def logged_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def random_example(prompt, turns, gap=3, sample_id=0, seed=0):
    """A synthetic multi-turn Example: prompt tokens, then per turn ``n`` blocks (already EOS-filled
    in the clean sequence) followed by ``gap`` unsupervised tokens (the next user turn)."""
    g = torch.Generator().manual_seed(seed)
    ids, segs = torch.randint(3, V, (prompt,), generator=g).tolist(), []
    for i, n in enumerate(turns):
        segs.append((len(ids), n))
        ids += torch.randint(3, V, (n * C,), generator=g).tolist()
        if i + 1 < len(turns):
            ids += torch.randint(3, V, (gap,), generator=g).tolist()
    return Example(ids, segs[0][0], sum(n for _, n in segs), sample_id, False,
                   segs if len(segs) > 1 else None)


def peaked_tiny_model(vocab=128, seed=0, canvas=8):
    """Random tiny model with non-trivial weights (std 0.08, noisy norms) so logits are peaked."""
    cfg = ModelConfig.from_hf(tiny_hf_config(canvas=canvas, vocab=vocab))
    model = DiffusionGemma(cfg, attn_backend="sdpa")
    g = torch.Generator().manual_seed(seed)
    model.init_weights(g)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(4.0)
    return model.eval()


# ---- short training runs (reliability, master AdamW) ---------------------------------------------

# a 1-layer demo model, one micro-batch of 2 per step: ~0.2 s a step on one CPU thread
RELIABILITY_FAST = ["--model.num_layers", "1", "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
                    "--train.log_every", "1", "--logging.progress", "false", "--logging.tensorboard", "false",
                    "--checkpoint.export_final", "false"]


def args_for(data, out, steps, *extra):
    return ["--data.train_path", str(data), "--train.output_dir", str(out), "--train.max_steps", str(steps),
            *RELIABILITY_FAST, *extra]


def cfg_for(data, out, steps, *extra):
    return load_config(demo_config_path(), args_for(data, out, steps, *extra))


def trajectory(run_dir):
    keys = ("loss", "diffusion_loss", "ar_loss", "grad_norm", "lr", "nan_skipped")
    return [(r["step"], *(r[k] for k in keys)) for r in read_metrics(run_dir) if "loss" in r]


def final_weights(run_dir, step):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def inject(monkeypatch, at_step: int, where: str):
    """Make the loss (or only the gradient) non-finite at 1-based ``at_step`` (one micro-batch per step)."""
    tr = blockdiff.train.step

    real, calls = tr.compute_loss, []

    def compute_loss(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) == at_step:
            if where == "loss":
                out["diffusion_loss"] = out["diffusion_loss"] * float("nan")
                out["loss"] = out["loss"] * float("nan")
            else:
                out["loss"] = _NanGrad.apply(out["loss"])
        return out

    monkeypatch.setattr(tr, "compute_loss", compute_loss)
