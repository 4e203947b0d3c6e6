"""Evaluation during training (blockdiff.train.periodic_eval, blockdiff.infer.lockstep): the validation loss with fixed
noise and the sampled accuracy, equal on 1 process and on 2 processes under FSDP2 + expert parallelism.

The 2-process case is one torchrun launch (tests/dist_worker.py ``evals``) against the same function run
in this process: validation loss and sampled accuracy at two steps with unchanged weights, the tokens of
every prompt for a case where one rank's prompts all end in the first block while the other rank's go on
and a case with fewer prompts than ranks, and a 2-step training run that evaluates every step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import dist_worker  # noqa: E402
from helpers import torchrun  # noqa: E402

TINY = ["--model.num_layers", "2", "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
        "--objective.self_conditioning_prob", "0.5", "--logging.progress", "false", "--logging.tensorboard", "false",
        "--checkpoint.export_final", "false", "--eval.loss_every", "2", "--eval.loss_samples", "5",
        "--eval.accuracy_every", "4", "--eval.accuracy_samples", "3"]
CANVAS = 32  # the demo config's
# low temperature: rows become confident and stop at different steps (as in test_sampling)
SAMPLER = dict(max_new_tokens=3 * CANVAS, max_denoising_steps=8, entropy_bound=1e3, t_max=0.05, t_min=0.01)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from blockdiff.data.synthetic import write_splits

    train_path, test_path = write_splits(tmp_path_factory.mktemp("edata"), 40, 8, seed=0)
    return str(train_path), str(test_path)


def overrides(data, out, *extra):
    return ["--data.train_path", data[0], "--data.eval_path", data[1], "--train.output_dir", str(out), *TINY, *extra]


def case(prompts, seeds, eos):
    return {"prompts": prompts, "seeds": seeds, "settings": {**SAMPLER, "eos_token_ids": list(eos)}}


@pytest.mark.dist
def test_two_processes_with_fsdp_and_ep_evaluate_as_one(data, tmp_path):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 900, (n,), generator=g).tolist() for n in (5, 9, 7, 12, 6, 10, 8, 11)]
    seeds = list(range(11, 19))
    one = overrides(data, tmp_path / "one")
    # EOS ids that the even rows (rank 0's share on 2 ranks) produce in their first block and the odd rows
    # (rank 1's) do not: rank 0 is then done after one block while rank 1 samples two more
    free = dist_worker.periodic_evals(one, {"evals": False, "cases": [case(prompts, seeds, ())]})["outputs"][0]
    avoid = {t for o in free[1::2] for t in o[:CANVAS]}
    eos = [next(t for t in o[:CANVAS] if t not in avoid) for o in free[0::2]]
    spec = {"cases": [case(prompts, seeds, eos), case(prompts[1:2], seeds[1:2], eos)]}
    ref = dist_worker.periodic_evals(one, spec)
    lengths = [len(o) for o in ref["outputs"][0]]
    assert max(lengths[0::2]) < CANVAS <= min(lengths[1::2]), lengths

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({**spec, "train": True}))
    out = tmp_path / "evals.json"
    torchrun(2, "evals", out, str(spec_file), *overrides(data, tmp_path / "two", "--parallel.ep", "2"))
    got = json.loads(out.read_text())

    # fixed noise: steps 2 and 4 with unchanged weights give the same validation loss
    accuracy = {"eval_accuracy", "eval_n"}
    assert {**ref["evals"][0], "step": 4} == {k: v for k, v in ref["evals"][1].items() if k not in accuracy}
    assert {"val_loss", "val_diffusion_loss", "val_ar_loss", "val_n"} <= set(ref["evals"][0])
    assert accuracy < set(ref["evals"][1])
    assert got["evals"] == ref["evals"]  # identical, not close: validation loss and accuracy
    assert got["outputs"] == ref["outputs"]  # every prompt's tokens
    for per_rank in got["collectives"]:  # both ranks ran the same forward passes
        assert per_rank[0] == per_rank[1] and per_rank[0]["all_to_all_single"] > 0, per_rank

    from blockdiff.train.metrics import read_metrics

    logged = read_metrics(tmp_path / "two")
    assert [r["step"] for r in logged if "val_loss" in r] == [1, 2]
    assert [r["step"] for r in logged if "eval_accuracy" in r] == [2]
    assert (tmp_path / "two" / "checkpoints" / "step_00000002" / "meta.json").exists()


def test_validation_loss_does_not_depend_on_the_micro_batch_split(data, tmp_path):
    from blockdiff.config.schema import demo_config_path, load_config
    from blockdiff.parallel.distributed import DistInfo
    from blockdiff.train.periodic_eval import ValidationLoss, split_held_out
    from blockdiff.train.loading import build_model
    from blockdiff.train.setup import load_tokenizer

    values = []
    for mb in ("1", "4"):
        cfg = load_config(demo_config_path(), overrides(data, tmp_path / "r", "--train.micro_batch_size", mb))
        tok = load_tokenizer(cfg)
        model = build_model(cfg, torch.device("cpu"))
        _, held = split_held_out(cfg, None, tok, model.config.eos_token_id)
        values.append(ValidationLoss(cfg, held, model.config.vocab_size, DistInfo(0, 1, 0, torch.device("cpu")))(model))
    assert values[0]["val_n"] == values[1]["val_n"] == 5
    for k in ("val_loss", "val_diffusion_loss", "val_ar_loss"):  # the same sums, rounded in other groupings
        assert values[0][k] == pytest.approx(values[1][k], rel=1e-6)


def test_held_out_split_of_the_training_file(data, tmp_path):
    from blockdiff.config.schema import demo_config_path, load_config
    from blockdiff.data import load_tiny_tokenizer
    from blockdiff.data.canvas import SFTDataset
    from blockdiff.errors import ConfigError
    from blockdiff.train.periodic_eval import split_held_out

    tok = load_tiny_tokenizer()
    ds = SFTDataset(data[0], tok, canvas_length=CANVAS, seq_length=128)
    base = ["--data.train_path", data[0], "--train.output_dir", str(tmp_path), "--eval.loss_every", "1"]

    def split(*extra):
        cfg = load_config(demo_config_path(), [*base, *extra])
        training, held = split_held_out(cfg, ds, tok, tok.eos_token_id)
        return [e.sample_id for e in training.examples], [e.sample_id for e in held]

    kept, held = split("--eval.loss_samples", "6")
    assert len(held) == 6 and sorted(kept + held) == list(range(40)) and len(ds) == 40  # the source is untouched
    assert split("--eval.loss_samples", "6") == (kept, held)  # a seeded choice
    assert split("--eval.loss_samples", "6", "--eval.seed", "3")[1] != held
    off = load_config(demo_config_path(), base[:4])
    assert split_held_out(off, ds, tok, tok.eos_token_id) == (ds, None)
    with pytest.raises(ConfigError, match="leaves none to train on") as e:
        split("--eval.loss_samples", "40")
    assert str(e.value).startswith("--eval.loss_samples: ")  # set on the command line: the flag is named


def test_lockstep_decisions(monkeypatch):
    """Lockstep with a stand-in for the other rank's all-reduce contribution."""
    from blockdiff.infer.lockstep import Lockstep

    other = [0]

    def all_reduce(t, group=None):
        t += other[0]

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    T, F = True, False
    ls = Lockstep(3, 2)  # row 2 is a dummy (padding)
    assert ls.block_done(torch.tensor([T, T, F]))  # the dummy never delays the stop
    other[0] = 1
    assert not ls.block_done(torch.tensor([T, T, T]))  # the other rank still has a running row
    # this rank's rows all ended, the other rank's not: one row goes on as a dummy
    assert ls.rows_to_keep(torch.tensor([F, F, T])).tolist() == [0]
    other[0] = 0
    assert ls.block_done(torch.tensor([F]))
    assert ls.rows_to_keep(torch.tensor([T])).tolist() == []  # nothing live anywhere: every rank stops
    ls = Lockstep(3, 3)
    assert ls.rows_to_keep(torch.tensor([T, F, T])).tolist() == [0, 2]
    assert not ls.block_done(torch.tensor([T, F]))
