"""Sampler settings: ``SamplerSettings`` and reading them from a checkpoint's ``generation_config.json``."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockdiff.errors import ConfigError
from blockdiff.model.config import check_attn_backend

GENERATION_CONFIG = "generation_config.json"


@dataclass
class SamplerSettings:
    """Sampling knobs; names follow ``DiffusionGemmaGenerationConfig`` (defaults are its defaults)."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    t_max: float = 0.8
    t_min: float = 0.4
    entropy_bound: float = 0.1  # generation_config: sampler_config.entropy_bound
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: tuple[int, ...] = (1, 106, 50)  # generation_config: eos_token_id; () disables EOS
    canvas_length: int | None = None  # None: the model's config.canvas_length
    seed: int = 0
    # Attention kernel for sampling. Dense-mask SDPA measured faster than flex_attention for 256-token
    # canvases on an H200 (docs/performance.md: the block mask is rebuilt every denoising step).
    attn_backend: str = "sdpa"
    # Replay each block's self-conditioned denoising step as one CUDA graph (CUDA only; same tokens as
    # eager: the graph runs the same kernels on the same buffers). False: plain eager steps.
    cuda_graphs: bool = True
    # torch.compile the transformer layers and the full-vocabulary math of a step (CUDA only): fuses the
    # elementwise chains and the passes over the 262k logits. The first call of a shape compiles.
    compile: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_ids, int):
            self.eos_token_ids = (self.eos_token_ids,)
        self.eos_token_ids = tuple(int(e) for e in (self.eos_token_ids or ()))
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
            (self.max_denoising_steps >= 1, "max_denoising_steps", "must be >= 1"),
            (0 <= self.t_min < self.t_max, "t_max", "need 0 <= t_min < t_max"),
            (self.entropy_bound > 0, "entropy_bound", "must be > 0"),
            (self.stability_threshold >= 0, "stability_threshold", "must be >= 0"),
            (self.confidence_threshold > 0, "confidence_threshold", "must be > 0"),
            (self.canvas_length is None or self.canvas_length >= 1, "canvas_length", "must be >= 1"),
        ]
        for ok, field, msg in checks:
            if not ok:
                raise ConfigError(f"{msg} (got {getattr(self, field)!r})", field=field)
        check_attn_backend(self.attn_backend)

    @classmethod
    def from_generation_config(cls, source: Any = None, **overrides) -> "SamplerSettings":
        """Settings from a checkpoint dir / ``generation_config.json`` path / dict / transformers
        ``DiffusionGemmaGenerationConfig``; missing or null fields keep the defaults, then
        ``overrides`` (our field names) win. ``None`` overrides are ignored (CLI convenience)."""
        raw = read_generation_config(source)
        values: dict[str, Any] = {}
        for name in ("max_new_tokens", "max_denoising_steps", "t_max", "t_min", "stability_threshold",
                     "confidence_threshold"):
            if raw.get(name) is not None:
                values[name] = raw[name]
        sampler = raw.get("sampler_config")
        if sampler is not None:
            bound = sampler.get("entropy_bound") if isinstance(sampler, dict) else getattr(sampler, "entropy_bound")
            if bound is not None:
                values["entropy_bound"] = bound
        if raw.get("eos_token_id") is not None:
            eos = raw["eos_token_id"]
            values["eos_token_ids"] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        if raw.get("canvas_length") is not None:  # not a generation_config field; accepted in dicts
            values["canvas_length"] = raw["canvas_length"]
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in overrides.items():
            if key not in known:
                raise ConfigError(f"unknown sampler setting; expected one of {sorted(known)}", field=key)
            if value is not None:
                values[key] = value
        return cls(**values)


def read_generation_config(source: Any) -> dict:
    """The raw generation config of a checkpoint dir / json path / dict / transformers config ({} if none)."""
    if source is None:
        return {}
    if isinstance(source, dict):
        return dict(source)
    if hasattr(source, "to_dict"):
        return source.to_dict()
    path = Path(os.fspath(source))
    if path.is_dir():
        path = path / GENERATION_CONFIG
        if not path.exists():
            return {}  # checkpoints without one sample with the reference defaults
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read generation config: {e}", file=path) from None
