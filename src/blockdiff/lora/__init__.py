"""LoRA for DiffusionGemma: adapters, expert adapters, PEFT-format save/load, merge.

- ``apply_lora(model, lora_cfg)`` wraps the target ``nn.Linear`` modules (q/k/v/o_proj of every layer's
  ``self_attn``, gate/up/down_proj of every layer's dense ``mlp``; the self-conditioning block only with
  ``lora_cfg.self_conditioning``) in ``LoraLinear`` and, with ``lora_cfg.experts``, gives every
  ``Experts`` an ``ExpertLora`` (per-expert A/B as 3-D tensors, applied inside the grouped GEMMs through
  the ``Experts.adapter`` hook, so they shard with the experts under expert parallelism). Everything
  else is frozen. Our model is ONE stack run by both the encoder and decoder passes, so an adapter is
  shared by both passes exactly as the base weights are.
- Parameter names: ``layers.3.self_attn.q_proj.base.weight`` (frozen), ``...q_proj.lora_A`` [r, in],
  ``...q_proj.lora_B`` [out, r]; ``layers.3.experts.adapter.gate_up_A`` [E, r, H] and so on.
  Adapters are fp32 master parameters; ``cast_frozen_base_`` optionally stores the frozen base in bf16.
- ``save_peft_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
  ``peft.PeftModel.from_pretrained(DiffusionGemmaForBlockDiffusion.from_pretrained(base), dir)`` loads.
  transformers holds the encoder and decoder as separate (tied) module trees, so every adapter of the
  shared stack is written twice: under ``model.decoder.layers.N...`` and
  ``model.encoder.language_model.layers.N...`` (same tensors). Expert adapters are not written in the
  PEFT file (see ``EXPERT_FILE``): merge them (``merge_lora_``) for a transformers-only consumer.
- ``merge_lora_`` folds everything into the base (plain ``nn.Linear`` again, expert tensors updated);
  ``merged_items`` gives the same merged tensors one at a time without changing the model, which is how
  ``blockdiff.checkpoint.live_export.export_model`` writes a LoRA run's merged checkpoint (+ ``adapter/``).
- ``trainable_state_dict`` / ``checkpoint_state`` let training checkpoints of a LoRA run hold only the
  adapters (+ optimizer state), never the frozen base.
"""

from blockdiff.lora.adapters import *  # noqa: F401,F403
from blockdiff.lora.adapters import __all__ as _a
from blockdiff.lora.peft_format import *  # noqa: F401,F403
from blockdiff.lora.peft_format import __all__ as _p

__all__ = [*_a, *_p]
