"""blockdiff: fine-tuning toolkit for block-diffusion language models (DiffusionGemma SFT).

The public Python API. Every name is imported on first use (PEP 562), so ``import blockdiff`` loads
no torch::

    import blockdiff

    cfg = blockdiff.load_config("run.yaml", ["--train.max_steps", "100"])  # or config_from_dict({...})
    run_dir = blockdiff.fit(cfg)                      # the training loop; returns the run directory
    export_dir = blockdiff.export_run(run_dir)        # a checkpoint transformers loads
    model = blockdiff.DiffusionGemma.from_pretrained(export_dir)
    model, tokenizer, device = blockdiff.load_for_inference(export_dir)
    replies = blockdiff.generate_text(model, tokenizer, [[{"role": "user", "content": "Hi"}]],
                                      blockdiff.SamplerSettings(max_new_tokens=256))

The training loop is ``fit`` because ``blockdiff.train.loop`` is the module that holds it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "DiffusionGemma": ("blockdiff.model.diffusion_gemma", "DiffusionGemma"),
    "Config": ("blockdiff.config.schema", "Config"),
    "load_config": ("blockdiff.config.schema", "load_config"),
    "config_from_dict": ("blockdiff.config.schema", "config_from_dict"),
    "fit": ("blockdiff.train.loop", "train"),
    "export_run": ("blockdiff.checkpoint.export", "export_run"),
    "SamplerSettings": ("blockdiff.infer.settings", "SamplerSettings"),
    "generate": ("blockdiff.infer.sampling", "generate"),
    "generate_text": ("blockdiff.infer.prompting", "generate_text"),
    "load_for_inference": ("blockdiff.infer.evaluate", "load_for_inference"),
    "preview_rows": ("blockdiff.data.preview", "preview_rows"),
    "BlockdiffError": ("blockdiff.errors", "BlockdiffError"),
    "ConfigError": ("blockdiff.errors", "ConfigError"),
    "DataError": ("blockdiff.errors", "DataError"),
    "CheckpointError": ("blockdiff.errors", "CheckpointError"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'blockdiff' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
