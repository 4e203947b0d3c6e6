"""Chat rendering and supervision masks, for any chat template (the checkpoint's own, unchanged).

The token ids of a conversation are the template's own tokenisation of its full rendering. The supervised
region of an assistant turn is found at the text level: the conversation before the turn, rendered with
``add_generation_prompt=True`` exactly as sampling renders a prompt, must be a prefix of the full rendering
(the template is prefix-stable); the turn's supervised characters run from the end of that prompt to the
end of the turn (for the final turn: the end of the conversation). So the supervised region is exactly
what the model must emit after the prompt it is given at generation time: for Gemma 4 the reply plus
``<turn|>\\n``, never the ``<|turn>model\\n`` header or a thinking-channel preamble that the generation
prompt itself holds. Character spans become token spans through the fast tokenizer's offsets; a token
that straddles a span boundary, or a prompt that tokenizes differently on its own, is an error.

Templates with ``{% generation %}`` markers: transformers reports the marked tokens
(``return_assistant_tokens_mask``) and those are supervised instead.
"""

from __future__ import annotations

import bisect
from pathlib import Path

from blockdiff.errors import ConfigError, DataError

_PROBE = [{"role": "user", "content": "What is 1 + 1?"}]


def tokenizer_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def install_chat_template(tokenizer, path) -> None:
    """Replace ``tokenizer``'s chat template with the text of the .jinja file ``path`` (``data.chat_template``)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the chat template: {e}", file=str(path), field="data.chat_template") from None
    if not text.strip():
        raise ConfigError("the chat template file is empty", file=str(path), field="data.chat_template")
    tokenizer.chat_template = text
    from jinja2.exceptions import TemplateSyntaxError  # jinja2 comes with transformers' chat templates

    try:
        render(tokenizer, _PROBE, add_generation_prompt=True)
    except DataError as e:
        if isinstance(e.__cause__, TemplateSyntaxError):
            raise ConfigError(f"invalid chat template: {e.__cause__}", file=str(path),
                              field="data.chat_template") from None


def _apply(tokenizer, messages: list[dict], tools, **kwargs):
    """``tokenizer.apply_chat_template`` (transformers renders in jinja2's sandbox); errors as DataError."""
    name = tokenizer_name(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer '{name}' has no chat template (set data.chat_template to a .jinja file)",
                        field="chat_template")
    from jinja2.exceptions import TemplateError  # transformers needs jinja2 for chat templates

    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, **kwargs)
    except TemplateError as e:  # a broken template, a raise_exception, or a sandbox violation (SecurityError)
        raise DataError(f"chat template of tokenizer '{name}' failed to render: {type(e).__name__}: {e}",
                        field="chat_template") from e


def render(tokenizer, messages: list[dict], *, tools=None, add_generation_prompt: bool = False,
           enable_thinking: bool = False) -> str:
    """The template's text for ``messages``."""
    return _apply(tokenizer, messages, tools, tokenize=False, add_generation_prompt=add_generation_prompt,
                  enable_thinking=enable_thinking)


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text``, tokenized as ``apply_chat_template`` does."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"tokenizer '{tokenizer_name(tokenizer)}' is not a fast tokenizer; the supervised "
                        "region is mapped to tokens through a fast tokenizer's offsets", field="data.tokenizer")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _has_generation_markers(template) -> bool:
    return isinstance(template, str) and "{% generation" in template.replace("{%-", "{%") \
        and "endgeneration" in template


def _without_reasoning(message: dict) -> dict:
    return {k: v for k, v in message.items() if k not in ("reasoning_content", "reasoning")}


def _prompt_before(tokenizer, messages, i, full, kw) -> str:
    """The generation prompt before assistant turn ``i``; it must be a prefix of ``full``."""
    prompt = render(tokenizer, messages[:i], add_generation_prompt=True, **kw)
    if not full.startswith(prompt):
        at = next((j for j, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
        raise DataError(
            f"chat template of tokenizer '{tokenizer_name(tokenizer)}' is not prefix-stable: the conversation "
            f"before messages[{i}] rendered with add_generation_prompt=True is not a prefix of the whole "
            f"conversation's rendering (they differ at character {at}: {prompt[at:at + 40]!r} vs "
            f"{full[at:at + 40]!r}), so the supervised reply cannot be located", field="chat_template")
    return prompt


def _turn_end(tokenizer, messages, i, full, kw) -> int:
    """Where non-final assistant turn ``i`` ends in ``full``: the conversation up to it, rendered alone, is a
    prefix of ``full`` (templates that show reasoning on the last turn only: without its reasoning)."""
    for last in (messages[i], _without_reasoning(messages[i])):
        part = render(tokenizer, messages[:i] + [last], **kw)
        if full.startswith(part):
            return len(part)
    raise DataError(f"chat template of tokenizer '{tokenizer_name(tokenizer)}' is not prefix-stable: the "
                    f"conversation up to messages[{i}] does not render as a prefix of the whole conversation, so "
                    "the turn's end cannot be located", field="chat_template")


def _token_mask(tokenizer, text: str, spans: list[tuple[int, int]]):
    """Ids and offsets of ``text`` and the mask: a token is supervised when it starts inside one of the sorted,
    disjoint ``spans``."""
    ids, offsets = _encode(tokenizer, text)
    mask, k = [], 0
    for s, e in offsets:
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        if k < len(spans) and (s < spans[k][0] < e or s < spans[k][1] < e):
            edge = spans[k][0] if s < spans[k][0] < e else spans[k][1]
            raise DataError(f"tokenizer '{tokenizer_name(tokenizer)}' merges text across the edge of the "
                            f"supervised region (character {edge}: token {text[s:e]!r})", field="chat_template")
        mask.append(k < len(spans) and spans[k][0] <= s)
    return ids, offsets, mask


def _check_rendered(tokenizer, message: dict, i: int, supervised_text: str) -> None:
    """The final turn's reasoning and tool calls must appear in its supervised text (a template that drops
    them would train on a reply without them)."""
    name = tokenizer_name(tokenizer)
    for key in ("reasoning_content", "reasoning"):
        if message.get(key) and message[key].strip() not in supervised_text:
            raise DataError(f"chat template of tokenizer '{name}' does not render the assistant's reasoning",
                            field=f"messages[{i}].{key}")
    for j, call in enumerate(message.get("tool_calls") or []):
        if call["function"]["name"] not in supervised_text:
            raise DataError(f"chat template of tokenizer '{name}' does not render tool calls",
                            field=f"messages[{i}].tool_calls[{j}]")


def _marked(tokenizer, messages, kw) -> tuple[list[int], list[bool]]:
    enc = _apply(tokenizer, messages, kw["tools"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                 enable_thinking=kw["enable_thinking"])
    ids, mask = list(enc["input_ids"]), [bool(m) for m in enc.get("assistant_masks") or []]
    if len(mask) != len(ids) or not any(mask):
        raise DataError(f"chat template of tokenizer '{tokenizer_name(tokenizer)}' marks no assistant tokens "
                        "inside its {% generation %} blocks", field="chat_template")
    end = max(i for i, m in enumerate(mask) if m) + 1  # anything rendered after the last marked token is dropped
    return ids[:end], mask[:end]


def _assistant_turns(messages) -> list[int]:
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError("conversation must end with an assistant turn", field="messages")
    return [i for i, m in enumerate(messages) if m.get("role") == "assistant"]


def _supervise(tokenizer, messages, turns: list[int], kw) -> tuple[list[int], list[bool]]:
    full = render(tokenizer, messages, **kw)
    spans, prompts = [], []
    for i in turns:
        prompt = _prompt_before(tokenizer, messages, i, full, kw)
        start = len(prompt)
        end = len(full) if i == len(messages) - 1 else _turn_end(tokenizer, messages, i, full, kw)
        if end <= start:
            raise DataError(f"chat template of tokenizer '{tokenizer_name(tokenizer)}' renders nothing for "
                            f"messages[{i}] after its generation prompt", field=f"messages[{i}]")
        spans.append((start, end))
        prompts.append(prompt)
    last = len(messages) - 1
    _check_rendered(tokenizer, messages[last], last, full[spans[-1][0]:spans[-1][1]])
    ids, offsets, mask = _token_mask(tokenizer, full, spans)
    for prompt, (start, _) in zip(prompts, spans):  # generation tokenizes the prompt alone: the same ids
        n = bisect.bisect_left([o[0] for o in offsets], start)
        if _encode(tokenizer, prompt)[0] != ids[:n]:
            raise DataError(f"tokenizer '{tokenizer_name(tokenizer)}' tokenizes the generation prompt differently "
                            "on its own than inside the conversation", field="chat_template")
    return ids, mask


def tokenize_conversation(tokenizer, messages: list[dict], *, tools=None,
                          enable_thinking: bool = False) -> tuple[list[int], list[bool], int]:
    """Tokenize a conversation ending in an assistant turn, supervising that final turn.

    Returns ``(input_ids, supervised, prompt_length)``: ``supervised[i]`` is True exactly for the final
    turn's tokens after its generation prompt (reply + end-of-turn), a contiguous suffix starting at
    ``prompt_length``; ``input_ids[:prompt_length]`` equals ``render_generation_prompt`` of the same turns.
    """
    _assistant_turns(messages)
    kw = {"tools": tools, "enable_thinking": enable_thinking}
    if _has_generation_markers(getattr(tokenizer, "chat_template", None)):
        ids, mask = _marked(tokenizer, messages, kw)
        start = len(mask)
        while start > 0 and mask[start - 1]:  # the final turn: the last run of marked tokens
            start -= 1
    else:
        ids, mask = _supervise(tokenizer, messages, [len(messages) - 1], kw)
        start = mask.index(True)
    return ids, [i >= start for i in range(len(ids))], start


def reply_end_ids(tokenizer, stop_ids) -> list[int]:
    """What the chat template renders after a final reply's text, from its first stop token on (Gemma 4:
    ``<turn|>`` and a newline): the supervised tail of every SFT reply, found on a probe conversation.
    Empty when the template ends a reply with none of ``stop_ids``."""
    ids, supervised, start = tokenize_conversation(
        tokenizer, [{"role": "user", "content": "1"}, {"role": "assistant", "content": "1"}])
    stops = set(stop_ids)
    at = next((i for i in range(start, len(ids)) if ids[i] in stops), None)
    return [] if at is None else list(ids[at:])


def tokenize_turns(tokenizer, messages: list[dict], *, tools=None,
                   enable_thinking: bool = False) -> tuple[list[int], list[bool]]:
    """Tokenize a conversation ending in an assistant turn, supervising EVERY assistant turn.

    Returns ``(input_ids, supervised)``: one contiguous run of supervised tokens per assistant turn (what
    the model emits after that turn's generation prompt); the last token is supervised.
    """
    turns = _assistant_turns(messages)
    kw = {"tools": tools, "enable_thinking": enable_thinking}
    if _has_generation_markers(getattr(tokenizer, "chat_template", None)):
        return _marked(tokenizer, messages, kw)
    return _supervise(tokenizer, messages, turns, kw)


def render_generation_prompt(tokenizer, messages: list[dict], *, tools=None,
                             enable_thinking: bool = False) -> list[int]:
    """Prompt ids for sampling: the conversation without its final assistant turn (if any), rendered with
    ``add_generation_prompt=True`` by the same template as training."""
    context = list(messages)
    if context and context[-1].get("role") == "assistant":
        context = context[:-1]
    if not context:
        raise DataError("conversation has no turns before the assistant reply", field="messages")
    text = render(tokenizer, context, tools=tools, add_generation_prompt=True, enable_thinking=enable_thinking)
    return _encode(tokenizer, text)[0]
