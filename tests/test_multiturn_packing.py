"""Multi-turn SFT (every assistant turn a canvas segment) and packing (several conversations per row):
masks never leak, a packed batch's loss equals the unpacked one, data supervision masks, and the
``mask_history: true`` path is unchanged. The packer itself: tests/test_packing.py."""

import pytest
import torch

from blockdiff.data import load_tiny_tokenizer
from blockdiff.data.canvas import SFTDataset, _runs, build_example, build_multiturn_example, collate, collate_packed
from blockdiff.data.chat import tokenize_conversation, tokenize_turns
from blockdiff.model.diffusion_gemma import segment_layout
from blockdiff.objective.loss import ObjectiveSettings, compute_loss, count_scored, draw_noise
from helpers import C, V, random_example, tiny_model

EOS = 1


def canvas_logits(model, batch, canvas):
    R = canvas.shape[1]
    layout = segment_layout(batch.segment_table(), R, C, packed=batch.packed)
    _, cache = model.encode(batch.input_ids, batch.valid, positions=batch.positions, doc_ids=batch.doc_ids)
    return model.lm_logits(model.decode(canvas, cache, layout)), layout


# ---- leakage --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_multiturn_canvas_equals_inference_and_never_leaks():
    model = tiny_model()
    ex = random_example(5, [2, 1, 2], seed=1)
    batch = collate([ex], C)
    R = ex.num_blocks * C
    canvas = torch.randint(3, V, (1, R), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base, layout = canvas_logits(model, batch, canvas)
        starts = layout.block_starts[0, ::C].tolist()
        L = batch.input_ids.shape[1]
        for k, s in enumerate(starts):
            blk = slice(k * C, (k + 1) * C)
            # the training forward equals inference on the clean prefix before the block
            _, cache = model.encode(batch.input_ids[:, :s])
            ref = model.lm_logits(model.decode(canvas[:, blk], cache))
            torch.testing.assert_close(base[:, blk], ref, atol=1e-5, rtol=1e-5)
            # own block's and later clean tokens (later turns, the gaps after) are invisible
            ids = batch.input_ids.clone()
            ids[0, s:] = (ids[0, s:] + 7) % (V - 3) + 3
            got, _ = canvas_logits(model, type(batch)(**{**batch.__dict__, "input_ids": ids}), canvas)
            torch.testing.assert_close(got[:, blk], base[:, blk], atol=1e-5, rtol=0)  # MoE expert batches change: fp rounding only
            # an earlier clean token (earlier turn or the prompt) moves them
            if s > 0:
                ids = batch.input_ids.clone()
                ids[0, s - 1] = (ids[0, s - 1] + 7) % (V - 3) + 3
                got, _ = canvas_logits(model, type(batch)(**{**batch.__dict__, "input_ids": ids}), canvas)
                assert (got[:, blk] - base[:, blk]).abs().max() > 1e-3
        assert L == starts[-1] + C


def test_packed_rows_isolate_conversations():
    model = tiny_model()
    a, b = random_example(4, [1, 2], sample_id=0, seed=3), random_example(6, [1], sample_id=1, seed=4)
    packed, order = collate_packed([a, b], C, seq_length=64)
    assert packed.input_ids.shape[0] == 1 and order == [0, 1]
    R = packed.segment_table()[0, :, 2].sum().item() * C
    canvas = torch.randint(3, V, (1, R), generator=torch.Generator().manual_seed(5))
    na = a.num_blocks * C
    with torch.no_grad():
        base, layout = canvas_logits(model, packed, canvas)
        # conversation a's canvas equals a run alone (positions restart, nothing of b is read) ...
        alone, _ = canvas_logits(model, collate([a], C), canvas[:, :na])
        torch.testing.assert_close(base[:, :na], alone, atol=1e-5, rtol=1e-5)
        # ... and so does b's (it starts at position 0 although it sits after a in the row)
        alone_b, _ = canvas_logits(model, collate([b], C), canvas[:, na:])
        torch.testing.assert_close(base[:, na:], alone_b, atol=1e-5, rtol=1e-5)
        # perturb every clean token of b and b's canvas: a's logits do not move
        ids, cv = packed.input_ids.clone(), canvas.clone()
        in_b = packed.doc_ids[0] == 1
        ids[0, in_b] = (ids[0, in_b] + 5) % (V - 3) + 3
        cv[0, na:] = (cv[0, na:] + 5) % (V - 3) + 3
        got, _ = canvas_logits(model, type(packed)(**{**packed.__dict__, "input_ids": ids}), cv)
        torch.testing.assert_close(got[:, :na], base[:, :na], atol=1e-5, rtol=0)  # MoE expert batches change: fp rounding only
        # perturb a (clean and canvas): b's logits do not move
        ids, cv = packed.input_ids.clone(), canvas.clone()
        in_a = packed.doc_ids[0] == 0
        ids[0, in_a] = (ids[0, in_a] + 5) % (V - 3) + 3
        cv[0, :na] = (cv[0, :na] + 5) % (V - 3) + 3
        got, _ = canvas_logits(model, type(packed)(**{**packed.__dict__, "input_ids": ids}), cv)
        torch.testing.assert_close(got[:, na:], base[:, na:], atol=1e-5, rtol=0)  # MoE expert batches change: fp rounding only
        # the encoder does not read across conversations either
        h, _ = model.encode(packed.input_ids, packed.valid, positions=packed.positions, doc_ids=packed.doc_ids)
        h_a, _ = model.encode(collate([a], C).input_ids)
        torch.testing.assert_close(h[:, : len(a.input_ids)], h_a, atol=1e-5, rtol=1e-5)


# ---- loss: packed == unpacked -------------------------------------------------------------------

def four_conversations():
    return [random_example(4, [1, 2], sample_id=10, seed=6), random_example(3, [1], sample_id=11, seed=7),
            random_example(7, [2], sample_id=12, seed=8), random_example(5, [1, 1], sample_id=13, seed=9)]


@pytest.mark.parametrize("loss_type,reduction", [("all_supervised", "token"), ("reweighted", "token"),
                                                 ("all_supervised", "example")])
def test_packed_loss_equals_unpacked(loss_type, reduction):
    torch.manual_seed(0)
    model = tiny_model().train()
    exs = four_conversations()
    stream = torch.tensor([100, 101, 102, 103])
    settings = ObjectiveSettings(loss_type=loss_type, eps=0.2, self_conditioning_prob=0.5, ar_loss_weight=0.7,
                                 ar_loss_reduction=reduction)
    kw = dict(seed=3, vocab_size=V, eps=0.2, sc_prob=0.5)

    flat = collate(exs, C)
    n_flat = draw_noise(flat, stream, **kw)
    packed, order = collate_packed(exs, C, seq_length=40)
    assert packed.input_ids.shape[0] < len(exs)  # really packed
    n_packed = draw_noise(packed, stream[order], **kw)
    # the same per-conversation draws
    assert torch.equal(n_packed.t, n_flat.t[order]) and torch.equal(n_packed.block, n_flat.block[order])
    assert torch.equal(n_packed.self_condition, n_flat.self_condition[order])
    counts = count_scored(flat, n_flat, settings)
    assert counts == count_scored(packed, n_packed, settings)

    out_flat = compute_loss(model, flat, n_flat, settings, *counts)
    out_packed = compute_loss(model, packed, n_packed, settings, *counts)
    for k in ("loss", "diffusion_loss", "ar_loss"):  # fp32: only summation order differs
        torch.testing.assert_close(out_packed[k], out_flat[k], atol=1e-5, rtol=1e-5)
    g_flat = torch.autograd.grad(out_flat["loss"], model.embed_tokens.weight)[0]
    g_packed = torch.autograd.grad(out_packed["loss"], model.embed_tokens.weight)[0]
    torch.testing.assert_close(g_packed, g_flat, atol=1e-4, rtol=1e-3)  # grads: reduction order


@pytest.mark.parametrize("scope", ["sequence", "response"])
def test_ar_loss_per_example_mean(scope):
    """``ar_loss_reduction: example``: each conversation's mean CE over its own AR targets, then the mean
    over the conversations, packed or not (multi-turn conversations of different lengths)."""
    model = tiny_model()
    with torch.no_grad():  # logits far from uniform: the conversations' mean CEs differ
        model.embed_tokens.weight.mul_(20)
    exs = four_conversations()

    def ce_of(ex):  # plain: the conversation alone, its targets written out by hand
        ids = torch.tensor([ex.input_ids])
        h, _ = model.encode(ids)
        ce = torch.nn.functional.cross_entropy(model.lm_logits(h[0, :-1]), ids[0, 1:], reduction="none")
        if scope == "response":  # targets inside the supervised turns
            pos = torch.arange(1, ids.shape[1])
            ce = ce[sum((pos >= s) & (pos < s + n * C) for s, n in ex.segment_list()).bool()]
        return ce

    with torch.no_grad():
        per_token = [ce_of(ex) for ex in exs]
    expected = sum(ce.mean() for ce in per_token) / len(exs)
    assert abs(float(torch.cat(per_token).mean() - expected)) > 1e-2  # the two reductions really differ
    settings = ObjectiveSettings(ar_loss_reduction="example", ar_loss_scope=scope, self_conditioning_prob=0.0)
    stream = torch.arange(4)
    with torch.no_grad():
        for batch, order in ((collate(exs, C), list(range(4))), collate_packed(exs, C, seq_length=40)):
            noise = draw_noise(batch, stream[order], seed=0, vocab_size=V, eps=0.2, sc_prob=0.0)
            n_diff, n_examples = count_scored(batch, noise, settings)
            assert n_examples == 4
            got = compute_loss(model, batch, noise, settings, n_diff, n_examples)["ar_loss"]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_segmented_noise_matches_reference_draws():
    """A single-turn conversation drawn through the segment path gets the reference noise."""
    exs = [random_example(3, [2], seed=1), random_example(5, [1], seed=2)]
    ref_batch = collate(exs, C)
    assert ref_batch.segments is None
    seg_batch = collate(exs, C)
    seg_batch.segments = seg_batch.segment_table().clone()
    stream = torch.tensor([7, 9])
    ref = draw_noise(ref_batch, stream, seed=1, vocab_size=V, eps=0.1, sc_prob=0.5)
    seg = draw_noise(seg_batch, stream, seed=1, vocab_size=V, eps=0.1, sc_prob=0.5)
    for f in ("t", "block", "self_condition", "noisy", "clean", "corrupted"):
        assert torch.equal(getattr(ref, f), getattr(seg, f)), f
    assert torch.equal(ref.scored("all_supervised"), seg.scored("all_supervised"))


def test_one_block_scored_among_all_turns():
    ex = random_example(3, [1, 2, 1], seed=0)
    batch = collate([ex], C)
    chosen = set()
    for s in range(40):
        noise = draw_noise(batch, torch.tensor([s]), seed=0, vocab_size=V, eps=0.1, sc_prob=0.5)
        sc = noise.scored("all_supervised")[0]
        assert int(sc.sum()) == C
        chosen.add(int(noise.layout.blocks[0][sc][0]))
    assert chosen == {0, 1, 2, 3}


# ---- data ----------------------------------------------------------------------------------------

def test_build_multiturn_example_segments_and_fill():
    # prompt 3, turn 1 (5 tokens), user 2, turn 2 (2 tokens)
    ids = list(range(10, 22))
    sup = [False] * 3 + [True] * 5 + [False] * 2 + [True] * 2
    ex = build_multiturn_example(ids, sup, canvas_length=4, seq_length=64, eos_id=EOS, sample_id=3)
    assert ex.segments == [(3, 2), (13, 1)] and ex.num_blocks == 3 and ex.prompt_length == 3
    # the EOS fill follows each turn in the clean sequence too (canvas positions == clean positions)
    assert ex.input_ids == list(range(10, 18)) + [EOS] * 3 + [18, 19] + [20, 21, EOS, EOS]
    # truncation: the second turn does not fit -> dropped; a partial turn keeps whole blocks
    ex = build_multiturn_example(ids, sup, canvas_length=4, seq_length=15, eos_id=EOS, sample_id=3)
    assert ex.truncated and ex.segments == [(3, 2)] and len(ex.input_ids) == 11
    ex = build_multiturn_example(ids, sup, canvas_length=4, seq_length=9, eos_id=EOS, sample_id=3)
    assert ex.truncated and ex.segments == [(3, 1)] and ex.input_ids == list(range(10, 17))
    assert build_multiturn_example(ids, sup, canvas_length=4, seq_length=6, eos_id=EOS, sample_id=3) is None
    # one turn: exactly build_example's output
    sup1 = [False] * 7 + [True] * 5
    a = build_multiturn_example(ids, sup1, canvas_length=4, seq_length=64, eos_id=EOS, sample_id=1)
    b = build_example(ids, sup1, 7, canvas_length=4, seq_length=64, eos_id=EOS, sample_id=1)
    assert (a.input_ids, a.prompt_length, a.num_blocks, a.truncated) == \
        (b.input_ids, b.prompt_length, b.num_blocks, b.truncated)


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


def multi_chat():
    return {"messages": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"},
                         {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
                         {"role": "user", "content": "3 + 3?"}, {"role": "assistant", "content": "6"}]}


def test_multiturn_supervision_masks(tok):
    ids, sup = tokenize_turns(tok, multi_chat()["messages"])
    runs = [tok.decode(ids[i:j]) for i, j in _runs(sup)]
    assert runs == ["2<turn|>\n", "4<turn|>\n", "6<turn|>\n"]
    ds = SFTDataset([multi_chat()], tok, canvas_length=4, seq_length=256, mask_history=False)
    ex = ds[0]
    assert len(ex.segments) == 3
    for s, n in ex.segments:  # each segment: the turn + end-of-turn, EOS-filled in the clean sequence
        text = tok.decode(ex.input_ids[s: s + n * C])
        assert text.endswith("<turn|>\n" + "<eos>" * (4 - 3))
    batch = ds.collate([ex])
    assert int(batch.supervised_mask().sum()) == ex.num_blocks * C == 12


def test_mask_history_true_is_todays_output(tok):
    rows = [multi_chat(), {"messages": [{"role": "user", "content": "5 + 5?"}, {"role": "assistant", "content": "10"}]}]
    ds = SFTDataset(rows, tok, canvas_length=4, seq_length=256)
    ds_true = SFTDataset(rows, tok, canvas_length=4, seq_length=256, mask_history=True)
    for row, e, e2 in zip(rows, ds, ds_true):
        ids, sup, plen = tokenize_conversation(tok, row["messages"])
        ref = build_example(ids, sup, plen, canvas_length=4, seq_length=256, eos_id=tok.eos_token_id,
                            sample_id=e.sample_id)
        assert e == ref == e2 and e.segments is None
    batch = ds.collate(list(ds))
    assert batch.segments is None and batch.doc_ids is None and batch.positions is None
    # false on a single-turn row gives the same tokens and layout as the reference
    ds_false = SFTDataset(rows[1:], tok, canvas_length=4, seq_length=256, mask_history=False)
    a, b = ds_false[0], ds[1]
    assert (a.input_ids, a.prompt_length, a.num_blocks) == (b.input_ids, b.prompt_length, b.num_blocks)


def test_config_fields(tmp_path):
    from blockdiff.config.schema import DataSection

    d = DataSection(train_path="x")
    assert d.mask_history is True and d.packing is False


@pytest.mark.slow
def test_train_step_packed_equals_unpacked_and_logs_efficiency(tmp_path):
    """End to end: one training step with packing gives the unpacked step's loss (same global batch,
    same noise) and logs packing_efficiency."""
    from blockdiff.config.schema import demo_config_path, load_config
    from blockdiff.data.synthetic import write_splits
    from blockdiff.train.metrics import read_metrics
    from blockdiff.train.loop import train

    train_path, _ = write_splits(tmp_path / "data", 16, 4, seed=0)
    rows = {}
    for packing in ("false", "true"):
        cfg = load_config(demo_config_path(), [
            "--data.train_path", str(train_path), "--train.output_dir", str(tmp_path / packing),
            "--train.max_steps", "1", "--train.global_batch_size", "4", "--train.micro_batch_size", "4",
            "--train.log_every", "1", "--logging.progress", "false", "--logging.tensorboard", "false",
            "--checkpoint.export_final", "false", "--checkpoint.every_steps", "0",
            "--data.packing", packing, "--data.mask_history", "false"])
        rows[packing] = [r for r in read_metrics(train(cfg)) if "loss" in r][0]
    assert rows["true"]["loss"] == pytest.approx(rows["false"]["loss"], rel=1e-4)
    # logged in both modes; the packer never pads more than one conversation per row (tests/test_packing.py)
    assert all(0 < rows[k]["packing_efficiency"] <= 1 for k in rows)
    assert rows["true"]["packing_efficiency"] >= rows["false"]["packing_efficiency"]
