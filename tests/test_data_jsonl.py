"""Chat JSONL validation: every error names file, 1-based line and field."""

import json

import pytest

from blockdiff.data.jsonl import iter_chat_jsonl, load_dataset_rows, read_chat_jsonl, validate_row
from blockdiff.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]}


def write_lines(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (line + "\n").encode())
    return path


def msgs(*pairs):
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs]})


BAD_CASES = [  # (line text, field in message or None, words expected in the message)
    ('{"messages": [', None, "malformed JSON"),
    (b"\xff\xfe bad bytes\n", None, "UTF-8"),
    ('[1, 2]', None, "JSON object"),
    ('{"conversation": []}', "messages", "missing"),
    ('{"messages": "hi"}', "messages", "expected a list"),
    ('{"messages": []}', "messages", "empty"),
    ('{"messages": ["hi"]}', "messages[0]", "expected an object"),
    (msgs(("user", "a"), ("bot", "b")), "messages[1].role", "'bot'"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "messages[0].content", "missing"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
     "messages[0].content", "expected a string, got int"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null}]}',
     "messages[1].content", "got null"),
    (msgs(("user", "a"), ("system", "s"), ("assistant", "b")), "messages[1].role", "only allowed as the first"),
    (msgs(("assistant", "a"), ("user", "b"), ("assistant", "c")), "messages[0].role", "wrong turn order"),
    (msgs(("system", "s"), ("user", "a"), ("user", "b"), ("assistant", "c")), "messages[2].role", "wrong turn order"),
    (msgs(("system", "s"), ("user", "a")), "messages", "no assistant turn"),
    (msgs(("user", "a"), ("assistant", "b"), ("user", "c")), "messages[2].role", "last turn must be 'assistant'"),
    (msgs(("user", "a"), ("assistant", "  \n")), "messages[1].content", "empty assistant reply"),
]


@pytest.mark.parametrize("bad,field,words", BAD_CASES)
def test_each_error_names_file_line_field(tmp_path, bad, field, words):
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD), "", bad])  # bad row on line 3
    with pytest.raises(DataError) as info:
        read_chat_jsonl(path)
    err = info.value
    assert str(err).startswith(f"{path}:3: ")
    assert err.line == 3 and str(err.file) == str(path) and err.field == field
    if field is not None:
        assert f"field '{field}'" in str(err)
    assert words in str(err)


def test_valid_rows_normalised(tmp_path):
    row = {"messages": [{"role": "system", "content": "s", "name": "x"}, {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"},
                        {"role": "assistant", "content": "a2"}], "id": 7}
    path = write_lines(tmp_path / "d.jsonl", ["\ufeff" + json.dumps(row), "   ", json.dumps(GOOD)])
    rows = list(iter_chat_jsonl(path, with_lines=True))
    assert [line for line, _ in rows] == [1, 3]
    assert rows[0][1]["messages"][0] == {"role": "system", "content": "s"}
    assert rows[1][1] == GOOD


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_chat_jsonl(tmp_path / "nope.jsonl")


def test_validate_row_without_location():
    assert str(pytest.raises(DataError, validate_row, {"messages": 3}).value).startswith("field 'messages'")


def test_load_dataset_rows_local_sources(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(GOOD)] * 2)
    assert list(load_dataset_rows(path)) == [GOOD, GOOD]
    assert list(load_dataset_rows(tmp_path, split="train")) == [GOOD, GOOD]  # dir with {split}.jsonl


@pytest.mark.slow
def test_load_dataset_rows_saved_datasets_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD, GOOD]),
                          "test": datasets.Dataset.from_list([GOOD, bad])}).save_to_disk(str(tmp_path / "ds"))
    assert list(load_dataset_rows(tmp_path / "ds", split="train")) == [GOOD, GOOD]
    with pytest.raises(DataError, match=r"ds:2: field 'messages\[1\].role'"):
        list(load_dataset_rows(tmp_path / "ds", split="test"))
    with pytest.raises(DataError, match="split 'dev' not found"):
        list(load_dataset_rows(tmp_path / "ds", split="dev"))


@pytest.mark.slow
def test_fuzz_validator_only_raises_data_error(tmp_path):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
        max_leaves=12)
    messages = st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "bot"]), "content": st.text(max_size=5)}),
        max_size=5).map(lambda m: json.dumps({"messages": m}).encode())
    lines = st.binary(max_size=40) | json_values.map(lambda v: json.dumps(v).encode()) | messages
    counter = iter(range(10**9))

    @hypothesis.settings(max_examples=300, deadline=None, database=None)
    @hypothesis.given(st.lists(lines, min_size=1, max_size=4))
    def check(raw_lines):
        path = tmp_path / f"fuzz{next(counter)}.jsonl"
        path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in raw_lines) + b"\n")
        try:
            rows = read_chat_jsonl(path)
        except DataError as e:
            assert str(e).startswith(f"{path}:")
            return
        for row in rows:
            assert validate_row(row) == row
            assert row["messages"][-1]["role"] == "assistant"

    check()
