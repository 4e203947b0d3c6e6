"""The memory plan (``blockdiff plan``): exact per-rank state, the released model's 8-GPU layout on meta
tensors, and bad input.

The state figures of the plan (built on meta under the fake process group) must equal, rank by rank and
byte for byte, what the processes of a real gloo run hold after a training step: local parameter
elements and shapes, and the storages behind parameters (FSDP2's padded shards), gradients and AdamW
states. The demo model's vocabulary is set to 1027 there so the embedding's rows do not divide by the
world size (FSDP2 pads the last ranks' shards).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from blockdiff.cli.main import main as cli
from blockdiff.config.schema import demo_config_path, load_config
from blockdiff.errors import ConfigError
from blockdiff.train.loading import model_config
from blockdiff.plan.estimate import make_plan, simulate

sys.path.insert(0, str(Path(__file__).parent))
from helpers import TINY, torchrun  # noqa: E402

PADDED = ["--model.from_config.text_config.vocab_size", "1027"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from blockdiff.data.synthetic import write_splits

    return str(write_splits(tmp_path_factory.mktemp("plandata"), 40, 8, seed=0)[0])


@pytest.mark.dist
@pytest.mark.parametrize("nproc,extra", [
    (2, ["--parallel.ep", "2"]),
    (4, ["--parallel.ep", "2", "--lora.enabled", "true", "--lora.experts", "true"]),
], ids=["2-ranks-ep2-full", "4-ranks-ep2-lora"])
def test_exact_figures_equal_the_live_ranks(data, tmp_path, nproc, extra):
    args = ["--data.train_path", data, "--train.output_dir", str(tmp_path / "run"), *TINY, *PADDED, *extra]
    out = tmp_path / "state"
    torchrun(nproc, "state", out, *args)
    live = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)]
    _, planned = simulate(load_config(demo_config_path(), args), nproc, device_type="cpu")
    assert [s.rank for s in planned] == list(range(nproc))
    for got, want in zip(live, planned):
        assert got["frozen_with_grad"] == 0
        assert {n: tuple(s) for n, s in got["shapes"].items()} == want.shapes
        assert (got["params"], got["weights"], got["grads"], got["optimizer"]) == \
            (want.params, want.weights, want.grads, want.optimizer)
    # the padding is real: the last rank holds fewer embedding rows than it allocates
    last = planned[-1]
    assert last.shapes["embed_tokens.weight"][0] < planned[0].shapes["embed_tokens.weight"][0]
    assert last.weights > 4 * last.params  # fp32 shards, padded to the first rank's rows
    if "--lora.enabled" in extra:  # only the adapters train
        assert 0 < last.grads < last.weights


# ---------------------------------------------------------------------------------------- released layout


def released_config_dir(tmp_path) -> Path:
    """config.json of google/diffusiongemma-26B-A4B-it: transformers' defaults + the released values."""
    import transformers

    text = dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                num_global_key_value_heads=2, sliding_window=1024, num_experts=128, top_k_experts=8,
                moe_intermediate_size=704, max_position_embeddings=262144, final_logit_softcapping=30.0,
                rms_norm_eps=1e-6)
    vision = dict(hidden_size=1152, num_hidden_layers=27)
    out = tmp_path / "diffusiongemma-26B-A4B-it"
    transformers.DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=256).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def released_sft(tmp_path_factory):
    d = released_config_dir(tmp_path_factory.mktemp("released"))
    return lambda *over: load_config("examples/dllm_sft/diffusion_gemma_sft.yaml",
                                     ["--model.name_or_path", str(d), *over])


@pytest.mark.slow
@pytest.mark.parametrize("ep", [8, 4])
def test_released_model_on_8_meta_ranks(released_sft, ep):
    cfg = released_sft("--parallel.ep", str(ep))
    mc = model_config(cfg)
    assert [i for i, t in enumerate(mc.layer_types) if t == "full_attention"] == [5, 11, 17, 23, 29]
    ranks = make_plan(cfg, 8, 80).ranks  # simulated once per process (the JSON test reads the same)
    assert [s.rank for s in ranks] == list(range(8))
    assert sum(s.params for s in ranks) == 25_250_986_752  # every element on exactly one rank
    edp = 8 // ep
    for s in ranks:
        sh = s.shapes
        # experts: E/ep per EP rank, each sharded over the edp ranks holding the same experts
        assert sh["layers.0.experts.gate_up_proj"] == (128 // ep // edp, 1408, 2816)
        assert sh["layers.29.experts.down_proj"] == (128 // ep // edp, 2816, 704)
        # everything else: FSDP2 row shards over all 8 ranks
        assert sh["embed_tokens.weight"] == (262144 // 8, 2816)
        assert sh["layers.0.self_attn.q_proj.weight"] == (16 * 256 // 8, 2816)
        assert sh["layers.5.self_attn.q_proj.weight"] == (16 * 512 // 8, 2816)
        assert sh["layers.5.self_attn.k_proj.weight"] == (2 * 512 // 8, 2816)
        assert "layers.5.self_attn.v_proj.weight" not in sh and "layers.4.self_attn.v_proj.weight" in sh
        assert sh["layers.0.router.proj.weight"] == (128 // 8, 2816)
        # units: the root, each layer, each layer's experts (on the edp mesh)
        units = {u.name: u for u in s.units}
        assert len(units) == 61 and units[""].mesh_size == 8
        assert {units[f"layers.{i}"].mesh_size for i in range(30)} == {8}
        assert {units[f"layers.{i}.experts"].mesh_size for i in range(30)} == {edp}
        assert units["layers.0.experts"].params == ["layers.0.experts.gate_up_proj", "layers.0.experts.down_proj"]
        # AdamW groups: one per mesh; the frozen router in none
        assert [g["mesh"] for g in s.param_groups] == [["dp"], ["edp"]]
        dense, experts = (set(g["params"]) for g in s.param_groups)
        assert experts == {f"layers.{i}.experts.{n}" for i in range(30) for n in ("gate_up_proj", "down_proj")}
        assert not any(".router." in n for n in dense | experts)
        assert len(dense) + len(experts) == len(sh) - 3 * 30
    # every rank the same state (all dims divide): 25.25B x 16 B / 8
    assert len({(s.weights, s.grads, s.optimizer) for s in ranks}) == 1
    assert ranks[0].weights == 4 * 25_250_986_752 // 8


def test_released_plan_json_and_what_does_not_fit(released_sft, capsys, tmp_path):
    cfg = released_sft()
    plan = make_plan(cfg, 8, 80).as_json()
    assert plan["gpus"] == 8 and plan["fits"] and plan["peak_gib"] < 80
    assert plan["optimizer_gib"] == pytest.approx(2 * plan["weights_gib"], rel=1e-3)
    assert plan["activations_no_ac_gib"] > plan["activations_ac_gib"] > 0
    # full SFT cannot fit one GPU: the CLI prints the plan, then one error line with the numbers, exit 2
    d = cfg.model.name_or_path
    code = cli(["plan", "-c", "examples/dllm_sft/diffusion_gemma_sft.yaml", "--model.name_or_path", d,
                "--gpus", "1", "--parallel.ep", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and json.loads(out)["fits"] is False
    assert "does not fit: 1 GPU(s) of 80.0 GiB: weights 94.07" in err and "headroom -" in err


# ---------------------------------------------------------------------------------------- command line


def demo_args(tmp_path, *more):
    return ["plan", "-c", demo_config_path(), "--data.train_path", "x.jsonl", "--train.output_dir",
            str(tmp_path / "run"), *more]


def test_plan_json_of_the_demo(tmp_path, capsys):
    assert cli(demo_args(tmp_path, "--gpus", "2", "--parallel.ep", "2", "--train.micro_batch_size", "8", "--json")) == 0
    j = json.loads(capsys.readouterr().out)
    for key in ("gpus", "gpu_memory_gib", "params_per_gpu", "weights_gib", "grads_gib", "optimizer_gib",
                "activations_gib", "peak_gib", "fits"):
        assert key in j
    assert j["gpus"] == 2 and j["gpu_memory_gib"] == 80 and j["fits"] is True
    assert [r["rank"] for r in j["ranks"]] == [0, 1]


def test_plan_table_marks_exact_and_estimated(tmp_path, capsys):
    assert cli(demo_args(tmp_path, "--gpus", "1", "--gpu-memory", "24")) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("  ") and "  " in line[2:]]
    lines = {line.split("  ")[1].strip(): line for line in rows}
    assert "exact" in lines["weights"] and "exact" in lines["optimizer states"]
    assert "estimate" in lines["activations"] and "estimate" in lines["peak during a step"]
    assert "fits 24.0 GiB: yes" in out


@pytest.mark.parametrize("flags,message", [
    (["--gpus", "0"], "argument --gpus: expected a whole number of GPUs >= 1, got '0'"),
    (["--gpus", "two"], "argument --gpus: expected a whole number of GPUs >= 1, got 'two'"),
    (["--gpu-memory", "-1"], "argument --gpu-memory: expected GiB per GPU, a number > 0, got '-1'"),
    (["--gpu-memory", "abc"], "argument --gpu-memory: expected GiB per GPU, a number > 0, got 'abc'"),
])
def test_nonsense_flags(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        cli(demo_args(tmp_path, *flags))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_layouts_and_model_dirs(tmp_path, capsys):
    sft = "examples/dllm_sft/diffusion_gemma_sft.yaml"
    assert cli(["plan", "-c", sft, "--gpus", "3"]) == 2  # refused before the model config is read
    err = capsys.readouterr().err
    ep_line = 1 + next(i for i, t in enumerate(Path(sft).read_text().splitlines()) if t.strip().startswith("ep:"))
    assert f"{sft}:{ep_line}: field 'parallel.ep': ep=8 does not divide the world size 3" in err
    assert len(err.splitlines()) == 1
    empty = tmp_path / "weights-only"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    args = ["plan", "-c", "examples/dllm_sft/diffusion_gemma_sft.yaml", "--model.name_or_path", str(empty)]
    assert cli(args) == 2
    assert f"{empty} holds no config.json (the run's architecture is read from it)" in capsys.readouterr().err
    assert cli([*args[:-1], str(tmp_path / "missing")]) == 2
    assert "no such model directory" in capsys.readouterr().err


def test_demo_does_not_fit_a_tiny_card(tmp_path, capsys):
    assert cli(demo_args(tmp_path, "--gpus", "1", "--gpu-memory", "0.01")) == 2
    out, err = capsys.readouterr()
    assert "fits 0.0 GiB: NO" in out
    assert err.startswith("blockdiff plan: error: ") and "does not fit" in err and "weights 0.0" in err


# ---------------------------------------------------------------------------------------- before training


class _Card:
    total_memory = int(0.01 * 1024**3)


def test_train_refuses_a_cuda_run_that_cannot_fit(tmp_path, monkeypatch):
    from blockdiff.plan.report import check_before_training
    from blockdiff.train.loop import train

    cfg = load_config(demo_config_path(), ["--data.train_path", "x.jsonl", "--train.output_dir", str(tmp_path)])
    # a "GPU" of 10 MiB; the plan is made for CUDA (bf16 compute off: the demo computes in fp32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: _Card())
    with pytest.raises(ConfigError, match=r"this run does not fit the GPUs: 1 GPU\(s\) of 0.0 GiB: weights .* "
                                          r"set train.skip_memory_check: true"):
        train(cfg)
    cfg.train.skip_memory_check = True
    assert check_before_training(cfg) is None
    assert not (tmp_path / "config.yaml").exists()  # refused before the run dir is touched


def test_rl_plan_counts_the_draw_rows_and_the_frozen_reference(tmp_path, capsys):
    """blockdiff rl's update: a micro-batch of completions holds elbo_draws rows each (the activations of an SFT
    micro-batch that many times larger), and full fine-tuning with a KL term holds a frozen copy of the weights
    (exactly the policy's); LoRA's reference is the adapter-off base, nothing more."""
    def plan(*more, rl=True):
        cfg = load_config(demo_config_path(), ["--data.train_path", "x.jsonl", "--train.output_dir", "y",
                                               "--train.micro_batch_size", "4", "--train.global_batch_size", "8",
                                               "--rl.elbo_draws", "2", *more])
        return make_plan(cfg, 1, 80, rl=rl)

    sft_of_8 = make_plan(load_config(demo_config_path(), ["--data.train_path", "x.jsonl", "--train.output_dir", "y",
                                                          "--train.micro_batch_size", "8"]), 1, 80)
    no_kl, kl = plan("--rl.kl_beta", "0"), plan("--rl.kl_beta", "0.5")
    assert no_kl.shape.micro_batch == 8 and no_kl.activations == sft_of_8.activations
    assert no_kl.reference == 0 and kl.reference == kl.state.weights > 0
    assert kl.peak_step - no_kl.peak_step == kl.state.weights and kl.peak_load - no_kl.peak_load == kl.state.weights
    assert plan("--rl.kl_beta", "0.5", "--lora.enabled", "true").reference == 0
    assert plan("--rl.kl_beta", "0.5", rl=False).reference == 0  # blockdiff train: no RL terms
    assert cli(demo_args(tmp_path, "--rl", "--rl.kl_beta", "0.5")) == 0
    table = capsys.readouterr().out
    assert "frozen reference copy" in table and "completions x 2 ELBO draws" in table


def test_rl_refuses_a_cuda_run_that_cannot_fit(tmp_path, monkeypatch):
    from blockdiff.rl.loop import rl_train

    cfg = load_config(demo_config_path(), ["--data.train_path", "x.jsonl", "--train.output_dir", str(tmp_path)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: _Card())
    with pytest.raises(ConfigError, match=r"this run does not fit the GPUs"):
        rl_train(cfg)
    assert not (tmp_path / "config.yaml").exists()  # refused before the run dir is touched


def test_cpu_run_logs_the_plan(tmp_path, caplog):
    from blockdiff.plan.report import check_before_training

    cfg = load_config(demo_config_path(), ["--data.train_path", "x.jsonl", "--train.output_dir", str(tmp_path)])
    with caplog.at_level("INFO", logger="blockdiff"):
        plan = check_before_training(cfg)
    assert plan is not None and plan["gpus"] == 1
    assert "memory plan per process: weights" in caplog.text


@pytest.mark.slow
def test_several_ranks_are_planned_in_a_child_process(tmp_path, monkeypatch):
    import torch.distributed as tdist

    from blockdiff.plan.report import check_before_training

    cfg = load_config(demo_config_path(), ["--data.train_path", "x.jsonl", "--train.output_dir", str(tmp_path),
                                           "--train.micro_batch_size", "8", "--parallel.ep", "2"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    plan = check_before_training(cfg)
    assert plan["gpus"] == 2 and [r["rank"] for r in plan["ranks"]] == [0, 1]
    assert not tdist.is_initialized()  # this process never held the fake process group
    monkeypatch.setenv("WORLD_SIZE", "3")  # a bad layout is refused here, pointing at the config
    with pytest.raises(ConfigError, match=r"^--parallel.ep: ep=2 does not divide the world size 3"):
        check_before_training(cfg)
