"""Synthetic GSM8K-style data: deterministic, held-out split, correct arithmetic, in-vocab."""

import re

import pytest

from blockdiff.data import load_tiny_tokenizer
from blockdiff.data.jsonl import read_chat_jsonl, validate_row
from blockdiff.data.synthetic import (
    extract_final_answer, final_answer_of_row, generate, trivial_baseline_accuracy, write_splits)

LINE = re.compile(r"^(\d+) ([-+*/]) (\d+) = (-?\d+)$")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def test_deterministic_by_seed():
    assert generate(50, seed=3) == generate(50, seed=3)
    assert generate(50, seed=3) != generate(50, seed=4)


def test_answers_follow_arithmetic():
    for row in generate(300, seed=1):
        validate_row(row)
        lines = row["messages"][-1]["content"].split("\n")
        assert 2 <= len(lines) <= 3 and lines[-1].startswith("#### ")
        value = None
        for line in lines[:-1]:
            a, op, b, result = LINE.match(line).groups()
            assert OPS[op](int(a), int(b)) == int(result) and int(result) >= 0
            value = int(result)
        assert final_answer_of_row(row) == str(value)


def test_splits_disjoint_and_readable(tmp_path):
    train_path, test_path = write_splits(tmp_path, n_train=200, n_test=50, seed=0)
    train, test = read_chat_jsonl(train_path), read_chat_jsonl(test_path)
    assert len(train) == 200 and len(test) == 50
    questions = lambda rows: {r["messages"][0]["content"] for r in rows}  # noqa: E731
    assert not questions(train) & questions(test)
    assert write_splits(tmp_path / "again", 200, 50, seed=0)[1].read_text() == test_path.read_text()


def test_vocabulary_covered_by_tiny_tokenizer():
    tok = load_tiny_tokenizer()
    for row in generate(500, seed=7):
        for msg in row["messages"]:
            ids = tok.encode(msg["content"], add_special_tokens=False)
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == msg["content"]
            # every word is one token (no character fallback), every digit its own token
            for piece in tok.convert_ids_to_tokens(ids):
                word = piece.strip()
                assert len(word) <= 1 or word.isalpha() or word == "####", piece


def test_extract_and_baseline():
    assert extract_final_answer("a\n#### 1,234") == "1234"
    assert extract_final_answer("no answer") is None
    assert extract_final_answer("#### x") is None
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"#### {a}"}]}
            for a in [3, 3, 5, 7]]
    assert trivial_baseline_accuracy(rows) == pytest.approx(0.5)
    assert trivial_baseline_accuracy([]) == 0.0
    assert trivial_baseline_accuracy(generate(500, seed=2)) < 0.2  # not trivially guessable
