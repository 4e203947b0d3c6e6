"""blockdiff: fine-tuning toolkit for block-diffusion language models (DiffusionGemma SFT)."""

__version__ = "0.1.0"
