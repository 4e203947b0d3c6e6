"""The whole DiffusionGemma in one process (generate, eval, export, tests), in transformers' format.

- ``load_pretrained``: local dir or hub id -> DiffusionGemma, built on ``meta``, allocated once on ``device``
  in ``dtype`` and filled tensor by tensor from (possibly sharded) safetensors (``hf.load.Checkpoint``).
  Tensors we do not model (vision tower, embed_vision) are not loaded, only remembered in
  ``model.hf_source`` so an export can carry them through.
- ``from_config``: random-init model plus the transformers config it came from (for export).
"""

from __future__ import annotations

import torch

from blockdiff.model.config import ModelConfig
from blockdiff.model.diffusion_gemma import DiffusionGemma
from blockdiff.model.hf.load import Checkpoint, as_hf_config, attach_source


def materialize(config: ModelConfig, dtype, device, attn_backend) -> DiffusionGemma:
    """Allocate (uninitialised) on ``device`` without ever building fp32 weights on the CPU."""
    with torch.device("meta"):
        model = DiffusionGemma(config, attn_backend=attn_backend)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    return model


def rebuild_rotary(model: DiffusionGemma, device) -> None:
    # The rope tables are non-persistent buffers (garbage after to_empty): recompute them.
    model.rotary.__init__(model.config)
    model.rotary.to(device)


@torch.no_grad()
def load_pretrained(path_or_hub_id, dtype: torch.dtype = torch.float32, device="cpu", attn_backend: str = "auto",
                    num_layers: int | None = None, revision: str | None = None) -> DiffusionGemma:
    with Checkpoint(path_or_hub_id, revision) as ckpt:
        config = ckpt.model_config(num_layers)
        model = materialize(config, dtype, device, attn_backend)
        targets = model.state_dict(keep_vars=True)  # persistent tensors only, sharing model storage
        for ours, name in ckpt.text_tensors(targets, config.num_layers).items():
            target = targets[ours]
            target.data.copy_(ckpt.read(name, target.shape))  # casts to dtype/device
    rebuild_rotary(model, device)
    attach_source(model, ckpt)
    return model


@torch.no_grad()
def from_config(hf_config_or_kwargs, dtype: torch.dtype = torch.float32, device="cpu", attn_backend: str = "auto",
                seed: int = 0) -> DiffusionGemma:
    """Random-init model (reference init) from a DiffusionGemmaConfig or its kwargs."""
    hf_config = as_hf_config(hf_config_or_kwargs)
    config = ModelConfig.from_hf(hf_config)
    device = torch.device(device)
    model = materialize(config, dtype, device, attn_backend)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):  # init_weights' randn then draws on the device, with the device generator
        model.init_weights(gen)
    rebuild_rotary(model, device)
    model.hf_config = hf_config
    model.hf_source = None
    return model
