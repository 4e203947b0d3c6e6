"""Shared test helpers: tiny DiffusionGemma configs and checkpoints written by transformers itself.

Keep this API stable (other test modules import it):
  tiny_hf_config(...) -> transformers.DiffusionGemmaConfig
  make_hf_checkpoint(tmp_path, seed=0, randomize=True, shard_size=None, **cfg) -> (dir, hf_model)
  load_blockdiff(dir, **kw) -> blockdiff DiffusionGemma
  rank_micro_batches(step, cfg, dataset, dist, vocab_size, settings) -> [(canvas batch, noise)] on the device
  gather_grads(model, dist) -> full gradients by parameter name (rank 0)
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

import torch
import transformers

from blockdiff.model.config import hf_config_dict
from blockdiff.model.diffusion_gemma import DiffusionGemma
from blockdiff.parallel.parallelize import full_tensor
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
