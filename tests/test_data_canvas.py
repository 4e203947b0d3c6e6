"""Canvas examples: EOS fill, multi-block responses, truncation, prompt policies, collate."""

import json

import pytest
import torch

from blockdiff.data import load_tiny_tokenizer
from blockdiff.data.canvas import CanvasBatch, Example, SFTDataset, build_example, collate, global_order
from blockdiff.errors import DataError

EOS = 1


def conv(prompt_len, response_len):
    ids = list(range(10, 10 + prompt_len + response_len))
    return ids, [False] * prompt_len + [True] * response_len, prompt_len


def build(prompt_len, response_len, canvas=4, seq=32, policy="skip", sample_id=0):
    ids, sup, plen = conv(prompt_len, response_len)
    return build_example(ids, sup, plen, canvas_length=canvas, seq_length=seq, eos_id=EOS,
                         sample_id=sample_id, prompt_policy=policy)


def test_eos_fill_to_multiple_of_canvas():
    ex = build(3, 5)
    assert ex.num_blocks == 2 and not ex.truncated and ex.prompt_length == 3
    assert ex.input_ids == list(range(10, 18)) + [EOS] * 3
    assert len(ex.input_ids) == 3 + 2 * 4


def test_exact_multiple_needs_no_fill_and_several_blocks():
    ex = build(2, 12)
    assert ex.num_blocks == 3 and EOS not in ex.input_ids and len(ex.input_ids) == 14


def test_truncation_drops_trailing_blocks():
    ex = build(6, 30, canvas=4, seq=20)  # room for (20 - 6) // 4 = 3 blocks
    assert ex.truncated and ex.num_blocks == 3
    assert ex.input_ids == list(range(10, 10 + 6 + 12))  # exactly prompt + 3 blocks, no EOS
    assert len(ex.input_ids) == 6 + 3 * 4 <= 20


def test_prompt_too_long_policies():
    assert build(17, 3, canvas=4, seq=20) is None  # 17 + 4 > 20
    assert build(16, 3, canvas=4, seq=20).num_blocks == 1  # exactly fits
    with pytest.raises(DataError, match="field 'messages': prompt is 17 tokens"):
        build(17, 3, canvas=4, seq=20, policy="fail")
    with pytest.raises(DataError, match="prompt_policy"):
        build(2, 3, policy="drop")


def test_rejects_non_suffix_supervision():
    with pytest.raises(DataError, match="contiguous suffix"):
        build_example([5, 6, 7], [False, True, False], 1, canvas_length=4, seq_length=8, eos_id=EOS, sample_id=0)


def test_collate_shapes_padding_valid():
    a, b = build(3, 5, sample_id=7), build(2, 2, sample_id=9)  # lengths 11 and 6
    batch = collate([a, b], canvas_length=4)
    assert batch.input_ids.shape == (2, 11) and batch.input_ids.dtype == torch.long
    assert batch.canvas_length == 4 and batch.batch_size == 2
    assert batch.valid.sum(1).tolist() == [11, 6]
    assert batch.input_ids[1, 6:].eq(0).all() and not batch.valid[1, 6:].any()
    assert batch.prompt_lengths.tolist() == [3, 2] and batch.num_blocks.tolist() == [2, 1]
    assert batch.sample_ids.tolist() == [7, 9]
    sup = batch.supervised_mask()
    assert sup.sum(1).tolist() == [8, 4] and not sup[:, :2].any()
    padded = collate([a, b], canvas_length=4, pad_id=0, pad_to_multiple=8)
    assert padded.input_ids.shape == (2, 16) and padded.valid.sum().item() == 17
    moved = padded.to("cpu")
    assert isinstance(moved, CanvasBatch) and torch.equal(moved.input_ids, padded.input_ids)
    with pytest.raises(DataError):
        collate([], canvas_length=4)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


def test_sft_dataset_stats_and_sample_ids(tmp_path, tok):
    long_prompt = "one " * 40
    long_answer = " ".join(["3 + 4 = 7"] * 20)
    path = write_rows(tmp_path / "d.jsonl", [chat("1 + 1?", "2"), chat(long_prompt, "2"),
                                             chat("2 + 2?", long_answer), chat("3 + 3?", "6")])
    ds = SFTDataset(path, tok, canvas_length=8, seq_length=32)
    assert ds.stats() == {"n_rows": 4, "n_kept": 3, "n_skipped_prompt_too_long": 1, "n_truncated": 1}
    assert [e.sample_id for e in ds.examples] == [0, 2, 3]  # stable source indices
    assert all(isinstance(e, Example) for e in ds)
    first = ds[0]
    reply = tok.decode(first.input_ids[first.prompt_length:])
    assert reply == "2<turn|>\n" + "<eos>" * 5  # reply + end of turn, EOS-filled to 8
    assert ds[1].truncated and len(ds[1].input_ids) == 32 - (32 - ds[1].prompt_length) % 8
    batch = ds.collate([ds[0], ds[1]])
    assert batch.input_ids.shape[1] == len(ds[1].input_ids)

    with pytest.raises(DataError, match=rf"{path}:2: field 'messages': prompt is"):
        SFTDataset(path, tok, canvas_length=8, seq_length=32, prompt_policy="fail")


def test_sft_dataset_empty_after_filtering(tmp_path, tok):
    path = write_rows(tmp_path / "d.jsonl", [chat("one " * 40, "2")] * 3)
    with pytest.raises(DataError, match="dataset is empty after filtering: 3 rows read, 3 rows skipped"):
        SFTDataset(path, tok, canvas_length=8, seq_length=32)


def test_sft_dataset_from_rows(tok):
    ds = SFTDataset([chat("1 + 1?", "2")], tok, canvas_length=4, seq_length=64)
    assert ds.n_kept == 1 and ds[0].num_blocks == 1
    ds = SFTDataset([chat("1 + 1?", "2")], tok, canvas_length=4, seq_length=64, eos_id=[1, 6])
    # "2", <turn|>, "\n", then EOS fill with the first id
    assert ds[0].input_ids[-4:] == [tok.convert_tokens_to_ids("2"), 106, tok.convert_tokens_to_ids("\n"), 1]


def iter_global_batches(order, global_batch):
    """Consecutive ``global_batch``-sized chunks of ``order`` (a trailing partial chunk is dropped)."""
    order = list(order)
    for start in range(0, len(order) - global_batch + 1, global_batch):
        yield order[start: start + global_batch]


def test_global_order_deterministic_permutation():
    a = global_order(50, epoch=0, seed=42)
    assert sorted(a) == list(range(50)) and a == global_order(50, 0, 42)
    assert a != global_order(50, 1, 42) and a != global_order(50, 0, 43)
    batches = list(iter_global_batches(a, 8))
    assert len(batches) == 6 and sum(batches, []) == a[:48]
