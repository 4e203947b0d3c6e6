"""The packer (``blockdiff.data.packing.pack_rows``): deterministic, every conversation placed exactly
once, rows within capacity, never more padding than one conversation per row; packed micro-batches keep
each global sample's noise on any world size; the packing benchmark's CPU smoke run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blockdiff.data.packing import (
    best_fit_decreasing, next_fit, pack_rows, packing_efficiency, plan_cost, unpacked_cost)

ROOT = Path(__file__).resolve().parents[1]
PADS = st.sampled_from([None, 8, 128])


@st.composite
def micro_batches(draw):
    """(lengths, capacity, canvas blocks, canvas_length) of a micro-batch."""
    capacity = draw(st.integers(1, 1200))
    lengths = draw(st.lists(st.integers(1, capacity), min_size=1, max_size=24))
    blocks = [draw(st.integers(1, 4)) for _ in lengths]
    return lengths, capacity, blocks, draw(st.sampled_from([0, 4, 256]))


def _check_partition(rows, n):
    flat = [i for r in rows for i in r]
    assert sorted(flat) == list(range(n)), "every conversation exactly once"
    assert all(r == sorted(r) for r in rows) and [r[0] for r in rows] == sorted(r[0] for r in rows)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(micro_batches(), PADS)
def test_every_example_once_within_capacity(mb, pad):
    lengths, capacity, blocks, canvas = mb
    rows = pack_rows(lengths, capacity, pad, blocks, canvas)
    _check_partition(rows, len(lengths))
    assert all(sum(lengths[i] for i in r) <= capacity for r in rows)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(micro_batches(), PADS)
def test_never_more_padding_than_unpacked(mb, pad):
    lengths, capacity, blocks, canvas = mb
    rows = pack_rows(lengths, capacity, pad, blocks, canvas)
    got, ref = plan_cost(rows, lengths, blocks, pad), unpacked_cost(lengths, blocks, pad)
    assert got[0] <= ref[0]  # padded clean tokens (the logged packing_efficiency) ...
    assert packing_efficiency(lengths, rows, pad) >= packing_efficiency(lengths, [[i] for i in range(len(lengths))], pad)
    assert got[0] + canvas * got[1] <= ref[0] + canvas * ref[1]  # ... and clean + canvas tokens
    nf = plan_cost(next_fit(lengths, capacity), lengths, blocks, pad)  # next-fit, where it keeps the bound
    if nf[0] <= ref[0]:
        assert got[0] + canvas * got[1] <= nf[0] + canvas * nf[1]


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(micro_batches(), PADS)
def test_deterministic(mb, pad):
    lengths, capacity, blocks, canvas = mb
    a = pack_rows(lengths, capacity, pad, blocks, canvas)
    assert pack_rows(list(lengths), capacity, pad, list(blocks), canvas) == a
    assert pack_rows(tuple(lengths), capacity, pad, tuple(blocks), canvas) == a


def test_overlong_conversation_gets_its_own_row():
    rows = pack_rows([30, 4, 5, 6], 10)
    assert [0] in rows and all(sum([30, 4, 5, 6][i] for i in r) <= 10 for r in rows if r != [0])
    assert best_fit_decreasing([30, 4, 5, 6], 10)[0] == [0]


def test_examples():
    assert pack_rows([5, 5, 3, 9, 2, 2], 10) == [[0, 2], [1, 4, 5], [3]]  # 3 rows x 9 vs 6 x 9 unpacked
    # equal lengths that do not tile a row: next-fit pads (3 rows of 900 for 8 x 300), the packer does not
    assert pack_rows([300] * 8, 1024) == [[i] for i in range(8)]
    assert packing_efficiency([300] * 8, next_fit([300] * 8, 1024)) == pytest.approx(2400 / 2700)
    # rounding to the pad multiple counts: 100 + 100 + 50 tokens fill one 256-wide row (unpacked: 3 x 128)
    assert pack_rows([100, 100, 50], 1024, pad_to_multiple=128) == [[0, 1, 2]]
    # equal padding either way: the narrower rows win (cheaper attention)
    assert pack_rows([100, 100], 1024, pad_to_multiple=128) == [[0], [1]]
    assert pack_rows([], 10) == []


def test_gsm8k_like_efficiency():
    """The numbers docs/guide.md quotes (micro-batches of 8 and 16 GSM8K-like conversations, canvas 256,
    seq_length 1024, no rounding): unpacked ~0.81 / 0.74, next-fit ~0.81 / 0.78, the packer >= 0.94."""
    from blockdiff.data.synthetic import gsm8k_like_lengths, length_examples

    exs = length_examples(gsm8k_like_lengths(1024, seed=0), canvas_length=256, seq_length=1024, vocab_size=100)
    L, NB = [len(e.input_ids) for e in exs], [e.num_blocks for e in exs]
    for mb, floor in ((8, 0.94), (16, 0.94)):
        real = pad = pad_ref = 0
        for s in range(0, len(L) - mb + 1, mb):
            lengths = L[s:s + mb]
            real += sum(lengths)
            pad += plan_cost(pack_rows(lengths, 1024, None, NB[s:s + mb], 256), lengths)[0]
            pad_ref += unpacked_cost(lengths)[0]
        assert real / pad >= floor and real / pad_ref < 0.85, (mb, real / pad, real / pad_ref)


def test_collate_packed_layout():
    from helpers import C, random_example

    from blockdiff.data.canvas import collate_packed

    # 7, 14 and 7 tokens: unpacked 3 x 14; packed [0, 2] | [1]: 2 x 14, conversation 2 moves up
    exs = [random_example(3, [1], sample_id=10, seed=1), random_example(10, [1], sample_id=11, seed=2),
           random_example(3, [1], sample_id=12, seed=3)]
    packed, order = collate_packed(exs, C, seq_length=16)
    assert order == [0, 2, 1] and packed.input_ids.shape == (2, 14)
    assert packed.sample_ids.tolist() == [10, 12, 11]
    assert packed.real_tokens() / packed.padded_tokens() == 1.0
    assert packed.positions[0].tolist() == list(range(7)) * 2
    assert packed.doc_ids[0].tolist() == [0] * 7 + [1] * 7 and packed.doc_ids[1].tolist() == [2] * 14
    assert packed.input_ids[0, 7:].tolist() == exs[2].input_ids
    # on GPU rows are rounded to 128 columns: all three fit one row of 128
    packed, order = collate_packed(exs, C, seq_length=128, pad_to_multiple=128)
    assert packed.input_ids.shape == (1, 128) and order == [0, 1, 2]


@pytest.mark.parametrize("mb", [1, 2, 4])
def test_packed_noise_per_global_sample_on_any_world_size(tmp_path, mb):
    """rank_micro_batches with packing: whatever the world size and micro-batch size, every global sample
    lands on the same rank position as unpacked and gets the same t / block / coin / corruption."""
    from blockdiff.config.schema import demo_config_path, load_config
    from blockdiff.data import load_tiny_tokenizer
    from blockdiff.data.canvas import SFTDataset
    from blockdiff.data.synthetic import generate_multiturn
    from blockdiff.parallel.distributed import DistInfo
    from blockdiff.objective.loss import ObjectiveSettings
    from helpers import rank_micro_batches

    tok = load_tiny_tokenizer()
    ds = SFTDataset(generate_multiturn(24, seed=1), tok, canvas_length=32, seq_length=256, mask_history=False)

    def draws(world, packing, micro):
        cfg = load_config(demo_config_path(), ["--data.train_path", "x", "--data.seq_length", "256",
                                               "--train.global_batch_size", "8", "--train.micro_batch_size",
                                               str(micro), "--data.packing", str(packing).lower()])
        out = {}
        for rank in range(world):
            dist = DistInfo(rank, world, rank, torch.device("cpu"))
            for batch, noise in rank_micro_batches(3, cfg, ds, dist, 1024, ObjectiveSettings()):
                conv = noise.token_conv()
                for d, sid in enumerate(batch.sample_ids.tolist()):
                    mine = noise.layout.valid & (conv == d)
                    out[sid] = (rank, float(noise.t[d]), int(noise.block[d]), bool(noise.self_condition[d]),
                                noise.noisy[mine].tolist())
        return out

    ref = draws(1, False, 8)
    assert len(ref) == 8
    for world in (1, 2, 4):
        if 8 % (world * mb):
            continue
        got, plain = draws(world, True, mb), draws(world, False, mb)
        assert got == plain  # same rank, same draws, same corrupted tokens
        assert {k: v[1:] for k, v in got.items()} == {k: v[1:] for k, v in ref.items()}


@pytest.mark.slow
@pytest.mark.parametrize("turns", [1, 2])
def test_benchmark_cpu_smoke(tmp_path, turns):
    """benchmarks/packing.py --tiny: JSON lines for packing off and on, the same real tokens per step
    (``turns`` 2: multi-turn conversations, every assistant turn supervised)."""
    out = tmp_path / "packing.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "packing.py"), "--tiny", "--steps", "1",
                        "--warmup", "0", "--micro-batch", "8", "--turns", str(turns), "--efficiency-samples", "512",
                        "--output", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    runs = {r["packing"]: r for r in lines if r.get("kind") == "step"}
    assert set(runs) == {"off", "on"} and runs["on"]["real_tokens_per_step"] == runs["off"]["real_tokens_per_step"]
    assert runs["on"]["packing_efficiency"] >= runs["off"]["packing_efficiency"]
    assert json.loads(out.read_text())
    assert all(r["turns"] == turns for r in lines)
    for r in runs.values():  # one canvas segment per supervised assistant turn, packed or not
        if turns == 1:
            assert r["canvas_segments_per_step"] == 8
        else:
            assert r["canvas_segments_per_step"] > 8
    assert runs["on"]["canvas_segments_per_step"] == runs["off"]["canvas_segments_per_step"]
