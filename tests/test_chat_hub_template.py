"""blockdiff's tokenization against the released DiffusionGemma chat template (the exact hub text ships in TRL's
wheel: trl/chat_templates/diffusion_gemma.jinja), installed on a tokenizer holding Gemma 4's control tokens at
their real ids (the shipped tiny tokenizer). For a few hundred generated conversations: the token ids are the
hub template's own ``apply_chat_template`` ids, the generation prompt is the supervised region's prefix, the
supervised spans are exactly what the Gemma 4 format says the model emits, and, for conversations without
tool calls, they equal the spans of TRL's {% generation %}-tagged training copy of the same template."""

import importlib.util
import random
from pathlib import Path

import pytest

from blockdiff.data import load_tiny_tokenizer
from blockdiff.data.chat import render_generation_prompt, tokenize_conversation, tokenize_turns
from blockdiff.data.gemma4 import project_chat_template
from blockdiff.data.messages import validate_row

N_CONVERSATIONS = 300


def trl_template(name: str) -> str:
    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl is not installed (pip install 'blockdiff[dev]'): the hub chat template ships in its wheel")
    path = Path(spec.origin).parent / "chat_templates" / name
    if not path.is_file():
        pytest.skip(f"this trl version does not ship {name}")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def hub():
    tok = load_tiny_tokenizer()
    tok.chat_template = trl_template("diffusion_gemma.jinja")
    tok.name_or_path = "tiny+hub-template"
    return tok


@pytest.fixture(scope="module")
def tagged():
    tok = load_tiny_tokenizer()
    tok.chat_template = trl_template("diffusion_gemma_training.jinja")
    return tok


# ---- a seeded generator of conversations ---------------------------------------------------------------

PIECES = ["Tom", " has", " 3", " apples", "12", " + ", "=", "#### 7", "é", " 日本", " naïve", "  ", "\n", "\t",
          " (a)", "{b}", ":", ",", "'q'", " $4.50", "?", "!", " zyx"]


def text(rng, edges=True, min_pieces=1):
    body = "".join(rng.choice(PIECES) for _ in range(rng.randint(min_pieces, 6)))
    if edges and rng.random() < 0.4:  # whitespace at the edges: templates trim it
        body = rng.choice([" ", "\n", "  \n", "\t"]) + body + rng.choice(["", " ", "\n\n"])
    return body if body.strip() or min_pieces == 0 else "x" + body


def value(rng, depth=0):
    kind = rng.choice(["int", "str", "bool", "none", "float"] + (["dict", "list"] if depth < 2 else []))
    return {"int": lambda: rng.randint(-5, 500), "str": lambda: text(rng, edges=False), "bool": lambda: rng.random() < .5,
            "none": lambda: None, "float": lambda: rng.choice([0.5, 2.25, -1.5]),
            "dict": lambda: {f"k{j}": value(rng, depth + 1) for j in range(rng.randint(0, 2))},
            "list": lambda: [value(rng, depth + 1) for _ in range(rng.randint(0, 2))]}[kind]()


NAMES = ["add", "get_weather", "lookup", "mul"]


def tools(rng):
    out = []
    for name in rng.sample(NAMES, rng.randint(1, 2)):
        fn = {"name": name, "description": text(rng, edges=False)}
        if rng.random() < 0.7:
            props = {f"p{j}": {"type": rng.choice(["string", "integer", "boolean"]), "description": "arg"}
                     for j in range(rng.randint(1, 2))}
            fn["parameters"] = {"type": "object", "properties": props, "required": sorted(props)[:1]}
        out.append({"type": "function", "function": fn})
    return out


def tool_calls(rng, turn):
    return [{"id": f"call_{turn}_{j}", "type": "function",
             "function": {"name": rng.choice(NAMES), "arguments": {f"a{k}": value(rng) for k in range(rng.randint(0, 3))}}}
            for j in range(rng.randint(1, 2))]


def conversation(rng):
    msgs, row = [], {}
    if rng.random() < 0.5:
        msgs.append({"role": rng.choice(["system", "developer"]),
                     "content": "" if rng.random() < 0.3 else text(rng)})  # empty system text too
    if rng.random() < 0.3:
        row["tools"] = tools(rng)
    n_users = rng.choice([1, 1, 2, 2, 3])
    for u in range(n_users):
        msgs.append({"role": "user", "content": text(rng)})
        final = u == n_users - 1
        if rng.random() < 0.35:  # a tool round: calls, one response per call, then the reply
            calls = tool_calls(rng, u)
            if final and rng.random() < 0.3:  # the supervised turn is the call itself
                msgs.append({"role": "assistant", "content": text(rng) if rng.random() < 0.5 else "", "tool_calls": calls})
                break
            msgs.append({"role": "assistant", "content": "", "tool_calls": calls})  # text: see the test below
            for call in calls:
                ref = {"tool_call_id": call["id"]} if rng.random() < 0.7 else {"name": call["function"]["name"]}
                msgs.append({"role": "tool", "content": text(rng), **ref})
        reply = {"role": "assistant", "content": text(rng)}
        if final and rng.random() < 0.3:
            reply["reasoning_content"] = text(rng, edges=False)
        msgs.append(reply)
    row["messages"] = msgs
    return validate_row(row)  # the data format blockdiff accepts: every generated row is valid


# ---- what the Gemma 4 format says each assistant turn emits ------------------------------------------

def fmt(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'<|"|>{v}<|"|>'
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{fmt(x)}" for k, x in sorted(v.items())) + "}"
    if isinstance(v, list):
        return "[" + ",".join(fmt(x) for x in v) + "]"
    return str(v)


def emitted(msgs, i):
    """The text assistant turn ``i`` must produce after its generation prompt (thinking off)."""
    m, final = msgs[i], i == len(msgs) - 1
    last_user = max(j for j, x in enumerate(msgs) if x["role"] == "user")
    out = "<|turn>model\n" if msgs[i - 1]["role"] == "tool" else ""  # the prompt after a tool response stops there
    if m.get("reasoning_content") and i > last_user:
        out += f"<|channel>thought\n{m['reasoning_content']}\n<channel|>"
    calls = "".join(f"<|tool_call>call:{c['function']['name']}{fmt(c['function']['arguments'])}<tool_call|>"
                    for c in m.get("tool_calls", []))
    if calls:  # a turn that calls tools stops on <|tool_response> (the caller appends the responses)
        return out + calls + (m["content"].strip() if final else "") + "<|tool_response>"
    return out + m["content"].strip() + "<turn|>\n"


def supervised_runs(ids, sup):
    out, cur = [], []
    for i, s in zip(ids + [None], sup + [False]):
        if s:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out


@pytest.mark.slow
def test_token_ids_and_supervised_spans_match_the_hub_template(hub, tagged):
    rng = random.Random(20260709)
    encode = lambda s: hub(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    seen = {"tools": 0, "calls": 0, "system": 0, "multi": 0, "reasoning": 0, "unicode": 0}
    for n in range(N_CONVERSATIONS):
        row = conversation(rng)
        msgs, tl = row["messages"], row.get("tools")
        want = hub.apply_chat_template(msgs, tools=tl, tokenize=True, return_dict=True)["input_ids"]

        ids, sup, plen = tokenize_conversation(hub, msgs, tools=tl)
        assert ids == want, n
        assert render_generation_prompt(hub, msgs, tools=tl) == ids[:plen], n
        final = emitted(msgs, len(msgs) - 1)
        assert ids[plen:] == encode(final), (n, final)

        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if n % 4 == 0:  # every assistant turn (data.mask_history: false); a quarter of the rows keeps this fast
            ids_all, sup_all = tokenize_turns(hub, msgs, tools=tl)
            assert ids_all == want, n
            assert supervised_runs(ids_all, sup_all) == [encode(emitted(msgs, i)) for i in turns], n
            if not any(m.get("tool_calls") for m in msgs):  # TRL's tagged copy marks the same tokens
                assert tokenize_turns(tagged, msgs, tools=tl) == (ids_all, sup_all), n
                assert tokenize_conversation(tagged, msgs, tools=tl) == (ids, sup, plen), n

        seen["tools"] += tl is not None
        seen["calls"] += any(m.get("tool_calls") for m in msgs)
        seen["system"] += msgs[0]["role"] in ("system", "developer")
        seen["multi"] += len(turns) > 1
        seen["reasoning"] += any(m.get("reasoning_content") for m in msgs)
        seen["unicode"] += any(ord(ch) > 127 for m in msgs for ch in m["content"])
    assert min(seen.values()) >= 20, seen  # every feature was exercised


def test_project_template_renders_like_the_hub_template(hub):
    """The shipped tiny tokenizer's own Gemma 4 template writes the same text as the hub's for every row
    blockdiff accepts, with and without the generation prompt and thinking."""
    ours = load_tiny_tokenizer()
    assert ours.chat_template == project_chat_template() and "<start_of_turn>" not in ours.chat_template
    rng = random.Random(7)
    for n in range(60):
        row = conversation(rng)
        cut = rng.randrange(1, len(row["messages"]))  # a prompt ending at a user, tool or assistant turn
        for msgs, kw in ((row["messages"], {}), (row["messages"][:cut], {"add_generation_prompt": True}),
                         (row["messages"][:cut], {"add_generation_prompt": True, "enable_thinking": True})):
            a = hub.apply_chat_template(msgs, tools=row.get("tools"), tokenize=False, **kw)
            b = ours.apply_chat_template(msgs, tools=row.get("tools"), tokenize=False, **kw)
            assert a == b, (n, cut, kw)


def test_hub_template_is_not_prefix_stable_for_text_beside_answered_tool_calls(hub):
    """The hub template renders a tool-calling turn's text after the tool responses and closes that turn
    when it is the last one, so the prompt of the reply that follows is no prefix of the conversation:
    one clear error (move the text into the reply after the tool responses)."""
    msgs = [{"role": "user", "content": "3 + 4?"},
            {"role": "assistant", "content": "Let me add.", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 3, "b": 4}}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "7"},
            {"role": "assistant", "content": "7"}]
    with pytest.raises(Exception, match=r"tokenizer 'tiny\+hub-template' is not prefix-stable: the conversation "
                                        r"before messages\[3\]"):
        tokenize_conversation(hub, msgs)


def test_reply_end_is_end_of_turn_and_newline_under_the_hub_template(hub):
    """What RL appends to a completion that stopped at ``<turn|>``: the hub template's end of a reply."""
    from blockdiff.data.chat import reply_end_ids

    end = reply_end_ids(hub, [hub.convert_tokens_to_ids("<eos>"), hub.convert_tokens_to_ids("<turn|>")])
    assert hub.convert_ids_to_tokens(end) == ["<turn|>", "\n"]
    assert reply_end_ids(hub, [hub.convert_tokens_to_ids("<eos>")]) == []  # no stop in the reply's end
