"""End to end on CPU: the demo config trains, resumes bit-identically, exports a transformers model."""

import json

import pytest
import torch

from blockdiff.cli.main import main
from blockdiff.config.schema import demo_config_path, load_config
from blockdiff.data.synthetic import write_splits
from blockdiff.errors import ConfigError
from blockdiff.train.metrics import read_metrics
from blockdiff.train.loop import train

FAST = ["--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.log_every", "1",
        "--logging.progress", "false", "--logging.tensorboard", "false", "--checkpoint.export_final", "false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train_path, test_path = write_splits(d, 40, 8, seed=0)
    return str(train_path)


def cfg_for(data, out, steps, *extra):
    return load_config(demo_config_path(), ["--data.train_path", data, "--train.output_dir", str(out),
                                            "--train.max_steps", str(steps), *FAST, *extra])


def losses(run_dir):
    return [(r["step"], r["loss"], r["diffusion_loss"], r["ar_loss"]) for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(data, tmp_path):
    straight = train(cfg_for(data, tmp_path / "straight", 6, "--checkpoint.every_steps", "0"))
    # 3 steps, stop; then the same config with max_steps 6 resumes from the step-3 checkpoint
    train(cfg_for(data, tmp_path / "resumed", 3, "--checkpoint.every_steps", "3"))
    resumed = train(cfg_for(data, tmp_path / "resumed", 6, "--checkpoint.every_steps", "3"))
    a, b = losses(straight), losses(resumed)
    assert [s for s, *_ in b] == [1, 2, 3, 4, 5, 6]
    assert a == b  # identical loss values on CPU, not just close
    from safetensors.torch import load_file

    wa = load_file(str(straight / "checkpoints" / "step_00000006" / "model.safetensors"))
    wb = load_file(str(resumed / "checkpoints" / "step_00000006" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_resuming_a_finished_run_rewrites_no_checkpoint(data, tmp_path):
    """checkpoint.save_final writes the last step once: running the finished run's config again resumes at its
    end, runs no step and leaves the checkpoint's bytes (and their times) as they were."""
    run = train(cfg_for(data, tmp_path / "run", 3, "--checkpoint.every_steps", "2"))
    ckpts = run / "checkpoints"
    before = {p.relative_to(ckpts): p.stat().st_mtime_ns for p in ckpts.rglob("*") if p.is_file()}
    assert any(str(p).startswith("step_00000003") for p in before)
    train(cfg_for(data, tmp_path / "run", 3, "--checkpoint.every_steps", "2"))
    assert {p.relative_to(ckpts): p.stat().st_mtime_ns for p in ckpts.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_loss_falls_and_accumulation_split_is_equivalent(data, tmp_path):
    one = train(cfg_for(data, tmp_path / "mb4", 3, "--train.micro_batch_size", "4"))
    two = train(cfg_for(data, tmp_path / "mb1", 3, "--train.micro_batch_size", "1"))
    (a, b) = losses(one), losses(two)
    # step 1: same global batch, same noise, only the summation split differs -> float rounding only
    assert a[0][1:] == pytest.approx(b[0][1:], rel=1e-6)
    # later steps: Adam and top-k routing amplify that rounding a little, nothing more
    for (s1, *la), (s2, *lb) in zip(a[1:], b[1:]):
        assert la == pytest.approx(lb, rel=1e-3)


@pytest.mark.slow
def test_cli_train_plot_export_and_transformers_loads_it(data, tmp_path):
    run = tmp_path / "run"
    args = ["train", "-c", demo_config_path(), "--data.train_path", data, "--train.output_dir", str(run),
            "--train.max_steps", "3", *FAST[:-2]]
    assert main(args) == 0
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["n_kept"] == 40
    assert main(["plot", str(run)]) == 0
    for name in ("loss.png", "grad_norm.png", "lr.png"):
        assert (run / name).stat().st_size > 1000
    export = run / "export"
    assert (export / "config.json").exists() and (export / "tokenizer.json").exists()

    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    from blockdiff.model.diffusion_gemma import DiffusionGemma

    hf, info = DiffusionGemmaForBlockDiffusion.from_pretrained(str(export), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = DiffusionGemma.from_pretrained(str(export)).eval()
    tok = AutoTokenizer.from_pretrained(str(export))
    prompt = torch.tensor([tok.encode("A bike goes 30 miles per hour")])
    canvas = torch.randint(0, ours.config.vocab_size, (1, ours.config.canvas_length))
    with torch.no_grad():
        ref = hf.eval()(input_ids=prompt, decoder_input_ids=canvas).logits
        got = ours.denoise_logits(prompt, canvas)
    assert (ref - got).abs().max() < 1e-4

    # a second export from the checkpoint gives the same weights
    assert main(["export", str(run), "--out", str(tmp_path / "again")]) == 0
    again = DiffusionGemma.from_pretrained(str(tmp_path / "again"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


@pytest.mark.slow
def test_periodic_eval_is_logged_beside_the_loss(data, tmp_path, monkeypatch):
    from pathlib import Path

    import matplotlib.axes

    held_out = str(Path(data).with_name("test.jsonl"))
    run = train(cfg_for(data, tmp_path / "run", 2, "--eval.accuracy_every", "1", "--data.eval_path", held_out,
                        "--eval.accuracy_samples", "3", "--eval.loss_every", "1", "--eval.loss_samples", "5"))
    logged = read_metrics(run)
    evals = [r for r in logged if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 and r["eval_n"] == 3 for r in evals)
    val = [r for r in logged if "val_loss" in r]
    assert [r["step"] for r in val] == [1, 2] and all(r["val_n"] == 5 for r in val)
    for r in val:  # the training objective's parts, ar_loss_weight 1
        assert r["val_loss"] == pytest.approx(r["val_diffusion_loss"] + r["val_ar_loss"], rel=1e-12)
        assert 0 < r["val_diffusion_loss"] < 20 and 0 < r["val_ar_loss"] < 20
    assert val[1]["val_loss"] != val[0]["val_loss"]  # a training step changed the weights
    from blockdiff.train.metrics import plot_run

    labels = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **kw: labels.append(kw.get("label")) or
                        plot(ax, *a, **kw))
    assert any(p.name == "eval_accuracy.png" for p in plot_run(run))
    assert {"training loss (diffusion + AR)", "validation loss", "validation diffusion loss"} <= set(labels)


def test_refuses_to_overwrite_another_run(data, tmp_path):
    run = tmp_path / "run"
    train(cfg_for(data, run, 1, "--train.resume", "never"))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg_for(data, run, 2, "--train.resume", "never"))
    with pytest.raises(ConfigError, match="resume: must"):
        train(cfg_for(data, tmp_path / "empty", 1, "--train.resume", "must"))


def test_inconsistent_canvas_length_is_rejected(data, tmp_path, capsys):
    args = ["train", "-c", demo_config_path(), "--data.train_path", data, "--train.output_dir",
            str(tmp_path / "r"), "--data.canvas_length", "16", *FAST]
    assert main(args) == 2
    assert "data.canvas_length" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path, capsys):
    """`blockdiff demo` itself (few steps): data, train, plot, export, reload, sample, report."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--n-train", "40", "--n-test", "4",
                 "--logging.progress", "false", "--logging.tensorboard", "false"]) == 0
    report = json.loads((out / "demo_report.json").read_text())
    assert report["steps"] == 2 and report["heldout_n"] == 4
    assert 0 <= report["heldout_accuracy"] <= 1 and 0 <= report["heldout_accuracy_reference_sampler"] <= 1
    assert (out / "run" / "export" / "config.json").exists() and (out / "run" / "loss.png").exists()
    assert "held-out exact match" in capsys.readouterr().out


@pytest.mark.slow
def test_profile_window_writes_tables_and_summary(data, tmp_path):
    # one layer: the profiler's own parsing of a step's events, not the step, is what takes the time
    one_layer = ("--checkpoint.every_steps", "0", "--model.num_layers", "1")
    run = train(cfg_for(data, tmp_path / "p", 4, *one_layer, "--logging.profile_at", "2",
                        "--logging.profile_steps", "2"))
    summary = json.loads((run / "profile" / "rank0.json").read_text())
    assert summary["steps"] == 2 and summary["wall_s_per_step"] > 0
    table = (run / "profile" / "rank0.txt").read_text()
    assert "aten::mm" in table or "aten::addmm" in table  # the model's matmuls were recorded
    assert json.loads((run / "profile" / "rank0.trace.json").read_text())["traceEvents"]
    # a window reaching past the last step is closed and written when training ends
    short = train(cfg_for(data, tmp_path / "q", 3, *one_layer, "--logging.profile_at", "3",
                          "--logging.profile_steps", "5"))
    assert json.loads((short / "profile" / "rank0.json").read_text())["steps"] == 1
    off = train(cfg_for(data, tmp_path / "r", 1, *one_layer))
    assert not (off / "profile").exists()


def test_profile_host_ops_off_records_kernels_only_on_gpu(tmp_path):
    from torch.profiler import ProfilerActivity

    from blockdiff.train.metrics import StepProfiler

    def acts(device, host_ops):
        return StepProfiler(tmp_path, 1, 1, 0, torch.device(device), host_ops=host_ops).activities()

    assert acts("cuda", False) == [ProfilerActivity.CUDA]
    assert acts("cuda", True) == [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    assert acts("cpu", False) == [ProfilerActivity.CPU]  # a CPU run has nothing else to record


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_state_round_trip_continues_identically(fused):
    """AdamW state through the checkpoint's tensors (foreach, and fused as train.py uses on one GPU)."""
    from blockdiff.checkpoint.training import load_optimizer_tensors, optimizer_tensors

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused or None)

    def step(model, opt, i):
        loss = model(torch.full((2, 4), float(i))).square().sum()
        loss.backward()
        opt.step()
        opt.zero_grad()

    straight, opt = make()
    for i in range(4):
        step(straight, opt, i)
    first, opt1 = make()
    for i in range(2):
        step(first, opt1, i)
    resumed, opt2 = make()
    resumed.load_state_dict(first.state_dict())
    load_optimizer_tensors(resumed, opt2, optimizer_tensors(first, opt1), file="optimizer.safetensors")
    for i in range(2, 4):
        step(resumed, opt2, i)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for p in resumed.parameters():
        assert opt2.state[p]["step"].device == (p.device if fused else torch.device("cpu"))


def test_clipping_inside_fused_adamw_equals_clip_then_step():
    """One GPU: the clip factor goes to the fused AdamW kernel as grad_scale (no separate pass over the
    grads). Same update as clipping the grads and stepping; fused AdamW runs on CPU too."""
    from blockdiff.parallel.parallelize import clip_grad_norm_, clip_gradients

    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]
    grads = [10 * torch.randn(5, 3), 10 * torch.randn(7)]  # norm far above the clip

    def run(in_step: bool):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01, fused=True)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            norm = clip_gradients(params, opt, 1.0) if in_step else clip_grad_norm_(params, 1.0)
            opt.step()
        return params, norm

    (a, na), (b, nb) = run(False), run(True)
    assert float(na) > 1.0  # the clip is active
    torch.testing.assert_close(na, nb)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    assert not torch.equal(a[0], start[0])


def test_host_micro_batches_counts_and_losses_match_the_device_path(data):
    """The trainer's host-built micro-batches: CPU tensors with the scored indices already cached; moved
    unchanged; token counts as a device tensor that divides the loss exactly as the plain ints do."""
    from dataclasses import fields

    from blockdiff.data.canvas import SFTDataset
    from blockdiff.parallel.distributed import DistInfo, to_device
    from blockdiff.objective.loss import ObjectiveSettings, compute_loss, count_scored
    from blockdiff.train.loading import build_model
    from blockdiff.train.step import global_token_counts, host_micro_batches
    from blockdiff.train.setup import load_tokenizer

    cfg = cfg_for(data, "unused", 1)
    tok = load_tokenizer(cfg)
    model = build_model(cfg, torch.device("cpu"))
    ds = SFTDataset(cfg.data.train_path, tok, canvas_length=cfg.data.canvas_length, seq_length=cfg.data.seq_length,
                    eos_id=model.config.eos_token_id)
    settings = ObjectiveSettings.from_config(cfg.objective)
    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    host = host_micro_batches(2, cfg, ds, dist, model.config.vocab_size, settings)
    assert len(host) == 2  # global 4, micro 2
    for batch, noise in host:
        assert settings.loss_type in noise._scored_index  # computed on the host, travels with the noise
        moved = to_device(noise, dist.device)
        for f in fields(noise):
            a, b = getattr(noise, f.name), getattr(moved, f.name)
            assert type(a) is type(b) and (not isinstance(a, torch.Tensor) or torch.equal(a, b))
        assert torch.equal(moved.layout.valid, noise.layout.valid)
        assert torch.equal(moved.scored_index(settings.loss_type), noise.scored_index(settings.loss_type))
    counts = global_token_counts(host, settings, dist)
    ints = [sum(count_scored(b, n, settings)[i] for b, n in host) for i in (0, 1)]
    assert counts.dtype == torch.float64 and counts.tolist() == ints and min(ints) > 0
    batch, noise = host[0]
    with torch.no_grad():
        by_tensor = compute_loss(model, batch, noise, settings, counts[0], counts[1])
        by_int = compute_loss(model, batch, noise, settings, *ints)
    for k in by_int:
        assert by_tensor[k].dtype == by_int[k].dtype and torch.equal(by_tensor[k], by_int[k])


def test_to_device_walks_dataclasses_dicts_and_leaves_the_rest():
    from dataclasses import dataclass, field

    from blockdiff.parallel.distributed import to_device

    @dataclass
    class Inner:
        x: torch.Tensor
        n: int = 3

    @dataclass
    class Outer:
        inner: Inner
        maybe: torch.Tensor | None = None
        cache: dict = field(default_factory=dict)

    obj = Outer(Inner(torch.arange(3)), None, {"a": torch.ones(2)})
    got = to_device(obj, torch.device("meta"))  # a device other than the host's
    assert got.inner.x.device.type == "meta" and got.cache["a"].device.type == "meta"
    assert got.inner.n == 3 and got.maybe is None and obj.inner.x.device.type == "cpu"
