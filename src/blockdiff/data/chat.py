"""Chat formatting and supervision masks.

The supervised region of a conversation is the FINAL assistant turn's content plus its
end-of-turn token; the ``<start_of_turn>model\\n`` header and all earlier turns are context.
(Supervising the header teaches the model to emit it inside the canvas.)

The mask comes from the chat template itself: transformers renders ``{% generation %}`` ...
``{% endgeneration %}`` blocks and reports the token positions they cover via
``apply_chat_template(..., return_assistant_tokens_mask=True, return_dict=True)``.
Templates shipped with real checkpoints often lack those markers; ``SUPERVISION_TEMPLATE``
is a Gemma-compatible replacement that has them.
"""

from __future__ import annotations

import logging

from blockdiff.errors import DataError

logger = logging.getLogger(__name__)

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

# Gemma-style: a system message is folded into the first user turn (Gemma has no system role);
# assistant turns are rendered with role "model"; content is trimmed like Gemma's own template.
SUPERVISION_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first = messages[0]['content'] -%}"
    "{%- set system_text = first if first is string else "
    "(first | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_text = '' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set raw = message['content'] -%}"
    "{%- set text = (raw if raw is string else "
    "(raw | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(''))) | trim -%}"
    "{%- if message['role'] == 'assistant' or message['role'] == 'model' -%}"
    "{{- '<start_of_turn>model\\n' -}}"
    "{%- generation -%}"
    "{{- text + '<end_of_turn>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<start_of_turn>user\\n' -}}"
    "{%- if loop.first and system_text -%}{{- system_text | trim + '\\n\\n' -}}{%- endif -%}"
    "{{- text + '<end_of_turn>\\n' -}}"
    "{%- else -%}"
    "{{- raise_exception('unsupported role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

TEMPLATE_POLICIES = ("auto", "keep", "replace")

_PROBE = [
    {"role": "user", "content": "What is 1 + 1?"},
    {"role": "assistant", "content": "1 + 1 = 2"},
]


def tokenizer_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _has_generation_markers(template) -> bool:
    return isinstance(template, str) and "generation" in template and "endgeneration" in template


def _turn_tokens_known(tokenizer) -> bool:
    """Our template needs the Gemma turn markers to be single (special) tokens."""
    for tok in (START_OF_TURN, END_OF_TURN):
        ids = tokenizer.convert_tokens_to_ids(tok)
        if ids is None or ids == tokenizer.unk_token_id:
            return False
    return True


def ensure_supervision_template(tokenizer, policy: str = "auto"):
    """Make sure ``tokenizer`` has a chat template that marks the supervised region.

    policy:
      * ``"auto"``: keep the tokenizer's template if it has ``{% generation %}`` markers,
        otherwise install ``SUPERVISION_TEMPLATE``.
      * ``"keep"``: require the tokenizer's own template to have markers (no replacement).
      * ``"replace"``: always install ``SUPERVISION_TEMPLATE``.
    The result is verified on a probe conversation (mask covers the reply, not the header).
    Raises DataError naming the tokenizer when no usable template can be set up.
    Returns the tokenizer (modified in place).
    """
    name = tokenizer_name(tokenizer)
    if policy not in TEMPLATE_POLICIES:
        raise DataError(f"unknown chat template policy {policy!r}; expected one of {TEMPLATE_POLICIES}",
                        field="chat_template_policy")
    current = getattr(tokenizer, "chat_template", None)
    install = policy == "replace" or (policy == "auto" and not _has_generation_markers(current))
    if install:
        if not _turn_tokens_known(tokenizer):
            raise DataError(
                f"tokenizer '{name}' has no usable chat template with {{% generation %}} markers and "
                f"lacks the {START_OF_TURN}/{END_OF_TURN} tokens needed to install the Gemma-style "
                "supervision template", field="chat_template")
        if current:
            logger.info("replacing chat template of tokenizer '%s' with blockdiff's supervision template", name)
        tokenizer.chat_template = SUPERVISION_TEMPLATE
    elif not current:
        raise DataError(f"tokenizer '{name}' has no chat template", field="chat_template")
    elif not _has_generation_markers(current):
        raise DataError(f"chat template of tokenizer '{name}' has no {{% generation %}} markers, so the "
                        "supervised region is unknown (use policy 'auto' or 'replace')", field="chat_template")
    _verify_probe(tokenizer, name)
    return tokenizer


def _verify_probe(tokenizer, name: str) -> None:
    ids, supervised, start = tokenize_conversation(tokenizer, _PROBE)
    reply = tokenizer.decode(ids[start:], skip_special_tokens=True).strip()
    expected = _PROBE[-1]["content"]
    if reply != expected:
        raise DataError(f"chat template of tokenizer '{name}' marks {reply!r} as the assistant reply, "
                        f"expected {expected!r} (the role header must not be supervised)",
                        field="chat_template")


def tokenize_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool], int]:
    """Tokenize a conversation ending in an assistant turn.

    Returns ``(input_ids, supervised, prompt_length)``: ``supervised[i]`` is True exactly for
    the final assistant turn's tokens (content + end-of-turn), which form a contiguous suffix
    starting at ``prompt_length``. Anything the template renders after that turn's
    end-of-turn (e.g. a trailing newline) is dropped.
    """
    name = tokenizer_name(tokenizer)
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError("conversation must end with an assistant turn", field="messages")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer '{name}' has no chat template", field="chat_template")
    from jinja2.exceptions import TemplateError  # transformers needs jinja2 for chat templates

    try:  # transformers renders templates in jinja2's SandboxedEnvironment
        enc = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    except TemplateError as e:  # a broken template, or a sandbox violation (SecurityError)
        raise DataError(f"chat template of tokenizer '{name}' failed to render: {type(e).__name__}: {e}",
                        field="chat_template") from None
    ids = list(enc["input_ids"])
    mask = list(enc.get("assistant_masks") or [])
    if len(mask) != len(ids) or not any(mask):
        raise DataError(f"chat template of tokenizer '{name}' marked no assistant tokens "
                        "(missing {% generation %} markers?)", field="chat_template")
    # The final assistant turn is the LAST contiguous run of marked tokens.
    end = max(i for i, m in enumerate(mask) if m) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    ids = ids[:end]
    supervised = [i >= start for i in range(end)]
    return ids, supervised, start


def tokenize_turns(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Tokenize a conversation ending in an assistant turn, supervising EVERY assistant turn.

    Returns ``(input_ids, supervised)``: ``supervised[i]`` is True exactly for the tokens the
    template marks as assistant output (each assistant turn's content + end-of-turn), i.e. one
    contiguous run per assistant turn. As in ``tokenize_conversation`` anything rendered after the
    final turn's end-of-turn is dropped, so the last token is supervised.
    """
    ids, supervised, start = tokenize_conversation(tokenizer, messages)  # validates, renders once
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    mask = [bool(m) for m in enc["assistant_masks"][: len(ids)]]
    return ids, mask


def render_generation_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids for sampling: the conversation without its final assistant turn (if any)
    plus the generation prompt, rendered with the same template as training."""
    context = list(messages)
    if context and context[-1].get("role") == "assistant":
        context = context[:-1]
    if not context:
        raise DataError("conversation has no turns before the assistant reply", field="messages")
    return list(tokenizer.apply_chat_template(
        context, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
