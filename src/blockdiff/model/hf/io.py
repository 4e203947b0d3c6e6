"""Checkpoint I/O in transformers' DiffusionGemma format (safetensors only).

- ``load_pretrained`` (``hf_load``, re-exported here): local dir or hub id -> DiffusionGemma, built on
  ``meta`` and filled tensor by tensor from (possibly sharded) safetensors. Tensors we do not model
  (vision tower, embed_vision) are not loaded, only remembered in ``model.hf_source`` so an export can
  carry them through.
- ``copy_tokenizer``: the tokenizer / processor files of a checkpoint (writing an export: ``hf_save``).
- ``from_config``: random-init model plus the transformers config it came from (for export).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from blockdiff.model.config import ModelConfig
from blockdiff.model.diffusion_gemma import DiffusionGemma
from blockdiff.model.hf.load import (CONFIG, EXPECTED_MODEL_TYPE, HUB_PATTERNS, INDEX, SINGLE, _HUB_ID, _ST_ITEMSIZE,  # noqa: F401
                      _materialize, _offline, _open_safetensors, _read_json, _read_tensor, _rebuild_rotary,
                      _reduce_depth, load_pretrained, read_hf_config, resolve_checkpoint_dir, weight_map)

# what AutoTokenizer / AutoProcessor (Gemma4Processor) read besides the weights and config.json; plus the
# legacy per-processor files and the extra chat templates of a source that has them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json", "processor_config.json",
                   "preprocessor_config.json", "video_preprocessor_config.json", "audio_tokenizer_config.json")
TOKENIZER_DIRS = ("additional_chat_templates",)


# ---- building from a config --------------------------------------------------------------------


def _as_hf_config(hf_config_or_kwargs):
    import transformers

    if isinstance(hf_config_or_kwargs, dict):
        return transformers.DiffusionGemmaConfig(**hf_config_or_kwargs)
    return hf_config_or_kwargs


@torch.no_grad()
def from_config(hf_config_or_kwargs, dtype: torch.dtype = torch.float32, device="cpu", attn_backend: str = "auto",
                seed: int = 0) -> DiffusionGemma:
    """Random-init model (reference init) from a DiffusionGemmaConfig or its kwargs."""
    hf_config = _as_hf_config(hf_config_or_kwargs)
    config = ModelConfig.from_hf(hf_config)
    device = torch.device(device)
    model = _materialize(config, dtype, device, attn_backend)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):  # init_weights' randn then draws on the device, with the device generator
        model.init_weights(gen)
    _rebuild_rotary(model, device)
    model.hf_config = hf_config
    model.hf_source = None
    return model


# ---- saving ------------------------------------------------------------------------------------


def copy_tokenizer(src_dir, out_dir) -> list[str]:
    """Copy the tokenizer and processor files present in ``src_dir`` (and generation_config.json) to ``out_dir``."""
    copied = []
    for name in TOKENIZER_FILES + ("generation_config.json",):
        src = Path(src_dir) / name
        if src.is_file():
            shutil.copyfile(src, Path(out_dir) / name)
            copied.append(name)
    for name in TOKENIZER_DIRS:
        if (Path(src_dir) / name).is_dir():
            shutil.copytree(Path(src_dir) / name, Path(out_dir) / name, dirs_exist_ok=True)
            copied.append(name)
    return copied
