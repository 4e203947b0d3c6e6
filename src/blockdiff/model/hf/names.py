"""Tensor names: blockdiff's state dict <-> transformers' DiffusionGemmaForBlockDiffusion checkpoint.

The shared text stack lives under ``model.decoder.*`` in the checkpoint (the encoder's copies are
tied and not stored), except the encoder's ``layer_scalar`` buffers, stored under
``model.encoder.language_model.layers.N.layer_scalar``. ``lm_head`` is tied to the embedding.
Everything else in a checkpoint (the vision tower, ``embed_vision``) is not modelled and is carried
through unchanged.
"""

from __future__ import annotations

import re

DECODER = "model.decoder."
ENCODER_SCALAR = re.compile(r"^model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar$")
OURS_ENCODER_SCALAR = re.compile(r"^layers\.(\d+)\.encoder_layer_scalar$")
# Tied copies transformers may write (depending on version/options) but that we never need.
TIED_ALIASES = re.compile(r"^(lm_head\.weight|model\.encoder\.language_model\.(?!layers\.\d+\.layer_scalar$).*)$")


def to_hf(name: str) -> str:
    m = OURS_ENCODER_SCALAR.match(name)
    if m:
        return f"model.encoder.language_model.layers.{m.group(1)}.layer_scalar"
    return DECODER + name


def from_hf(name: str) -> str | None:
    """Our name for a checkpoint tensor, or None when we do not model it (carried through)."""
    m = ENCODER_SCALAR.match(name)
    if m:
        return f"layers.{m.group(1)}.encoder_layer_scalar"
    if name.startswith(DECODER):
        return name[len(DECODER):]
    return None


def is_tied_alias(name: str) -> bool:
    return bool(TIED_ALIASES.match(name))
