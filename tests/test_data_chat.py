"""Supervision masks: only the final assistant turn (content + end-of-turn) is supervised."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from blockdiff.data import load_tiny_tokenizer
from blockdiff.data.chat import (
    SUPERVISION_TEMPLATE, ensure_supervision_template, render_generation_prompt, tokenize_conversation)
from blockdiff.errors import DataError

PLAIN_GEMMA_TEMPLATE = (  # Gemma-like template without {% generation %} markers
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


def split(tok, messages):
    ids, sup, plen = tokenize_conversation(tok, messages)
    return ids, sup, plen, tok.decode(ids[:plen]), tok.decode(ids[plen:])


def test_single_turn_mask(tok):
    msgs = [{"role": "user", "content": "What is 3 + 4?"},
            {"role": "assistant", "content": "3 + 4 = 7\n#### 7"}]
    ids, sup, plen, prompt, reply = split(tok, msgs)
    assert reply == "3 + 4 = 7\n#### 7<end_of_turn>"
    assert prompt == "<bos><start_of_turn>user\nWhat is 3 + 4?<end_of_turn>\n<start_of_turn>model\n"
    assert sup == [False] * plen + [True] * (len(ids) - plen)
    assert ids[-1] == tok.convert_tokens_to_ids("<end_of_turn>")  # trailing "\n" dropped
    assert ids[0] == tok.bos_token_id


def test_multi_turn_only_final_assistant_supervised(tok):
    msgs = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "2 + 2 = 4"}]
    ids, sup, plen, prompt, reply = split(tok, msgs)
    assert reply == "2 + 2 = 4<end_of_turn>"
    assert "Hello there<end_of_turn>" in prompt  # earlier reply is context
    assert not any(sup[:plen]) and all(sup[plen:])


def test_system_message_is_context(tok):
    msgs = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "1 + 1?"},
            {"role": "assistant", "content": "2"}]
    _, _, _, prompt, reply = split(tok, msgs)
    assert prompt.startswith("<bos><start_of_turn>user\nAnswer briefly.\n\n1 + 1?")
    assert reply == "2<end_of_turn>"


def test_generation_prompt_matches_training_prefix(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tom has 3 pens."},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "5 * 6?"},
            {"role": "assistant", "content": "5 * 6 = 30\n#### 30"}]
    ids, _, plen = tokenize_conversation(tok, msgs)
    assert render_generation_prompt(tok, msgs) == ids[:plen]
    assert render_generation_prompt(tok, msgs[:-1]) == ids[:plen]


def test_conversation_must_end_with_assistant(tok):
    with pytest.raises(DataError, match="field 'messages'"):
        tokenize_conversation(tok, [{"role": "user", "content": "hi"}])


def test_ensure_template_keeps_marked_template(tok):
    assert ensure_supervision_template(tok, "keep").chat_template == SUPERVISION_TEMPLATE


def test_ensure_template_installs_when_markers_missing():
    t = load_tiny_tokenizer()
    t.chat_template = PLAIN_GEMMA_TEMPLATE
    with pytest.raises(DataError, match="no \\{% generation %\\} markers"):
        ensure_supervision_template(t, "keep")
    ensure_supervision_template(t, "auto")
    assert t.chat_template == SUPERVISION_TEMPLATE
    t.chat_template = None
    ensure_supervision_template(t, "replace")
    assert t.chat_template == SUPERVISION_TEMPLATE


def test_ensure_template_rejects_header_in_mask():
    t = load_tiny_tokenizer()
    t.chat_template = SUPERVISION_TEMPLATE.replace(
        "{{- '<start_of_turn>model\\n' -}}{%- generation -%}", "{%- generation -%}{{- '<start_of_turn>model\\n' -}}")
    assert t.chat_template != SUPERVISION_TEMPLATE
    with pytest.raises(DataError, match="header must not be supervised"):
        ensure_supervision_template(t, "keep")


def test_ensure_template_without_turn_tokens_names_tokenizer():
    raw = Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", name_or_path="my/plain-tok")
    with pytest.raises(DataError, match="tokenizer 'my/plain-tok'.*start_of_turn"):
        ensure_supervision_template(t, "auto")
    with pytest.raises(DataError, match="tokenizer 'my/plain-tok' has no chat template"):
        ensure_supervision_template(t, "keep")
    with pytest.raises(DataError, match="policy"):
        ensure_supervision_template(t, "sometimes")
