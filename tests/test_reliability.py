"""Reliability: bad input gets one clear error before training, runs survive kill -9 and
preemption, numerical faults never reach the weights, disk-full keeps the last good checkpoint, and
nothing is unpickled, template-escaped or downloaded behind the user's back.

The catalogue in docs/reliability.md points at the tests here (and at older tests that already prove a case).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blockdiff.cli.main import main
from blockdiff.config.schema import demo_config_path
from blockdiff.data.synthetic import write_splits
from blockdiff.train.metrics import read_metrics
from blockdiff.train.loop import train
from helpers import args_for, cfg_for, final_weights, inject, trajectory

STEPS = 10  # the kill / signal runs
SRC = Path(__file__).resolve().parents[1] / "src" / "blockdiff"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train_path, _ = write_splits(d, 40, 4, seed=0)
    return str(train_path)


def run_cli(capsys, *args):
    """``blockdiff train`` in-process -> (exit code, the error lines of stderr, all of stderr)."""
    capsys.readouterr()
    rc = main(["train", "-c", demo_config_path(), *args])
    err = capsys.readouterr().err
    # a library log handler bound to an earlier test's (closed) captured stderr: a pytest artefact, not ours
    err = re.sub(r"--- Logging error ---.*?\nArguments: [^\n]*\n", "", err, flags=re.S)
    assert "Traceback" not in err, err
    return rc, [ln for ln in err.splitlines() if ln.startswith("blockdiff train: error:")], err


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The uninterrupted reference run (in-process: same single CPU thread as the subprocesses)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return train(cfg_for(data, out, STEPS, "--checkpoint.every_steps", "0"))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A 2-step run with a checkpoint at step 2 (copied by the tests that damage it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    return train(cfg_for(data, out, 2, "--checkpoint.every_steps", "2"))


# ------------------------------------------------------------------------------------ 1. bad input

def bad_data(tmp_path, data, line: bytes | str):
    """The demo data with ``line`` as line 3."""
    rows = Path(data).read_bytes().splitlines(keepends=True)
    bad = line if isinstance(line, bytes) else line.encode()
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(rows[:2]) + bad.rstrip(b"\n") + b"\n" + b"".join(rows[2:10]))
    return path


def turns(*pairs):
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs]})


# (id, line 3 of the data file, regex the one error line must match after "<file>:3: ")
DATA_CASES = [
    ("malformed-json", '{"messages": [', r"malformed JSON"),
    ("non-utf8", b"\xff\xfe bad bytes", r"invalid UTF-8 at byte 0 of the line; expected UTF-8 text"),
    ("missing-messages", '{"conversation": []}', r"field 'messages': missing"),
    ("wrong-role", turns(("user", "a"), ("bot", "b")), r"field 'messages\[1\]\.role': .*'bot'"),
    ("wrong-order", turns(("assistant", "a"), ("user", "b"), ("assistant", "c")),
     r"field 'messages\[0\]\.role': .*wrong turn order"),
    ("no-assistant", turns(("system", "s"), ("user", "a")), r"field 'messages': .*no assistant turn"),
    ("empty-assistant", turns(("user", "a"), ("assistant", "  \n")), r"field 'messages\[1\]\.content': .*empty"),
]


@pytest.mark.parametrize("line,pattern", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_line_is_one_located_error_before_training(data, tmp_path, capsys, line, pattern):
    path = bad_data(tmp_path, data, line)
    out = tmp_path / "run"
    rc, errors, _ = run_cli(capsys, *args_for(path, out, 2))
    assert rc == 2 and len(errors) == 1, errors
    assert re.search(rf"error: {re.escape(str(path))}:3: {pattern}", errors[0]), errors[0]
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_prompt_too_long_fail_and_skip_policies(data, tmp_path, capsys):
    long_prompt = turns(("user", "one " * 200), ("assistant", "2"))
    path = bad_data(tmp_path, data, long_prompt)
    rc, errors, _ = run_cli(capsys, *args_for(path, tmp_path / "fail", 1, "--data.prompt_too_long", "fail"))
    assert rc == 2 and len(errors) == 1
    assert re.search(rf"{re.escape(str(path))}:3: field 'messages': prompt is \d+ tokens; prompt \+ one canvas "
                     r"block \(32\) exceeds seq_length 128", errors[0]), errors[0]
    # skip (the default): the row is counted, the run trains on the rest
    rc, errors, _ = run_cli(capsys, *args_for(path, tmp_path / "skip", 1))
    assert rc == 0 and not errors
    stats = json.loads((tmp_path / "skip" / "data_stats.json").read_text())
    assert stats["n_rows"] == 11 and stats["n_skipped_prompt_too_long"] == 1 and stats["n_kept"] == 10


def test_empty_dataset_after_filtering(tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    path.write_text((turns(("user", "one " * 200), ("assistant", "2")) + "\n") * 3)
    rc, errors, _ = run_cli(capsys, *args_for(path, tmp_path / "run", 1))
    assert rc == 2 and len(errors) == 1
    assert f"{path}: dataset is empty after filtering: 3 rows read, 3 rows skipped" in errors[0]


def test_tokenizer_without_template_or_marker_tokens(data, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1, "hi": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<eos>")
    tok.save_pretrained(tmp_path / "plain-tok")
    rc, errors, _ = run_cli(capsys, *args_for(data, tmp_path / "run", 1, "--data.tokenizer",
                                              str(tmp_path / "plain-tok")))
    assert rc == 2 and len(errors) == 1
    assert re.search(r"field 'data.chat_template': tokenizer '.*plain-tok' has no chat template", errors[0]), errors[0]
    assert not (tmp_path / "run").exists()


CONFIG_CASES = [  # (id, overrides, regex)
    ("canvas-vs-model", ["--data.canvas_length", "16"],
     r"field 'data.canvas_length': canvas_length 16 differs from the model's canvas_length 32"),
    ("seq-vs-model", ["--data.seq_length", "200000"],
     r"field 'data.seq_length': seq_length 200000 exceeds the model's max_position_embeddings 131072"),
    ("dp-vs-world", ["--parallel.dp", "2"], r"--parallel.dp: dp=2 but the world size is 1: data parallelism spans all ranks"),
    ("ep-vs-world", ["--parallel.ep", "3"], r"--parallel.ep: ep=3 does not divide the world size 1 \(experts are split across ep ranks; valid ep: \[1\]\)"),
    ("unknown-key", ["--optimizer.lrr", "1"], r"--optimizer.lrr: unknown field 'lrr' in section 'optimizer' \(did you mean 'lr'\?\)"),
    ("bad-type", ["--train.max_steps", "ten"], r"--train.max_steps: expected an integer, got string 'ten'"),
]


@pytest.mark.parametrize("extra,pattern", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_inconsistent_or_impossible_config(data, tmp_path, capsys, extra, pattern):
    out = tmp_path / "run"
    rc, errors, _ = run_cli(capsys, *args_for(data, out, 1), *extra)
    assert rc == 2 and len(errors) == 1, errors
    assert re.search(pattern, errors[0]), errors[0]
    assert not (out / "metrics.jsonl").exists()


def test_bad_yaml_type_names_file_and_line(data, tmp_path, capsys):
    text = Path(demo_config_path()).read_text().replace("  seq_length: 128", "  seq_length: long")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    line = text.splitlines().index("  seq_length: long") + 1
    capsys.readouterr()
    assert main(["train", "-c", str(cfg), *args_for(data, tmp_path / "run", 1)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}:{line}: field 'data.seq_length': expected an integer, got string 'long'" in err
    assert "Traceback" not in err


def snapshot(run_dir):
    """Bytes of every checkpoint file and of the metrics: what a failed resume must not touch."""
    run_dir = Path(run_dir)
    files = sorted(p for p in (run_dir / "checkpoints").rglob("*") if p.is_file()) + [run_dir / "metrics.jsonl"]
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in files}


def test_checkpoint_of_another_model_is_refused(finished, tmp_path, capsys, data):
    run = shutil.copytree(finished, tmp_path / "run")
    before = snapshot(run)
    rc, errors, _ = run_cli(capsys, *args_for(data, run, 4, "--model.from_config.text_config.hidden_size", "32"))
    assert rc == 2 and len(errors) == 1
    assert re.search(r"step_00000002/model.safetensors: field '[\w.]+': shape \[\d+(, \d+)*\] but the model "
                     r"expects \[\d+(, \d+)*\] \(a checkpoint of another model\?\)", errors[0]), errors[0]
    assert snapshot(run) == before


def test_corrupted_checkpoint_shard_is_refused_and_nothing_overwritten(finished, tmp_path, capsys, data):
    run = shutil.copytree(finished, tmp_path / "run")
    shard = run / "checkpoints" / "step_00000002" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    before = snapshot(run)
    rc, errors, _ = run_cli(capsys, *args_for(data, run, 4, "--checkpoint.every_steps", "2"))
    assert rc == 2 and len(errors) == 1
    assert f"error: {shard}: corrupted or unreadable tensor file" in errors[0]
    assert snapshot(run) == before  # no step trained, no checkpoint rotated, metrics not truncated


def test_output_dir_holding_another_run(finished, tmp_path, capsys, data):
    run = shutil.copytree(finished, tmp_path / "run")
    rc, errors, _ = run_cli(capsys, *args_for(data, run, 2, "--checkpoint.every_steps", "2", "--train.resume",
                                              "never"))
    assert rc == 2 and f"field 'train.output_dir': {run} already holds a run with checkpoints" in errors[0]
    # no checkpoint left, but it trained with another config: refused, naming what differs
    shutil.rmtree(run / "checkpoints")
    rc, errors, _ = run_cli(capsys, *args_for(data, run, 2, "--checkpoint.every_steps", "2", "--optimizer.lr", "1e-3"))
    assert rc == 2 and len(errors) == 1
    assert f"{run} already holds another run (its config differs in optimizer.lr)" in errors[0]


def test_run_that_failed_on_bad_data_can_be_rerun_in_place(data, tmp_path, capsys):
    path = bad_data(tmp_path, data, '{"messages": [')
    out = tmp_path / "run"
    assert run_cli(capsys, *args_for(path, out, 1))[0] == 2
    assert not out.exists()  # the run dir is created only once the data was read
    path.write_bytes(Path(data).read_bytes())  # the user fixes the file
    assert run_cli(capsys, *args_for(path, out, 1))[0] == 0


@pytest.mark.parametrize("how", ["file-in-the-way", "output-is-a-file"])
def test_unwritable_output_dir(data, tmp_path, capsys, how):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = blocker / "run" if how == "file-in-the-way" else blocker
    rc, errors, _ = run_cli(capsys, *args_for(data, out, 1))
    assert rc == 2 and len(errors) == 1
    want = "cannot write the output directory: Not a directory" if how == "file-in-the-way" else \
        "exists and is not a directory"
    assert f"error: {out}: field 'train.output_dir': {want}" in errors[0], errors[0]


@pytest.mark.slow
def test_fuzz_tokenization_and_canvas_building():
    """Random (valid or not) conversations through validate -> chat template -> canvas: either a DataError
    with a field, a counted skip, or an Example with every invariant the trainer relies on."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    from blockdiff.data import load_tiny_tokenizer
    from blockdiff.data.canvas import SFTDataset
    from blockdiff.data.jsonl import validate_row
    from blockdiff.errors import DataError

    tok = load_tiny_tokenizer()
    eot = tok.convert_tokens_to_ids("<turn|>")
    pieces = st.sampled_from(["1", "+", " ", "\n", "add", "=", "é", "\x00", "\t", "<|turn>", "<turn|>", "<|channel>",
                              "<eos>", "model\n", "{% generation %}", "{{ x }}", "####", "  "])
    text = st.lists(pieces, max_size=12).map("".join)
    roles = st.lists(st.sampled_from(["user", "assistant", "system"]), min_size=1, max_size=5)

    @hypothesis.settings(max_examples=120, deadline=None, database=None)
    @hypothesis.given(roles, st.lists(text, min_size=5, max_size=5), st.sampled_from([(4, 24), (8, 64), (2, 9)]))
    def check(role_seq, contents, sizes):
        canvas, seq = sizes
        row = {"messages": [{"role": r, "content": c} for r, c in zip(role_seq, contents)]}
        try:
            row = validate_row(row)
            ds = SFTDataset([row], tok, canvas_length=canvas, seq_length=seq)
        except DataError as e:
            assert e.field is not None or "dataset is empty after filtering" in str(e), str(e)
            return
        (ex,) = ds.examples
        assert 1 <= ex.prompt_length and ex.num_blocks >= 1
        assert len(ex.input_ids) == ex.prompt_length + ex.num_blocks * canvas <= seq
        assert all(0 <= i < len(tok) for i in ex.input_ids)
        if not ex.truncated:
            assert eot in ex.input_ids[ex.prompt_length:]  # the reply's end-of-turn is supervised
        batch = ds.collate([ex])
        assert batch.supervised_mask().sum() == ex.num_blocks * canvas

    check()


# ------------------------------------------------------------------------------ 2. kill -9, resume


def start(args, log_path, slow_checkpoint_s=None):
    """``blockdiff train`` in a subprocess; with ``slow_checkpoint_s`` each checkpoint write pauses that long
    after its model file (tests/slow_checkpoint_train.py)."""
    log = open(log_path, "a")
    cmd = [sys.executable, "-m", "blockdiff.cli.main", "train"] if slow_checkpoint_s is None else \
        [sys.executable, str(Path(__file__).with_name("slow_checkpoint_train.py")), str(slow_checkpoint_s)]
    return subprocess.Popen([*cmd, "-c", demo_config_path(), *args],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def logged_steps(run_dir) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for ln in path.read_text().splitlines() if ln.endswith("}"))


def wait_for(cond, proc, log_path, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before the moment to interrupt it:\n"
                        + Path(log_path).read_text()[-3000:])
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting:\n" + Path(log_path).read_text()[-3000:])
        time.sleep(0.02)


def check_checkpoint_invariants(run_dir, keep_last):
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return None
    complete = sorted(root.glob("step_*"))
    assert len(complete) <= keep_last + 1, complete  # K, plus one published but not yet rotated
    for d in complete:  # renamed into place only when complete
        assert json.loads((d / "meta.json").read_text())["step"] == int(d.name[5:])
    pointer = root / "latest"
    if not pointer.exists():
        return None
    latest = root / pointer.read_text().strip()
    meta = json.loads((latest / "meta.json").read_text())
    for f in ("model.safetensors", "optimizer.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(latest / f)).values())
    return meta["step"]


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_uninterrupted(data, straight, tmp_path):
    rng = random.Random(8)
    keep = 2
    run = tmp_path / "run"
    log_path = tmp_path / "log.txt"
    args = args_for(data, run, STEPS, "--checkpoint.every_steps", "2", "--checkpoint.keep_last", str(keep))
    kills = []

    # 1. at a random moment after the first step (possibly before the first checkpoint). The moments are
    # counted in steps plus a fraction of one: a delay in seconds left too few steps for 3. once steps got
    # faster (a CPU step is ~0.1-0.2 s here)
    p = start(args, log_path)
    target = rng.randint(1, 3)
    wait_for(lambda: logged_steps(run) >= target, p, log_path)
    time.sleep(rng.uniform(0.0, 0.2))
    p.kill(), p.wait()
    kills.append(("random", logged_steps(run), check_checkpoint_invariants(run, keep)))

    # 2. in the middle of a checkpoint write (model.safetensors written, optimizer not yet)
    p = start(args, log_path, slow_checkpoint_s=60)
    root = run / "checkpoints"
    partial = lambda: [d for d in root.glob(".step_*.tmp-*") if (d / "model.safetensors").exists()]  # noqa: E731
    wait_for(lambda: root.exists() and partial(), p, log_path)
    p.kill(), p.wait()
    assert partial()  # the torn checkpoint is still there...
    latest = check_checkpoint_invariants(run, keep)  # ...and `latest` names a complete one (or none yet)
    assert latest is None or latest < int(partial()[0].name.split("_")[1].split(".")[0])
    kills.append(("mid-checkpoint", logged_steps(run), latest))

    # 3. again at a random moment, after some progress
    p = start(args, log_path)
    done = logged_steps(run)
    wait_for(lambda: logged_steps(run) > max(done, (latest or 0)) + 1, p, log_path)
    time.sleep(rng.uniform(0.0, 0.2))
    p.kill(), p.wait()
    kills.append(("random", logged_steps(run), check_checkpoint_invariants(run, keep)))

    # resume to the end
    p = start(args, log_path)
    assert p.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    assert check_checkpoint_invariants(run, keep) == STEPS
    assert not list(root.glob(".step_*.tmp-*"))  # stale temp dirs are cleaned by the next save
    assert len(list(root.glob("step_*"))) == keep
    got, want = trajectory(run), trajectory(straight)
    assert [r[0] for r in got] == list(range(1, STEPS + 1)), kills
    assert got == want, kills  # identical values, every step
    a, b = final_weights(run, STEPS), final_weights(straight, STEPS)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torn_metrics_line_is_dropped_on_resume(finished, tmp_path, data):
    run = shutil.copytree(finished, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # kill -9 in the middle of an append
    train(cfg_for(data, run, 3, "--checkpoint.every_steps", "2"))
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]


# --------------------------------------------------------------------------- 3. SIGTERM / SIGUSR1


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_preemption_signal_checkpoints_and_exits_0(data, straight, tmp_path, sig):
    run = tmp_path / "run"
    log_path = tmp_path / "log.txt"
    args = args_for(data, run, STEPS, "--checkpoint.every_steps", "0")
    p = start(args, log_path)
    wait_for(lambda: logged_steps(run) >= 1, p, log_path)
    t0 = time.monotonic()
    p.send_signal(sig)
    assert p.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    assert time.monotonic() - t0 < 20  # finishes the current step only
    stopped = logged_steps(run)
    assert 1 <= stopped < STEPS
    assert check_checkpoint_invariants(run, 2) == stopped  # a checkpoint at the step it stopped
    assert f"{sig.name} received: checkpoint at step {stopped} written" in log_path.read_text()
    train(cfg_for(data, run, STEPS, "--checkpoint.every_steps", "0"))  # resume
    assert trajectory(run) == trajectory(straight)


# ------------------------------------------------------------------------------ 4. numerical faults


def expected_ids(step0: int):
    from blockdiff.train.step import step_sample_indices

    return step_sample_indices(step0, 2, 40, 42)  # no row is skipped: sample id == dataset index


@pytest.mark.parametrize("where,term", [("loss", "loss/diffusion_loss"), ("grad", "gradient")])
def test_nan_policy_stop_names_term_step_samples(data, tmp_path, capsys, monkeypatch, where, term):
    inject(monkeypatch, 3, where)
    run = tmp_path / "run"
    rc, errors, _ = run_cli(capsys, *args_for(data, run, 4, "--checkpoint.every_steps", "2",
                                              "--train.nan_policy", "stop"))
    assert rc == 2 and len(errors) == 1
    assert f"non-finite {term} at step 2 " in errors[0]  # 0-based step index 2 = the third step
    assert f"sample ids {expected_ids(2)}" in errors[0]
    assert "weights left as after the previous step (nan_policy: stop)" in errors[0]
    assert check_checkpoint_invariants(run, 2) == 2  # the last checkpoint: finite weights
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_nan_policy_skip_counts_and_keeps_weights_finite(data, tmp_path, monkeypatch, caplog):
    inject(monkeypatch, 3, "loss")
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="blockdiff"):
        train(cfg_for(data, run, 3, "--checkpoint.every_steps", "1", "--checkpoint.keep_last", "3",
                      "--train.nan_policy", "skip"))
    assert "step skipped (nan_policy: skip, 1 so far)" in caplog.text
    assert [r["nan_skipped"] for r in read_metrics(run)] == [0, 0, 1]
    w2, w3 = final_weights(run, 2), final_weights(run, 3)
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # the skipped step changed nothing
    # ... nor the optimizer: moments and step counts (the fused AdamW skips inside its kernel)
    o2, o3 = (load_file(str(run / "checkpoints" / f"step_{s:08d}" / "optimizer.safetensors")) for s in (2, 3))
    assert o2.keys() == o3.keys() and all(torch.equal(o2[k], o3[k]) for k in o2)
    assert check_checkpoint_invariants(run, 3) == 3
    # the count survives a resume (it is stored in the checkpoint)
    monkeypatch.undo()
    train(cfg_for(data, run, 4, "--checkpoint.every_steps", "1", "--checkpoint.keep_last", "3",
                  "--train.nan_policy", "skip"))
    assert read_metrics(run)[-1]["nan_skipped"] == 1
    assert all(torch.isfinite(t).all() for t in final_weights(run, 4).values())


def test_grad_norm_guard_unit():
    from blockdiff.train.guards import GradNormGuard

    g = GradNormGuard(factor=10, patience=3)
    norms = [1.0] * 10 + [50.0, 1.0, 60.0, 70.0, 80.0, 90.0, 1.0, float("nan"), 40.0, 41.0, 42.0]
    fired = [step for step, n in enumerate(norms, 1) if g.observe(step, n)]
    assert fired == [15, 21]  # 3 in a row needed; one warning per streak; NaN ignored
    assert GradNormGuard().observe(1, 1e9) is None  # no history yet: no judgement


@pytest.mark.slow
def test_grad_norm_explosion_warns_during_training(data, tmp_path, monkeypatch, caplog):
    import blockdiff.train.step as tr

    real, calls = tr.clip_gradients, []

    def clip_gradients(*a, **k):  # the real clipping; the REPORTED norm explodes from step 6 on
        calls.append(1)
        norm = real(*a, **k)
        return norm * 1000 if len(calls) >= 6 else norm

    monkeypatch.setattr(tr, "clip_gradients", clip_gradients)
    with caplog.at_level(logging.WARNING, logger="blockdiff"):
        train(cfg_for(data, tmp_path / "run", 8, "--checkpoint.every_steps", "0"))
    warnings = [r.getMessage() for r in caplog.records if "grad norm exploding" in r.getMessage()]
    assert len(warnings) == 1 and "(step 8: " in warnings[0], warnings
    assert "3 consecutive steps above 10x the running median" in warnings[0]


# ------------------------------------------------------------------------ 5. disk full / unwritable


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["OSError", "SafetensorError"])
def test_disk_full_keeps_last_good_checkpoint(data, tmp_path, capsys, monkeypatch, failure):
    import blockdiff.checkpoint.training as ck
    from safetensors import SafetensorError

    real, calls = ck.save_file, []

    def save_file(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 4:  # the second checkpoint, after its model file was written
            if failure == "OSError":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            # what safetensors really raises on an I/O error (it is not an OSError)
            raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error 28) "
                                  f"at path {path!r}")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", save_file)
    run = tmp_path / "run"
    rc, errors, _ = run_cli(capsys, *args_for(data, run, 6, "--checkpoint.every_steps", "2"))
    assert rc == 2 and len(errors) == 1, errors
    final = run / "checkpoints" / "step_00000004"
    assert f"error: {final}: could not write checkpoint (" in errors[0]
    assert "No space left on device" in errors[0] and "the previous checkpoint is intact" in errors[0]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert check_checkpoint_invariants(run, 2) == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002"]  # temp removed
    monkeypatch.undo()  # the disk has room again: the run resumes from step 2
    assert run_cli(capsys, *args_for(data, run, 6, "--checkpoint.every_steps", "2"))[0] == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------- 6. safety

UNPICKLERS = re.compile(r"\btorch\.load\(|\bpickle\.loads?\(|\bimport pickle\b|\bfrom pickle\b|\bdill\b|"
                        r"\bjoblib\.load\(|allow_pickle\s*=\s*True|trust_remote_code\s*=\s*True|"
                        r"\btorch\.jit\.load\(|weights_only\s*=\s*False")


def test_no_code_path_unpickles_or_runs_remote_code():
    hits = [f"{p.relative_to(SRC)}:{i}: {ln.strip()}" for p in sorted(SRC.rglob("*.py"))
            for i, ln in enumerate(p.read_text().splitlines(), 1) if UNPICKLERS.search(ln)]
    assert hits == []


def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path, monkeypatch, finished):
    import pickle

    from helpers import make_hf_checkpoint

    from blockdiff.checkpoint.training import load_checkpoint
    from blockdiff.errors import CheckpointError
    from blockdiff.model.hf import io as hf_io

    def boom(*a, **k):
        raise AssertionError("something tried to unpickle")

    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, name, boom)
    ckpt, _ = make_hf_checkpoint(tmp_path)  # a model dir with only pytorch_model.bin
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: only safetensors are read"):
        hf_io.load_pretrained(str(ckpt))
    # a training checkpoint whose tensors were swapped for a pickle
    step = shutil.copytree(finished / "checkpoints" / "step_00000002", tmp_path / "step")
    (step / "model.safetensors").unlink()
    (step / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))
    model = __import__("blockdiff.train.loading", fromlist=["build_model"]).build_model(
        cfg_for("x", tmp_path / "o", 1), torch.device("cpu"))
    with pytest.raises(CheckpointError, match=r"step/model\.safetensors: corrupted or unreadable tensor file"):
        load_checkpoint(step, model)


def test_chat_templates_render_in_the_sandbox(tmp_path):
    import inspect

    from blockdiff.data import chat, load_tiny_tokenizer
    from blockdiff.data.canvas import SFTDataset
    from blockdiff.errors import DataError

    source = inspect.getsource(chat)
    assert "apply_chat_template(" in source and "jinja2.Template" not in source and "Environment(" not in source
    tok = load_tiny_tokenizer()
    msgs = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]
    marker = tmp_path / "escaped"
    for attack in ["{{ ''.__class__.__mro__[1].__subclasses__() }}",
                   f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}",
                   "{{ self._TemplateReference__context }}{{ joiner.__init__.__globals__ }}"]:
        tok.chat_template = attack + "{% generation %}{{ messages[-1]['content'] }}{% endgeneration %}"
        with pytest.raises(DataError, match=r"field 'chat_template': chat template of tokenizer .* failed to "
                                            r"render: SecurityError: access to attribute '__\w+__' of .* is unsafe"):
            SFTDataset([{"messages": msgs}], tok, canvas_length=4, seq_length=64)
        assert not marker.exists()


@pytest.mark.slow
def test_no_network_unless_a_hub_id_is_asked_for(tmp_path, monkeypatch, data):
    import socket

    import huggingface_hub

    from helpers import make_hf_checkpoint

    from blockdiff.errors import CheckpointError
    from blockdiff.model.hf import io as hf_io

    ckpt, _ = make_hf_checkpoint(tmp_path)
    load_tiny_tokenizer = __import__("blockdiff.data", fromlist=["x"]).load_tiny_tokenizer
    load_tiny_tokenizer().save_pretrained(ckpt)
    hub_calls = []

    def no_hub(*a, **k):
        hub_calls.append(a)
        raise huggingface_hub.errors.LocalEntryNotFoundError("test: no network")

    def no_socket(*a, **k):
        raise AssertionError(f"network access: {a}")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(socket.socket, "connect", no_socket)
    monkeypatch.setattr(socket, "getaddrinfo", no_socket)
    # a local model dir and its tokenizer, as a training run loads them (tokenizer: the model dir)
    cfg = cfg_for(data, tmp_path / "run", 1, "--model.name_or_path", str(ckpt), "--data.tokenizer", "null")
    cfg.model.from_config = None
    from blockdiff.train.loading import build_model
    from blockdiff.train.setup import load_tokenizer

    assert build_model(cfg, torch.device("cpu")) is not None and load_tokenizer(cfg) is not None
    # the demo (from_config + the shipped tokenizer) trains without a hub call
    train(cfg_for(data, tmp_path / "demo", 1))
    assert hub_calls == []
    # a hub id is the only thing that reaches for the hub
    with pytest.raises(CheckpointError, match="cannot download org/some-model"):
        hf_io.load_pretrained("org/some-model")
    assert len(hub_calls) == 1
