"""LoRA under FSDP2 + expert parallelism on CPU processes (gloo): equal to the single-process run.

Distributed cases launch ``torchrun ... tests/dist_worker.py`` (helpers shared with test_parallel.py)
and trust the per-rank ``.done`` files the worker writes after a clean finish, not the launcher's exit
code (gloo teardown can abort after a clean run). The example entry point is run the same way through
the worker's ``script`` mode (runpy of ``examples/dllm_sft/finetune.py`` as ``__main__``).

Tolerances (fp32 on CPU; only the float summation order differs):
- one step: loss sums rel 1e-6; every adapter gradient max|diff| <= 1e-5 * max|g| + 1e-7; global grad
  norm rel 1e-5; the set of gradients equals the set of trainable (adapter) parameters and no frozen
  parameter holds a gradient on any rank. B factors are set to seeded random values first (with the
  zero init every A gradient would be exactly 0).
- save on 2 ranks (ep 2), resume on 1: losses rel 1e-4 (as test_parallel.py: Adam and top-k routing
  amplify reduction-order rounding); final adapters max|diff| <= 1e-4 * max|w| + 1e-6.
- export of the sharded run: PEFT tensors equal the final checkpoint's adapters exactly (gathered fp32);
  merged weights equal base + scaling * B @ A within 1e-6.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import TINY, logged_losses, torchrun

ROOT = Path(__file__).resolve().parents[1]
# self-conditioning on for every example (overrides TINY's 0.5): the resumed-run tolerance below was set
# for that workload; the mixed-coin case is covered by tests/test_parallel.py
LORA = ["--lora.enabled", "true", "--lora.rank", "4", "--lora.alpha", "8", "--objective.self_conditioning_prob", "1.0"]
EXAMPLE = ROOT / "examples" / "dllm_sft" / "finetune.py"
LORA_YAML = ROOT / "examples" / "dllm_sft" / "diffusion_gemma_lora.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from blockdiff.data.synthetic import write_splits

    d = tmp_path_factory.mktemp("ldata")
    return str(write_splits(d, 40, 8, seed=0)[0])


def _worker():
    sys.path.insert(0, str(ROOT / "tests"))
    import dist_worker

    return dist_worker


def _trainable_names(experts: bool) -> set[str]:
    from blockdiff.config.schema import demo_config_path, load_config
    from blockdiff.lora import apply_lora
    from blockdiff.train.loading import build_model

    cfg = load_config(demo_config_path(), ["--data.train_path", "x", *TINY, *LORA, "--lora.experts", str(experts)])
    model = build_model(cfg, torch.device("cpu"))
    apply_lora(model, cfg.lora)
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def references(data, tmp_path_factory):
    """Single-process loss and adapter gradients of step 0, without and with expert LoRA (in-process)."""
    out = tmp_path_factory.mktemp("lref")
    return {experts: _worker().step_grads(["--data.train_path", data, "--train.output_dir", str(out / f"r{experts}"),
                                           *TINY, *LORA, "--lora.experts", str(experts)])
            for experts in (False, True)}


def assert_same_lora_step(ref: dict, got: dict, experts: bool) -> None:
    grads = {k.removeprefix("grad.") for k in ref if k.startswith("grad.")}
    assert grads == _trainable_names(experts), "every adapter (and nothing else) must get a gradient"
    assert any(".experts.adapter." in k for k in grads) == experts
    assert set(got) == set(ref)
    assert float(ref["frozen_with_grad"]) == 0 and float(got["frozen_with_grad"]) == 0, "a frozen base param got a grad"
    torch.testing.assert_close(got["sums"], ref["sums"], rtol=1e-6, atol=0)
    torch.testing.assert_close(got["grad_norm"], ref["grad_norm"], rtol=1e-5, atol=0)
    for k in ref:
        if k.startswith("grad."):
            scale = float(ref[k].abs().max())
            assert scale > 0, f"{k}: zero reference gradient proves nothing"
            diff = float((got[k] - ref[k]).abs().max())
            assert diff <= 1e-5 * scale + 1e-7, f"{k}: max|diff| {diff:.3g} vs max|g| {scale:.3g}"


@pytest.mark.dist
@pytest.mark.parametrize("nproc,ep,experts", [(2, 1, False), (2, 1, True), (4, 2, True)],
                         ids=["fsdp", "fsdp-expert-lora", "fsdp+ep-expert-lora"])
def test_lora_step_equals_single_process(data, references, tmp_path, nproc, ep, experts):
    out = tmp_path / "grads.safetensors"
    torchrun(nproc, "grads", out, "--data.train_path", data, "--train.output_dir", str(tmp_path / "run"), *TINY,
             *LORA, "--lora.experts", str(experts), "--parallel.ep", str(ep))
    assert_same_lora_step(references[experts], load_file(str(out)), experts)


def _adapters(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.dist
def test_lora_save_on_2_ranks_resume_on_1(data, tmp_path):
    """Expert LoRA with ep 2: the sharded checkpoint holds adapters + optimizer only (DCP, global layout)
    and a 1-process resume continues the single-process trajectory."""
    import torch.distributed.checkpoint as dcp

    from blockdiff.config.schema import demo_config_path, load_config
    from blockdiff.train.loop import train

    base = ["--data.train_path", data, *TINY, *LORA, "--lora.experts", "true", "--checkpoint.every_steps", "2"]
    ref_dir = train(load_config(demo_config_path(), [*base, "--train.output_dir", str(tmp_path / "ref"),
                                                     "--train.max_steps", "4"]))
    run = tmp_path / "run"
    torchrun(2, "train", tmp_path / "a", *base, "--train.output_dir", str(run), "--train.max_steps", "2",
             "--parallel.ep", "2", "--checkpoint.export_final", "true")
    ck = run / "checkpoints" / "step_00000002"
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["format"].endswith("dcp-v1") and meta["world_size"] == 2 and meta["adapters_only"] is True
    keys = set(dcp.FileSystemReader(str(ck)).read_metadata().state_dict_metadata)
    trainable = _trainable_names(True)
    assert {k.removeprefix("model.") for k in keys if k.startswith("model.")} == trainable  # no frozen base
    assert {k.removeprefix("optim.").rsplit(".", 1)[0] for k in keys if k.startswith("optim.")} == trainable
    # the expert adapters are stored in their GLOBAL layout ([E, ...]) although each rank held E/2
    gu = dcp.FileSystemReader(str(ck)).read_metadata().state_dict_metadata["model.layers.0.experts.adapter.gate_up_A"]
    assert gu.size[0] == 8
    # the export of that sharded run holds the gathered expert adapters (blockdiff's side file), equal to
    # the checkpoint's once loaded into one process
    from blockdiff.checkpoint.training import load_checkpoint
    from blockdiff.lora import EXPERT_FILE, apply_lora
    from blockdiff.train.loading import build_model

    cfg = load_config(demo_config_path(), [*base, "--train.output_dir", str(tmp_path / "x")])
    model = build_model(cfg, torch.device("cpu"))
    apply_lora(model, cfg.lora)
    load_checkpoint(ck, model)
    experts = load_file(str(run / "export" / "adapter" / EXPERT_FILE))
    own = dict(model.named_parameters())
    assert set(experts) == {n for n in trainable if ".experts.adapter." in n}
    for k, v in experts.items():
        assert v.shape[0] == 8 and torch.equal(v, own[k].detach()), k

    train(load_config(demo_config_path(), [*base, "--train.output_dir", str(run), "--train.max_steps", "4"]))
    ref, got = logged_losses(ref_dir), logged_losses(run)
    assert sorted(got) == [1, 2, 3, 4]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-4), (s, got[s], ref[s])
    a, b = _adapters(ref_dir / "checkpoints" / "step_00000004"), _adapters(run / "checkpoints" / "step_00000004")
    assert set(a) == set(b) == trainable
    for k in a:
        scale, diff = float(a[k].abs().max()), float((a[k] - b[k]).abs().max())
        assert diff <= 1e-4 * scale + 1e-6, f"{k}: max|diff| {diff:.3g} vs max|w| {scale:.3g}"


def _tiny_from_config() -> dict:
    from blockdiff.config.schema import demo_config_path

    fc = yaml.safe_load(Path(demo_config_path()).read_text())["model"]["from_config"]
    fc["canvas_length"] = 32
    fc["text_config"]["num_hidden_layers"] = 2
    return fc


@pytest.mark.dist
def test_lora_example_yaml_under_torchrun_exports_the_adapter(data, tmp_path):
    """``torchrun --nproc-per-node=2 examples/dllm_sft/finetune.py -c diffusion_gemma_lora.yaml`` with the
    hub model replaced by a tiny from_config model, ep 2 (activation checkpointing on, as in the YAML):
    finishes on every rank and writes the PEFT adapter + merged export from the sharded run."""
    from blockdiff.config.schema import load_config
    from blockdiff.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_lora, lora_modules, merge_lora_
    from blockdiff.checkpoint.training import load_checkpoint
    from blockdiff.model.hf import io as hf_io
    from blockdiff.train.loading import build_model

    run = tmp_path / "run"
    overrides = ["--model.from_config", json.dumps(_tiny_from_config()), "--model.dtype", "float32",
                 "--data.tokenizer", "tiny", "--data.train_path", data, "--data.eval_path", data,
                 "--data.canvas_length", "32",
                 "--data.seq_length", "128", "--parallel.ep", "2", "--train.max_steps", "2",
                 "--train.global_batch_size", "2", "--train.output_dir", str(run), "--checkpoint.every_steps", "2",
                 "--checkpoint.keep_last", "1", "--logging.tensorboard", "false", "--logging.progress", "false"]
    torchrun(2, "script", tmp_path / "ft", str(EXAMPLE), "-c", str(LORA_YAML), *overrides)
    assert sorted(logged_losses(run)) == [1, 2]
    export = run / "export"
    adapter = export / "adapter"
    assert (adapter / ADAPTER_CONFIG).is_file() and (adapter / ADAPTER_WEIGHTS).is_file()
    acfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert acfg["peft_type"] == "LORA" and acfg["r"] == 16 and acfg["lora_alpha"] == 32

    # rebuild the run's model in one process, load the final (sharded, adapters-only) checkpoint into it
    cfg = load_config(LORA_YAML, overrides)
    model = build_model(cfg, torch.device("cpu"))
    apply_lora(model, cfg.lora)
    load_checkpoint(run / "checkpoints" / "step_00000002", model)
    peft = load_file(str(adapter / ADAPTER_WEIGHTS))
    mods = lora_modules(model)
    assert len(peft) == 2 * 2 * len(mods)  # A and B, decoder and encoder copies
    q = mods["layers.0.self_attn.q_proj"]
    assert float(q.lora_B.detach().abs().max()) > 0  # it trained
    for tree in ("model.decoder.layers.0", "model.encoder.language_model.layers.0"):
        assert torch.equal(peft[f"base_model.model.{tree}.self_attn.q_proj.lora_A.weight"], q.lora_A.detach())
        assert torch.equal(peft[f"base_model.model.{tree}.self_attn.q_proj.lora_B.weight"], q.lora_B.detach())
    merged = hf_io.load_pretrained(str(export), dtype=torch.float32).state_dict()
    want = merge_lora_(model).state_dict()
    assert set(merged) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6, msg=k)
