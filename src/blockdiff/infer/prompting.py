"""Chat sampling: prompts rendered by the checkpoint's template and the stop tokens of its chat format.

Prompts are the conversation rendered with ``add_generation_prompt=True`` (``chat.render_generation_prompt``,
thinking off unless ``enable_thinking``), exactly the prefix training supervised after. Replies end at the
tokenizer's EOS, Gemma 4's end of turn ``<turn|>`` or ``<|tool_response>`` (a turn that calls a tool stops
there, for the caller to append the response), as the released generation_config's ``[1, 106, 50]``.
"""

from __future__ import annotations

import dataclasses
import logging

from blockdiff.data.chat import render_generation_prompt
from blockdiff.data.gemma4 import END_OF_TURN, TOOL_RESPONSE
from blockdiff.infer import sampling
from blockdiff.infer.settings import SamplerSettings

logger = logging.getLogger(__name__)


def eos_ids_for_tokenizer(tokenizer) -> tuple[int, ...]:
    """The tokenizer's EOS plus ``<turn|>`` and ``<|tool_response>`` (when they are known tokens)."""
    ids = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    for name in (END_OF_TURN, TOOL_RESPONSE):
        tid = tokenizer.convert_tokens_to_ids(name)
        if tid is not None and tid != tokenizer.unk_token_id:
            ids.append(int(tid))
    return tuple(dict.fromkeys(ids))


def settings_for_tokenizer(settings: SamplerSettings, tokenizer) -> SamplerSettings:
    """``settings`` with EOS ids fitted to ``tokenizer``: ids that are ordinary vocabulary tokens there are
    dropped (a small tokenizer may hold a plain word at 106), and the tokenizer's own stop tokens
    (``eos_ids_for_tokenizer``) are added. An empty EOS list (EOS disabled) stays empty."""
    if not settings.eos_token_ids:
        return settings
    dedicated = set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | set(tokenizer.all_special_ids)
    kept = [e for e in settings.eos_token_ids if e in dedicated]
    dropped = [e for e in settings.eos_token_ids if e not in dedicated]
    if dropped:
        logger.info("EOS ids %s are ordinary tokens of this tokenizer; not stopping on them", dropped)
    eos = tuple(dict.fromkeys(kept + list(eos_ids_for_tokenizer(tokenizer))))
    return dataclasses.replace(settings, eos_token_ids=eos)


def decode_reply(tokenizer, ids: list[int]) -> str:
    """A sampled reply's text: special tokens dropped, surrounding whitespace stripped."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_text(model, tokenizer, conversations: list[list[dict]], settings: SamplerSettings | None = None,
                  device=None, progress=None, row_seeds: list[int] | None = None,
                  enable_thinking: bool = False) -> list[str]:
    """Render each conversation's generation prompt, sample, decode (special tokens dropped)."""
    settings = settings_for_tokenizer(settings or SamplerSettings(), tokenizer)
    prompts = [render_generation_prompt(tokenizer, conv, enable_thinking=enable_thinking) for conv in conversations]
    outputs = sampling.generate(model, prompts, settings, device=device, progress=progress, row_seeds=row_seeds)
    return [decode_reply(tokenizer, o) for o in outputs]
