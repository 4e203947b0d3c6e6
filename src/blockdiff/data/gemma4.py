"""The Gemma 4 chat format's control tokens, at the ids of the released DiffusionGemma tokenizer.

Established from the released config and generation_config: pad 0, eos 1, bos 2, unk 3, mask 4,
``<|tool_response>`` 50, ``<|channel>`` 100, ``<channel|>`` 101, ``<|turn>`` 105, ``<turn|>`` 106. The other
tool tokens sit beside ``<|tool_response>`` (46-52) and ``<|think|>`` at 98: the order of Gemma 4's
control-token block; the shipped tiny tokenizer uses these ids too (nothing in blockdiff depends on them:
stop tokens and prompts are looked up by name through the tokenizer).
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKEN_IDS: dict[int, str] = {
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>",
    51: "<tool_response|>", 52: '<|"|>',
    98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
    105: "<|turn>", 106: "<turn|>",
}

START_OF_TURN = "<|turn>"
END_OF_TURN = "<turn|>"
# a model turn that calls tools ends here: the caller appends the responses and the model continues
TOOL_RESPONSE = "<|tool_response>"


def project_chat_template() -> str:
    """blockdiff's own Gemma 4 chat template (the shipped tiny tokenizer's)."""
    return Path(__file__).with_name("gemma4_chat_template.jinja").read_text(encoding="utf-8")
