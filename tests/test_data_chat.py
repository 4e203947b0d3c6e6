"""Supervision masks on the shipped tiny tokenizer's Gemma 4 template: what the model emits after its
generation prompt (reply + <turn|>\\n) is supervised, the prompt never; templates that do not allow this fail
with one clear error."""

import pytest

from blockdiff.data import load_tiny_tokenizer
from blockdiff.data.chat import install_chat_template, render_generation_prompt, tokenize_conversation, tokenize_turns
from blockdiff.errors import ConfigError, DataError

U = lambda text: {"role": "user", "content": text}  # noqa: E731
CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 3, "b": 4}}}


def A(text, **extra):
    return {"role": "assistant", "content": text, **extra}


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


def split(tok, messages, **kw):
    ids, sup, plen = tokenize_conversation(tok, messages, **kw)
    assert sup == [False] * plen + [True] * (len(ids) - plen)
    return ids, plen, tok.decode(ids[:plen]), tok.decode(ids[plen:])


def runs(tok, ids, sup):
    out, cur = [], []
    for i, s in zip(ids + [None], sup + [False]):
        if s:
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    return out


def test_single_turn_supervises_reply_and_end_of_turn(tok):
    msgs = [U("What is 3 + 4?"), A("3 + 4 = 7\n#### 7")]
    ids, plen, prompt, reply = split(tok, msgs)
    assert prompt == "<bos><|turn>user\nWhat is 3 + 4?<turn|>\n<|turn>model\n"
    assert reply == "3 + 4 = 7\n#### 7<turn|>\n"
    assert ids[-2:] == [106, tok.convert_tokens_to_ids("\n")] and ids[0] == tok.bos_token_id == 2
    assert ids == tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]


def test_multi_turn_only_final_assistant_supervised(tok):
    msgs = [U("Hi"), A("Hello there"), U("What is 2 + 2?"), A("2 + 2 = 4")]
    _, _, prompt, reply = split(tok, msgs)
    assert reply == "2 + 2 = 4<turn|>\n"
    assert "<|turn>model\nHello there<turn|>\n<|turn>user\n" in prompt  # earlier reply is context


@pytest.mark.parametrize("role", ["system", "developer"])
def test_system_and_developer_turns_are_context(tok, role):
    msgs = [{"role": role, "content": " Answer briefly. "}, U("1 + 1?"), A("2")]
    _, _, prompt, reply = split(tok, msgs)
    assert prompt == "<bos><|turn>system\nAnswer briefly.<turn|>\n<|turn>user\n1 + 1?<turn|>\n<|turn>model\n"
    assert reply == "2<turn|>\n"


def test_generation_prompt_is_the_training_prefix(tok):
    msgs = [{"role": "system", "content": "Be brief."}, U("Tom has 3 pens."), A("ok"), U("5 * 6?"),
            A("5 * 6 = 30\n#### 30")]
    ids, plen, _, _ = split(tok, msgs)
    assert render_generation_prompt(tok, msgs) == ids[:plen] == render_generation_prompt(tok, msgs[:-1])


def test_thinking_off_by_default_and_reasoning_supervised(tok):
    msgs = [U("q"), A("answer", reasoning_content="step one")]
    _, _, prompt, reply = split(tok, msgs)
    assert "<|think|>" not in prompt and reply == "<|channel>thought\nstep one\n<channel|>answer<turn|>\n"
    _, _, prompt, reply = split(tok, msgs, enable_thinking=True)
    assert prompt.startswith("<bos><|turn>system\n<|think|>\n<turn|>\n") and reply.startswith("<|channel>thought")
    assert tok.decode(render_generation_prompt(tok, msgs, enable_thinking=True)) == prompt


def test_tool_call_turn_ends_on_tool_response_token(tok):
    tools = [{"type": "function", "function": {"name": "add", "description": "Add two numbers"}}]
    msgs = [U("3 + 4?"), A("", tool_calls=[CALL])]
    _, _, prompt, reply = split(tok, msgs, tools=tools)
    assert "<|tool>declaration:add{description:<|\"|>Add two numbers<|\"|>}<tool|>" in prompt
    assert reply == "<|tool_call>call:add{a:3,b:4}<tool_call|><|tool_response>"


def test_reply_after_tool_response_starts_where_the_generation_prompt_ends(tok):
    """After a tool response the Gemma 4 generation prompt adds nothing (thinking off), and the reply opens
    its own model turn: so that header is what the model must emit, and it is supervised."""
    msgs = [U("3 + 4?"), A("", tool_calls=[CALL]), {"role": "tool", "tool_call_id": "c1", "content": "7"}, A("7")]
    ids, plen, prompt, reply = split(tok, msgs)
    assert prompt.endswith("<|tool_response>response:add{value:<|\"|>7<|\"|>}<tool_response|>")
    assert reply == "<|turn>model\n7<turn|>\n"
    assert render_generation_prompt(tok, msgs) == ids[:plen]
    ids, sup = tokenize_turns(tok, msgs)
    assert runs(tok, ids, sup) == ["<|tool_call>call:add{a:3,b:4}<tool_call|><|tool_response>", "<|turn>model\n7<turn|>\n"]


def test_every_turn_keeps_what_the_full_conversation_renders(tok):
    # reasoning of a turn before the last user message is not rendered by the template: not supervised either
    msgs = [U("a"), A("b", reasoning_content="hidden"), U("c"), A("d")]
    ids, sup = tokenize_turns(tok, msgs)
    assert runs(tok, ids, sup) == ["b<turn|>\n", "d<turn|>\n"] and sup[-1]


def test_conversation_must_end_with_assistant(tok):
    with pytest.raises(DataError, match="field 'messages'"):
        tokenize_conversation(tok, [U("hi")])


def with_template(template, name="my/tok"):
    t = load_tiny_tokenizer()
    t.chat_template, t.name_or_path = template, name
    return t


def test_template_that_is_not_prefix_stable_names_the_tokenizer():
    # generation prompt says "assistant", the rendered conversation "model"
    t = with_template("{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n"
                      "{{ m.content }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>assistant\n{% endif %}")
    with pytest.raises(DataError, match=r"field 'chat_template': chat template of tokenizer 'my/tok' is not "
                                        r"prefix-stable: .*before messages\[1\]"):
        tokenize_conversation(t, [U("hi"), A("yo")])


def test_generation_markers_are_honoured():
    t = with_template("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}<|turn>user\n{{ m.content }}"
                      "<turn|>\n{% else %}<|turn>model\n{% generation %}{{ m.content }}<turn|>{% endgeneration %}\n"
                      "{% endif %}{% endfor %}")
    ids, sup, plen = tokenize_conversation(t, [U("hi"), A("two")])
    assert t.decode(ids[plen:]) == "two<turn|>" and all(sup[plen:]) and not any(sup[:plen])


def test_token_across_the_prompt_edge_is_refused():
    # prompt ends inside the word "model", which the tiny tokenizer holds as one token
    t = with_template("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}<|turn>user\n{{ m.content }}"
                      "<turn|>\n{% else %}<|turn>model {{ m.content }}<turn|>\n{% endif %}{% endfor %}"
                      "{% if add_generation_prompt %}<|turn>mod{% endif %}")
    with pytest.raises(DataError, match="merges text across the edge of the supervised region"):
        tokenize_conversation(t, [U("hi"), A("two")])


def test_template_that_drops_reasoning_is_refused():
    t = with_template("{{ bos_token }}{% for m in messages %}<|turn>{{ m.role }}\n{{ m.content }}<turn|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|turn>assistant\n{% endif %}")
    with pytest.raises(DataError, match=r"field 'messages\[1\]\.reasoning_content': .*does not render"):
        tokenize_conversation(t, [U("hi"), A("two", reasoning_content="think")])


def test_install_chat_template_file(tmp_path):
    t = load_tiny_tokenizer()
    path = tmp_path / "t.jinja"
    path.write_text("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    install_chat_template(t, path)
    assert t.chat_template == path.read_text()
    with pytest.raises(ConfigError, match=r"field 'data.chat_template': cannot read the chat template"):
        install_chat_template(t, tmp_path / "missing.jinja")
    path.write_text("{% for m in messages %}")
    with pytest.raises(ConfigError, match=r"t.jinja: field 'data.chat_template': invalid chat template"):
        install_chat_template(t, path)
