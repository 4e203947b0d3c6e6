"""The shipped tiny tokenizer: loads via AutoTokenizer, Gemma 4 control tokens at their real ids, blockdiff's
Gemma 4 chat template, single digits, round trip."""

import json

import pytest
from transformers import AutoTokenizer

from blockdiff.data import load_tiny_tokenizer, tiny_tokenizer_path
from blockdiff.data import build_tokenizer
from blockdiff.data.gemma4 import SPECIAL_TOKEN_IDS, project_chat_template


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


def test_loads_with_autotokenizer_as_fast():
    t = AutoTokenizer.from_pretrained(str(tiny_tokenizer_path()))
    assert t.is_fast
    assert 300 <= len(t) <= 1024  # the demo model's vocabulary covers it
    assert t.chat_template == project_chat_template()


def test_control_tokens_at_the_released_ids(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    released = {50: "<|tool_response>", 100: "<|channel>", 101: "<channel|>", 105: "<|turn>", 106: "<turn|>"}
    assert all(SPECIAL_TOKEN_IDS[i] == name for i, name in released.items())
    for i, name in SPECIAL_TOKEN_IDS.items():
        assert tok.encode(name, add_special_tokens=False) == [i] and tok.convert_ids_to_tokens(i) == name
        assert i in tok.all_special_ids  # decoded output drops them
    vocab = tok.get_vocab()
    assert sorted(vocab.values()) == list(range(len(vocab)))  # no holes: ordinary tokens fill the gaps
    assert not any(m in t for t in vocab for m in ("start_of_turn", "end_of_turn"))  # no Gemma 2/3 markers


def test_digits_are_single_tokens(tok):
    for d in "0123456789":
        assert len(tok.encode(d, add_special_tokens=False)) == 1
    pieces = tok.convert_ids_to_tokens(tok.encode("x = 1234567890", add_special_tokens=False))
    digits = [p.strip() for p in pieces if p.strip().isdigit()]
    assert digits == list("1234567890")


@pytest.mark.parametrize("text", [
    "Tom buys 3 apples at $4 each. How many dollars does Tom spend?",
    "3 * 4 = 12\n#### 12",
    "Unknown words like zyxwv and punctuation: (a), [b]; {c}! 50% off? ~`^|\\",
    "  two spaces\tand a tab\n\nand blank lines",
])
def test_round_trip_decode(tok, text):
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id  # like Gemma, plain encoding prepends <bos>
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_non_ascii_maps_to_unk(tok):
    assert tok.unk_token_id in tok.encode("café", add_special_tokens=False)


def test_shipped_files_match_build_script(tmp_path):
    build_tokenizer.write(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shipped = json.loads((tiny_tokenizer_path() / name).read_text())
        rebuilt = json.loads((tmp_path / name).read_text())
        assert shipped == rebuilt, f"{name} is stale: run python -m blockdiff.data.build_tokenizer"
    assert (tiny_tokenizer_path() / "chat_template.jinja").read_text() == (tmp_path / "chat_template.jinja").read_text()
