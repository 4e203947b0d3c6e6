"""GRPO (``blockdiff rl``): advantages, clipping and KL against plain loops; the ELBO estimator against the
objective; reward validation; a LoRA run's PEFT adapter; kill -9 and resume."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blockdiff.cli.main import main
from blockdiff.config.schema import demo_config_path, load_config
from blockdiff.data.synthetic import write_splits
from blockdiff.errors import ConfigError
from blockdiff.objective.loss import ObjectiveSettings, compute_loss, count_scored
from blockdiff.rl.advantages import clipped_surrogate, group_advantages, grpo_loss, k3_kl, weigh_negatives
from blockdiff.rl.elbo import canvas_reply, completion_example, elbo, elbo_micro_batch, elbo_settings
from blockdiff.rl.rewards import build_rewards, equations_reward, eval_exact, format_reward, gsm8k_exact
from blockdiff.train.metrics import read_metrics

TESTS = Path(__file__).resolve().parent
# the demo model at 1 layer, 2 prompts x 2 completions a step, 4 denoising steps: ~1 s a step on one thread
FAST = ["--model.num_layers", "1", "--rl.prompts_per_step", "2", "--rl.group_size", "2", "--rl.max_new_tokens", "32",
        "--rl.max_denoising_steps", "4", "--rl.rewards", '[{name: "rl_rewards:distinct_words", weight: 1.0}]',
        "--train.micro_batch_size", "2", "--train.global_batch_size", "2", "--train.log_every", "1",
        "--logging.progress", "false", "--logging.tensorboard", "false", "--checkpoint.export_final", "false",
        "--scheduler.warmup_steps", "0", "--optimizer.lr", "1e-3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(write_splits(tmp_path_factory.mktemp("rldata"), 24, 4, seed=0)[0])


def rl_args(data, out, steps, *extra):
    return ["--data.train_path", str(data), "--train.output_dir", str(out), "--train.max_steps", str(steps), *FAST,
            *extra]


# ------------------------------------------------------------------------------ algorithm vs plain loops


@pytest.mark.parametrize("kind", ["group_norm", "mean_only"])
def test_group_advantages_match_a_loop(kind):
    g = torch.Generator().manual_seed(0)
    G, eps = 4, 1e-4
    rewards = torch.rand(3 * G, generator=g)
    rewards[G:2 * G] = 0.5  # a group with equal rewards: advantage 0
    got = group_advantages(rewards, G, kind, eps)
    r = rewards.tolist()
    for p in range(3):
        group = r[p * G:(p + 1) * G]
        mean = sum(group) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / G)
        for i in range(G):
            want = (group[i] - mean) / (std + eps) if kind == "group_norm" else group[i] - mean
            assert got[p * G + i].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert got[G:2 * G].abs().max() == 0
    weighed = weigh_negatives(got, 0.25)
    for a, w in zip(got.tolist(), weighed.tolist()):
        assert w == pytest.approx(a * 0.25 if a < 0 else a)


def test_clipped_surrogate_kl_and_loss_match_a_loop():
    g = torch.Generator().manual_seed(1)
    n, eps, beta = 64, 0.2, 0.05
    new = torch.randn(n, generator=g) * 0.3
    old = new + torch.randn(n, generator=g) * 0.3
    ref = new + torch.randn(n, generator=g) * 0.3
    adv = torch.randn(n, generator=g)
    new_g = new.clone().requires_grad_(True)
    out = grpo_loss(new_g, old, ref, adv, eps, beta, count=2 * n)
    out["loss"].backward()
    loss, clipped, grads = 0.0, 0, []
    for a, o, r, x in zip(adv.tolist(), old.tolist(), ref.tolist(), new.tolist()):
        ratio = math.exp(x - o)
        surr = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
        kl = math.exp(r - x) - (r - x) - 1
        loss += (-surr + beta * kl) / (2 * n)
        is_clipped = (ratio > 1 + eps and a > 0) or (ratio < 1 - eps and a < 0)
        clipped += is_clipped
        # d/dx: -a * ratio where the ratio term is chosen, 0 where the clip is active; kl' = 1 - exp(r - x)
        grads.append(((0.0 if is_clipped else -a * ratio) + beta * (1 - math.exp(r - x))) / (2 * n))
        assert kl >= 0
    assert 0 < clipped < n  # both branches exercised
    assert out["loss"].item() == pytest.approx(loss, rel=1e-5)
    assert int(out["clipped"]) == clipped
    torch.testing.assert_close(new_g.grad, torch.tensor(grads), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(k3_kl(new, new), torch.zeros(n))
    surr, active = clipped_surrogate(new, new, adv, eps)  # ratio 1: the surrogate is the advantage
    torch.testing.assert_close(surr, adv)
    assert not active.any()


# ------------------------------------------------------------------------------ the estimator


@pytest.fixture(scope="module")
def tiny():
    """(model, example, objective settings): the 1-layer demo model at random init, one prompt + completion."""
    from blockdiff.train.loading import build_model

    cfg = load_config(demo_config_path(), ["--model.num_layers", "1", "--data.train_path", "x", "--train.output_dir",
                                           "y", "--model.attn_backend", "sdpa"])
    model = build_model(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(5, 1000, (20,), generator=g).tolist()
    completion = torch.randint(5, 100, (39,), generator=g).tolist() + [106]  # stopped at <turn|>
    reply = canvas_reply(completion, [106, 5])  # 39 + <turn|> + newline
    ex = completion_example(prompt, reply, canvas_length=32, seq_length=128, eos_id=1, sample_id=0)
    return model, ex, elbo_settings(ObjectiveSettings.from_config(cfg.objective)), cfg


REPLY = 41  # scored tokens of the fixture's canvas: the reply and its end, not the fill


def _elbos(model, ex, settings, cfg, streams, draws):
    """ELBOs of ``ex`` for each group of ``draws`` consecutive streams (one micro-batch)."""
    groups = [streams[i:i + draws] for i in range(0, len(streams), draws)]
    batch, noise = elbo_micro_batch([ex] * len(groups), groups, settings, cfg.data, seed=0, vocab_size=1024,
                                    device_type="cpu", scored_lengths=[REPLY] * len(groups))
    with torch.no_grad():
        return elbo(model, batch, noise, settings, draws)


def _rows(model, ex, settings, cfg, streams):
    """Per-draw diffusion CE sums and scored-token counts of ``ex`` (one row per stream)."""
    batch, noise = elbo_micro_batch([ex], [streams], settings, cfg.data, seed=0, vocab_size=1024, device_type="cpu",
                                    scored_lengths=[REPLY])
    with torch.no_grad():
        out = compute_loss(model, batch, noise, settings, count_scored(batch, noise, settings)[0], 1, per_row=True)
    return out["diffusion_rows"].double(), out["scored_rows"].double(), out["diffusion_loss"].item()


def test_estimator_mean_equals_the_objective_value(tiny):
    """The K-draw ELBO estimates -(the objective's diffusion loss) on the completion's canvas: with K = 24 its
    mean over 8 independent estimates equals compute_loss over 256 other draws within Monte Carlo error."""
    model, ex, settings, cfg = tiny
    assert ex.num_blocks == 2 and ex.input_ids[-1] == 1  # 40 tokens: two canvas blocks, EOS fill
    K = 24
    est = _elbos(model, ex, settings, cfg, list(range(8 * K)), draws=K)  # 8 independent 24-draw estimates
    ce, n, objective = _rows(model, ex, settings, cfg, list(range(1000, 1256)))
    # scored: the drawn block's reply tokens and its end, never the fill (32 in block 0, 7 + 2 in block 1)
    assert set(n.long().tolist()) == {32, 9}
    assert float(ce.sum() / n.sum()) == pytest.approx(objective, rel=1e-6)
    # Monte Carlo error of both sides (a ratio estimator: the delta method's residuals)
    resid = (ce - objective * n) / n.mean()
    se = math.sqrt(est.var().item() / len(est) + resid.var().item() / len(resid))
    assert abs(-est.mean().item() - objective) < 4 * se, (est.mean().item(), objective, se)
    # K draws in one micro-batch = the pooled K one-draw rows (same streams)
    ce1, n1, _ = _rows(model, ex, settings, cfg, list(range(8 * K)))
    torch.testing.assert_close(est.double(), -(ce1.view(-1, K).sum(1) / n1.view(-1, K).sum(1)), rtol=1e-5, atol=1e-6)


def test_shared_noise_makes_the_log_ratio_low_variance(tiny):
    """exp(new - old) with the draws shared between the two policies: the log-ratio varies far less over draws
    than with independent draws (what the ratio's clip and the KL would otherwise see)."""
    import copy

    model, ex, settings, cfg = tiny
    moved = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in moved.parameters():
            if p.requires_grad and p.ndim >= 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.002)
    streams = list(range(48))
    a, b = _elbos(model, ex, settings, cfg, streams, 1), _elbos(moved, ex, settings, cfg, streams, 1)
    c = _elbos(moved, ex, settings, cfg, list(range(500, 548)), 1)
    shared, independent = (b - a).std().item(), (c - a).std().item()
    assert shared < 0.2 * independent, (shared, independent)


def test_a_completion_is_placed_as_sft_places_the_same_reply(data):
    """The canvas RL scores for a sampled reply (its tokens, then the stop the sampler hit) is the canvas SFT
    trains on for the conversation holding that reply: the template's end of turn in place of the stop, then
    the EOS fill; an EOS stop stays, and a reply that ran to the token limit gets no end."""
    from blockdiff.data import load_tiny_tokenizer
    from blockdiff.data.canvas import build_row_example
    from blockdiff.data.chat import render_generation_prompt, reply_end_ids
    from blockdiff.data.jsonl import read_chat_jsonl

    tok = load_tiny_tokenizer()
    stops = (1, tok.convert_tokens_to_ids("<turn|>"))
    end = reply_end_ids(tok, stops)
    assert tok.convert_ids_to_tokens(end) == ["<turn|>", "\n"]
    for row in read_chat_jsonl(data)[:6]:
        messages = row["messages"]
        prompt = render_generation_prompt(tok, messages)
        sampled = tok(messages[-1]["content"], add_special_tokens=False)["input_ids"] + [end[0]]
        got = completion_example(prompt, canvas_reply(sampled, end), canvas_length=32, seq_length=128,
                                 eos_id=1, sample_id=0)
        _, _, want = build_row_example(tok, messages, canvas_length=32, seq_length=128, eos_id=1, sample_id=0)
        assert got.input_ids == want.input_ids and got.prompt_length == want.prompt_length
    assert canvas_reply([7, 8, 1], end) == [7, 8, 1]
    assert canvas_reply([7, 8], end) == [7, 8]
    assert canvas_reply([end[0]], end) == end


@pytest.mark.parametrize("group_draws", [True, False])
def test_group_draws_share_the_noise_of_a_prompts_completions(tiny, group_draws):
    """rl.group_draws: the G completions of a prompt get the same t, corruption, replacement tokens, block and
    coin in every draw (what they agree on cancels under zero-sum advantages); other prompts get other draws.
    Off: every completion has its own."""
    import types

    from blockdiff.rl.update import host_batches

    model, ex, settings, cfg = tiny
    G, P, K = 4, 2, 2
    reply = ex.input_ids[ex.prompt_length:ex.prompt_length + 20]
    rollout = types.SimpleNamespace(prompts=[types.SimpleNamespace(ids=ex.input_ids[:ex.prompt_length])] * (P * G),
                                    replies=[reply] * (P * G))
    run_cfg = load_config(demo_config_path(), ["--data.train_path", "x", "--train.output_dir", "y",
                                               "--rl.group_size", str(G), "--rl.elbo_draws", str(K),
                                               "--rl.group_draws", str(group_draws).lower(),
                                               "--train.micro_batch_size", str(P * G)])
    dist = types.SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    [(_, _, noise)] = host_batches(rollout, 3, run_cfg, 1024, 1, settings, dist)
    draws = [(noise.t[i].item(), noise.noisy[i].tolist(), noise.block[i].item(), noise.self_condition[i].item())
             for i in range(P * G * K)]
    rows = {c: draws[c * K:(c + 1) * K] for c in range(P * G)}  # completion c's K draws
    if group_draws:
        assert all(rows[c] == rows[0] for c in range(G)) and all(rows[c] == rows[G] for c in range(G, 2 * G))
        assert rows[0] != rows[G]
    else:
        assert len({repr(r) for r in rows.values()}) == P * G
    assert rows[0][0] != rows[0][1]  # the K draws of a completion differ


def test_per_row_loss_equals_the_batch_loss_with_the_same_gradients(tiny):
    model, ex, settings, cfg = tiny
    batch, noise = elbo_micro_batch([ex, ex], [[0, 1], [2, 3]], settings, cfg.data, seed=0, vocab_size=1024,
                                    device_type="cpu")
    n = count_scored(batch, noise, settings)[0]
    grads = []
    for per_row in (False, True):
        model.zero_grad()
        out = compute_loss(model, batch, noise, settings, n, 1, per_row=per_row)
        out["loss"].backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        if per_row:
            assert out["diffusion_rows"].shape == (4,) and int(out["scored_rows"].sum()) == n
    model.zero_grad()
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------ rewards


def test_builtin_rewards():
    assert gsm8k_exact("q", "3 * 4 = 12\n#### 12", "12") == 1.0
    assert gsm8k_exact("q", "#### 1,200.0", "1200") == 1.0
    assert gsm8k_exact("q", "3 * 4 = 12\n#### 13", "12") == 0.0
    assert gsm8k_exact("q", "no number", "12") == 0.0
    # the eval reads a malformed ending (the last number before `########`); the reward does not pay for it
    assert eval_exact("q", "2 * 6 = 12\n########", "12") == 1.0
    assert gsm8k_exact("q", "2 * 6 = 12\n########", "12") == 0.0
    assert gsm8k_exact("q", "#### 12 12", "12") == 0.0 and eval_exact("q", "#### 12 12", "12") == 1.0
    assert gsm8k_exact("q", "#### 7\n3 * 4 = 12\n#### 12", "12") == 1.0  # the last answer line counts
    assert equations_reward("q", "3 * 4 = 12\n12 - 2 = 10\n#### 10", None) == 1.0
    assert equations_reward("q", "3 * 4 = 12\n12 - 2 = 9\n#### 10", None) == 0.0  # one wrong step
    assert equations_reward("q", "sold 48/2 = <<48/2=24>>24 clips, $1,000 + $2,000 = $3,000", None) == 1.0
    assert equations_reward("q", "#### 12\n(2 + 3) * 4 = 20", None) == 1.0  # a line's own numbers only
    assert equations_reward("q", "the answer is 12\n#### 12", None) == 0.0  # no arithmetic shown
    assert equations_reward("q", "6 / / 2 = 3", None) == 0.0
    assert equations_reward("q", "- 3 + 4 = 7\n- 7 * 2 = 14", None) == 1.0  # list bullets
    assert equations_reward("q", "Tom (so 3 + 4 = 7 apples) eats 2: 7 - 2 = 5", None) == 1.0
    assert equations_reward("q", "-3 + 4 = 1", None) == 1.0
    assert format_reward("q", "3 * 4 = 12\n#### 12", None) == 1.0
    assert format_reward("q", "the answer is 12", None) == 0.0
    assert format_reward("q", "#### twelve", None) == 0.0
    terms = build_rewards([{"name": "gsm8k_exact", "weight": 1.0}, {"name": "format", "weight": 0.1},
                           {"name": "rl_rewards:distinct_words", "weight": 2}])
    assert [t.weight for t in terms] == [1.0, 0.1, 2.0]


def test_example_grounded_reward_checks_the_chain_from_prompt_to_answer(monkeypatch):
    """examples/dllm_rl/grounded_reward.py, resolved as a user reward: operands from the prompt or earlier
    results, the answer line repeating the last result; the arithmetic itself is not its business."""
    monkeypatch.syspath_prepend(str(TESTS.parent / "examples" / "dllm_rl"))
    (term,) = build_rewards([{"name": "grounded_reward:grounded", "weight": 1.0}])
    prompt = "Sam has 7 cards. Sam gets 1 more and then gives 5 to Ben. How many cards does Sam have now?"
    cases = {"7 + 1 = 8\n8 - 5 = 3\n#### 3": 1.0,
             "7 + 1 = 9\n9 - 5 = 4\n#### 4": 1.0,    # wrong arithmetic, but a chain
             "7 + 2 = 9\n#### 9": 0.0,                # 2 is not in the prompt
             "7 + 1 = 8\n3 - 5 = 8\n#### 8": 0.0,    # 3 is neither in the prompt nor a result
             "7 + 1 = 8\n8 - 5 = 3\n#### 4": 0.0,    # the answer is not the last result
             "#### 3": 0.0}                           # no steps
    assert {c: term.fn(prompt, c, "3") for c in cases} == cases


@pytest.mark.parametrize("name,pattern", [
    ("no_such_module_xyz:fn", r"reward 'no_such_module_xyz:fn': cannot import 'no_such_module_xyz' \(ModuleNotFound"),
    ("rl_rewards:missing", r"reward 'rl_rewards:missing': 'rl_rewards' has no function 'missing'"),
    ("rl_rewards:two_arguments", r"reward 'rl_rewards:two_arguments': expected fn\(prompt, completion, reference\)"),
    ("rl_rewards:not_finite", r"reward 'rl_rewards:not_finite' returned nan; expected a finite float on the start-up"),
    ("rl_rewards:raises", r"reward 'rl_rewards:raises' raised RuntimeError: boom"),
    ("nonsense", r"unknown reward 'nonsense': a built-in \(gsm8k_exact, format, equations\) or 'module:function'"),
])
def test_bad_reward_is_one_clear_error_before_anything_is_written(data, tmp_path, capsys, name, pattern):
    import re

    out = tmp_path / "run"
    capsys.readouterr()
    rc = main(["rl", "-c", demo_config_path(), *rl_args(data, out, 1, "--rl.rewards",
                                                       f'[{{name: "{name}", weight: 1}}]')])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("blockdiff rl: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    assert "rl.rewards" in lines[0]
    assert not out.exists()


def test_bad_rl_settings_are_located(data, tmp_path):
    with pytest.raises(ConfigError, match="rl.group_size: expected a value >= 2"):
        load_config(demo_config_path(), rl_args(data, tmp_path / "r", 1, "--rl.group_size", "1"))
    with pytest.raises(ConfigError, match="rl.prompts_per_step"):
        from blockdiff.rl.loop import check_layout

        check_layout(load_config(demo_config_path(), rl_args(data, tmp_path / "r", 1, "--rl.prompts_per_step", "3",
                                                             "--rl.group_size", "3")), 2)


# ------------------------------------------------------------------------------ runs


@pytest.mark.slow
def test_lora_rl_exports_a_peft_adapter_peft_loads(data, tmp_path):
    """A LoRA RL run with the KL to the adapter-off base; its adapter loads in peft onto the transformers base
    and gives the logits of the run's merged export."""
    import peft
    import transformers

    from blockdiff.rl.loop import rl_train
    from blockdiff.train.loading import build_model

    base_cfg = load_config(demo_config_path(), ["--model.num_layers", "1", "--data.train_path", "x",
                                                "--train.output_dir", "y"])
    base_dir = tmp_path / "base"
    build_model(base_cfg, torch.device("cpu")).save_pretrained(base_dir)
    cfg = load_config(demo_config_path(), rl_args(
        data, tmp_path / "run", 2, "--model.name_or_path", str(base_dir), "--model.from_config", "null",
        "--model.num_layers", "null", "--lora.enabled", "true", "--lora.rank", "4", "--rl.kl_beta", "0.1",
        "--checkpoint.export_final", "true", "--optimizer.lr", "1e-2"))
    run = rl_train(cfg)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["kl"] > 0  # the adapters moved away from the base
    assert main(["plot", str(run), "--out", str(tmp_path / "plots")]) in (0, None)  # `blockdiff plot` of an RL run
    assert {"reward.png", "accuracy.png", "kl.png", "loss.png"} <= {p.name for p in (tmp_path / "plots").iterdir()}
    export = run / "export"
    assert json.loads((export / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    ids = torch.randint(5, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    canvas = torch.randint(5, 1000, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir).eval()
        with_adapter = peft.PeftModel.from_pretrained(base, export / "adapter").eval()
        got = with_adapter(input_ids=ids, decoder_input_ids=canvas).logits
        merged = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(export).eval()
        want = merged(input_ids=ids, decoder_input_ids=canvas).logits
        plain = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir).eval()
        before = plain(input_ids=ids, decoder_input_ids=canvas).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want - before).abs().max() > 1e-4  # RL changed the model


def start(args, log_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "blockdiff.cli.main", "rl", "-c", demo_config_path(), *args],
                            stdout=open(log_path, "a"), stderr=subprocess.STDOUT, env=env)


def logged_steps(run_dir) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return sum(1 for ln in path.read_text().splitlines() if ln.endswith("}")) if path.exists() else 0


def trajectory(run_dir):
    keys = ("loss", "reward_mean", "reward_std", "kl", "clip_fraction", "elbo", "completion_length", "grad_norm", "lr")
    return [(r["step"], *(r[k] for k in keys)) for r in read_metrics(run_dir)]


@pytest.mark.slow
def test_kill_9_during_rollout_or_update_then_resume_is_identical(data, tmp_path):
    from blockdiff.rl.loop import rl_train

    steps = 6
    extra = ["--checkpoint.every_steps", "2", "--rl.kl_beta", "0.05", "--rl.update_iterations", "2"]
    straight = rl_train(load_config(demo_config_path(), rl_args(data, tmp_path / "straight", steps, *extra)))
    run, log_path = tmp_path / "run", tmp_path / "log.txt"
    rng = random.Random(3)
    for target in (2, 4):  # killed at a random moment after `target` logged steps (rollout or update)
        p = start(rl_args(data, run, steps, *extra), log_path)
        deadline = time.monotonic() + 240
        while logged_steps(run) < target:
            assert p.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.8))
        p.kill(), p.wait()
    p = start(rl_args(data, run, steps, *extra), log_path)
    assert p.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    got, want = trajectory(run), trajectory(straight)
    assert [r[0] for r in got] == list(range(1, steps + 1))
    assert got == want
    from safetensors.torch import load_file

    a = load_file(str(run / "checkpoints" / f"step_{steps:08d}" / "model.safetensors"))
    b = load_file(str(straight / "checkpoints" / f"step_{steps:08d}" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_update_raises_the_elbo_of_above_mean_completions_relative_to_below_mean(data, tmp_path):
    """The update's direction on its own batch: after one AdamW step on a rollout, the ELBO (same draws) of the
    positive-advantage completions rises more than that of the negative-advantage ones."""
    from blockdiff.parallel.distributed import init_distributed
    from blockdiff.rl.loop import sampler_settings
    from blockdiff.rl.rollout import PromptSet, sample_rollout
    from blockdiff.rl.update import accumulate_gradients, fixed_elbos, host_batches
    from blockdiff.train.setup import build_run, load_tokenizer

    cfg = load_config(demo_config_path(), rl_args(data, tmp_path / "run", 1, "--rl.prompts_per_step", "4",
                                                  "--rl.group_size", "4", "--rl.elbo_draws", "4",
                                                  "--train.micro_batch_size", "16", "--train.global_batch_size", "16"))
    dist = init_distributed()
    prompts = PromptSet(cfg.data.train_path, load_tokenizer(cfg), canvas_length=32, seq_length=128)
    run = build_run(cfg, dist, dataset=prompts)
    settings = elbo_settings(run.settings)
    rollout = sample_rollout(run.model, run.tokenizer, prompts, 0, prompts_per_step=4, group_size=4, seed=0,
                             sampler=sampler_settings(cfg, run.model, run.tokenizer),
                             terms=build_rewards(cfg.rl.rewards), advantage="group_norm", adv_eps=1e-4, dist=dist)
    adv = rollout.advantages
    assert (adv > 0).any() and (adv < 0).any()
    micro = host_batches(rollout, 0, cfg, 1024, 1, settings, dist)
    before = fixed_elbos(run.model, micro, settings, cfg, dist, reference=False)
    accumulate_gradients(run.model, run.params, run.optimizer, micro, adv, None, None, settings, cfg, dist, len(adv))
    run.optimizer.step()
    change = fixed_elbos(run.model, micro, settings, cfg, dist, reference=False) - before
    assert change[adv > 0].mean() > change[adv < 0].mean()


def test_demo_dev_split_is_disjoint_from_rl_prompts(tmp_path):
    from blockdiff.rl.demo import split_dev

    train = tmp_path / "train.jsonl"
    rows = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n" for i in range(10)]
    train.write_text("".join(rows))
    rl_path, dev_path = split_dev(train, 3)
    rl_rows, dev_rows = rl_path.read_text().splitlines(True), dev_path.read_text().splitlines(True)
    assert dev_rows == rows[-3:] and rl_rows == rows[:-3]
    assert train.read_text() == "".join(rows)  # the SFT demo's split is left as written


def test_demo_comparison_averages_a_prompts_draws_before_the_paired_se():
    """``compare``: each prompt's score is the mean of its draws; the SE is over prompts, as a loop computes it."""
    from blockdiff.rl.demo import compare, paired_se

    rng = random.Random(0)
    before = [[rng.random() < 0.4 for _ in range(50)] for _ in range(4)]  # [draw][prompt]
    after = [[rng.random() < 0.5 for _ in range(50)] for _ in range(4)]
    got = compare(before, after)
    b = [sum(d[i] for d in before) / 4 for i in range(50)]
    a = [sum(d[i] for d in after) / 4 for i in range(50)]
    diffs = [y - x for x, y in zip(b, a)]
    mean = sum(diffs) / 50
    assert got["n"] == 50 and got["samples_per_prompt"] == 4
    assert got["sft_accuracy"] == pytest.approx(sum(map(sum, before)) / 200)
    assert got["rl_accuracy"] == pytest.approx(sum(map(sum, after)) / 200)
    assert got["difference"] == pytest.approx(mean)
    assert got["paired_se"] == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in diffs) / 49 / 50))
    assert paired_se([True, False], [True, True]) == pytest.approx(0.5)
    one = compare(before[:1], after[:1])  # one draw: plain 0/1 exact match
    assert one["samples_per_prompt"] == 1 and one["sft_accuracy"] == sum(before[0]) / 50


def test_demo_scoring_draws_have_distinct_seeds_and_the_first_is_a_plain_eval(tmp_path):
    """Draw j of row i has sampler seed seed + j * n + i: draw 0 is ``evaluate_gsm8k`` with the seed, and the
    draws of a row are the single evals at the shifted seeds (so no draw repeats another's noise)."""
    from blockdiff.data.jsonl import read_chat_jsonl
    from blockdiff.infer.evaluate import evaluate_gsm8k
    from blockdiff.infer.sampling import SamplerSettings
    from blockdiff.model.diffusion_gemma import DiffusionGemma
    from blockdiff.rl.demo import exact_match_per_prompt
    from blockdiff.train.loading import build_model
    from blockdiff.train.setup import load_tokenizer

    cfg = load_config(demo_config_path(), ["--model.num_layers", "1", "--data.train_path", "x",
                                           "--train.output_dir", "y"])
    export = tmp_path / "export"
    build_model(cfg, torch.device("cpu")).save_pretrained(export)
    load_tokenizer(cfg).save_pretrained(export)
    rows = read_chat_jsonl(write_splits(tmp_path / "d", 8, 3, seed=0)[1])
    draws = exact_match_per_prompt(export, rows, 5, tmp_path / "eval.jsonl", samples=3)
    records = [json.loads(ln) for ln in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert len(draws) == 3 and all(len(d) == len(rows) for d in draws)
    assert [r["sample"] for r in records] == [j for j in range(3) for _ in rows]
    model = DiffusionGemma.from_pretrained(str(export)).eval()
    for j in (0, 2):
        settings = SamplerSettings.from_generation_config(export, seed=5 + j * len(rows), t_max=0.1, t_min=0.05,
                                                          max_new_tokens=model.config.canvas_length)
        evaluate_gsm8k(model, load_tokenizer(cfg), rows, settings, batch_size=100, out_jsonl=tmp_path / "one.jsonl")
        one = [json.loads(ln) for ln in (tmp_path / "one.jsonl").read_text().splitlines()]
        assert [r["output"] for r in records if r["sample"] == j] == [r["output"] for r in one]
        assert draws[j] == [r["correct"] for r in one]
    outputs = [[r["output"] for r in records if r["sample"] == j] for j in range(3)]
    assert outputs[0] != outputs[1]  # other seeds, other samples (a random 1-layer model samples freely)


@pytest.mark.slow
def test_demo_rl_end_to_end_on_a_tiny_export_takes_given_sft_scores(tmp_path):
    """``run_demo_rl`` on a 1-layer export: given SFT scores of the wrong shape fail before RL writes anything;
    given ones are used instead of scoring the export again, and the report holds the demo's fields."""
    from blockdiff.rl.demo import run_demo_rl
    from blockdiff.train.loading import build_model
    from blockdiff.train.setup import load_tokenizer

    cfg = load_config(demo_config_path(), ["--model.num_layers", "1", "--data.train_path", "x",
                                           "--train.output_dir", "y"])
    export = tmp_path / "export"
    build_model(cfg, torch.device("cpu")).save_pretrained(export)
    load_tokenizer(cfg).save_pretrained(export)
    out = tmp_path / "demo"
    small = ["--train.max_steps", "1", "--rl.prompts_per_step", "2", "--rl.group_size", "2",
             "--train.micro_batch_size", "4", "--logging.progress", "false"]
    kw = dict(n_train=12, n_test=3, n_dev=4, evaluate="dev", eval_samples=2)
    with pytest.raises(ValueError, match="sft_scores: 1 draws of \\[4\\] rows given, 2 draws of the 4 dev rows"):
        run_demo_rl(out, export, small, sft_scores=[[True] * 4], **kw)
    assert not (out / "rl").exists()
    given = [[True, True, True, True], [True, False, True, True]]
    report = run_demo_rl(out, export, small, sft_scores=given, **kw)
    assert report["n"] == 4 and report["samples_per_prompt"] == 2 and report["rl_steps"] == 1
    assert report["sft_accuracy"] == pytest.approx(7 / 8) and report["first_sample"]["sft_accuracy"] == 1.0
    assert not (out / "rl" / "eval_dev_sft.jsonl").exists() and (out / "rl" / "eval_dev_rl.jsonl").exists()
    saved = json.loads((out / "demo_rl_report_dev.json").read_text())
    assert saved["rl_accuracy"] == report["rl_accuracy"] and "paired_se" in saved
