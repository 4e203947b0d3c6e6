"""examples/dllm_sft/prep_gsm8k.py: GSM8K rows -> chat JSONL, answer verbatim."""

import importlib.util
import json
from pathlib import Path

import pytest

from blockdiff.data.jsonl import read_chat_jsonl
from blockdiff.errors import DataError

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "dllm_sft" / "prep_gsm8k.py"
ROWS = [
    {"question": "Ann has 3 pens and buys 4 more. How many pens?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "Tom has 10 apples, eats 2. How many?", "answer": "10 - 2 = 8\n#### 8"},
]


@pytest.fixture(scope="module")
def prep():
    spec = importlib.util.spec_from_file_location("prep_gsm8k", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_keeps_answer_verbatim(prep):
    out = list(prep.convert(ROWS))
    assert out[0] == {"messages": [{"role": "user", "content": ROWS[0]["question"]},
                                   {"role": "assistant", "content": ROWS[0]["answer"]}]}
    assert len(out) == 2


def test_convert_bad_row_names_row_and_field(prep):
    with pytest.raises(DataError, match="gsm8k:2: field 'answer'"):
        list(prep.convert([ROWS[0], {"question": "q", "answer": None}], source="gsm8k"))


def test_write_jsonl_output_is_valid_chat(prep, tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    assert prep.write_jsonl(prep.convert(ROWS), str(path)) == 2
    assert [r["messages"][1]["content"] for r in read_chat_jsonl(path)] == [r["answer"] for r in ROWS]


def test_main_with_local_saved_dataset(prep, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    local = tmp_path / "gsm8k_local"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(local))
    monkeypatch.chdir(tmp_path)
    assert prep.main(["--dataset", str(local), "--split", "test"]) == 0
    lines = (tmp_path / "gsm8k_chat_test.jsonl").read_text().splitlines()
    assert [json.loads(x)["messages"][1]["content"] for x in lines] == [ROWS[0]["answer"]]
    out = tmp_path / "train.jsonl"
    assert prep.main(["--dataset", str(local), "--output", str(out)]) == 0
    assert len(read_chat_jsonl(out)) == 2
    (tmp_path / "gsm8k_chat_test.jsonl").unlink()
    assert prep.main(["--dataset", str(local)]) == 0  # both splits, as the example YAMLs expect
    assert len(read_chat_jsonl(tmp_path / "gsm8k_chat_train.jsonl")) == 2
    assert len(read_chat_jsonl(tmp_path / "gsm8k_chat_test.jsonl")) == 1
