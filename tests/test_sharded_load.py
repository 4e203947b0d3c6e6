"""Sharded loading on CPU processes (gloo): each rank builds the model on ``meta``, parallelizes it and fills
only its own shards from a transformers-written checkpoint (``blockdiff.train.loading``).

- Equality: every tensor gathered from the ranks (``parallel.full_tensor``) equals, exactly, the one-process
  ``build_model`` + LoRA + frozen router of today's path (``hf_io.load_pretrained``), LoRA adapters'
  init included; on 2 processes (dp only; ep 2; ep 2 + LoRA) and 4 (ep 2 over edp 2; ep 4; ep 2 + LoRA).
  Uneven sizes on purpose: a dense intermediate of 50 rows (13/13/13/11 on 4 ranks) and LoRA rank 3
  (one rank holds no row of the A factors on 4 ranks).
- Memory: ``LiveBytes`` (tests/dist_worker.py) tracks every storage torch allocates during the build and
  every checkpoint row slice alive; its peak stays within the rank's exact shard bytes (computed here from
  the layout: FSDP2 pads each dim-0 chunk to ceil(rows / ranks)) plus the largest tensor of the model,
  which a rank holding the whole model could not meet at 4 ranks.
- Bytes read: each tensor row is read by exactly one rank, the replicated buffers (``layer_scalar``) by
  all: the ranks' reads sum to the checkpoint's bytes plus (W - 1) copies of those buffers.
- Resume on the meta-built model: a 1-process run checkpoints, a 2-process run (ep 2) resumes it and
  checkpoints (DCP), a 1-process run resumes that: losses equal the uninterrupted run (rel 1e-4, as in
  tests/test_parallel.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import logged_losses, make_hf_checkpoint, torchrun

LORA = ["--lora.enabled", "true", "--lora.experts", "true", "--lora.rank", "3", "--lora.self_conditioning", "true"]
LAYOUTS = {2: [["--parallel.ep", "1"], ["--parallel.ep", "2"], ["--parallel.ep", "2", *LORA]],
           4: [["--parallel.ep", "2"], ["--parallel.ep", "4"], ["--parallel.ep", "2", *LORA]]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # vocab 1024: the shipped tiny tokenizer (990 tokens) trains on it
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("sl"), shard_size="20KB", num_layers=3, vocab=1024,
                                 intermediate_size=50)
    return path


def _base(ckpt: Path) -> list[str]:
    return ["--model.name_or_path", str(ckpt), "--model.from_config", "null", "--data.canvas_length", "8",
            "--data.train_path", "unused"]


def _cfg(ckpt: Path, overrides: list[str]):
    from blockdiff.config.schema import demo_config_path, load_config

    return load_config(demo_config_path(), [*_base(ckpt), *overrides])


def _reference(cfg):
    """Today's one-process path: the whole model loaded, then LoRA and the frozen router applied."""
    from blockdiff.train.loading import _prepare, build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, torch.device("cpu"))
    _prepare(model, cfg, torch.device("cpu"))
    return model


def _shard_bytes(model, world: int, ep: int, rank: int) -> int:
    """Bytes of rank ``rank``'s parameter and buffer storage: every parameter's dim-0 chunk padded to
    ceil(rows / ranks) rows (expert tensors: E / ep experts over world / ep ranks), buffers whole."""
    total = 0
    for name, p in model.named_parameters():
        expert = ep > 1 and ".experts." in name
        rows, ranks = (p.shape[0] // ep, world // ep) if expert else (p.shape[0], world)
        total += math.ceil(rows / ranks) * (p.numel() // p.shape[0]) * p.element_size()
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def _text_bytes(ckpt: Path, num_layers: int | None) -> int:
    """Stored bytes of the checkpoint tensors a model of ``num_layers`` reads (all: None)."""
    from safetensors import safe_open

    from blockdiff.model.hf import load as hf_load, names as hf_names

    total = 0
    for name, file in hf_load.weight_map(ckpt).items():
        ours = hf_names.from_hf(name)
        if ours is None or (num_layers is not None and (hf_load._layer_of(ours) or 0) >= num_layers):
            continue
        with safe_open(str(ckpt / file), "pt") as f:
            t = f.get_tensor(name)
        total += t.numel() * t.element_size()
    return total


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_load_equals_single_process_within_shard_memory(ckpt, tmp_path, world):
    layouts = [[*_base(ckpt), *lay] for lay in LAYOUTS[world]]
    out = tmp_path / "load"
    torchrun(world, "load", out, json.dumps(layouts))
    for i, overrides in enumerate(LAYOUTS[world]):
        cfg = _cfg(ckpt, overrides)
        ref = _reference(cfg)
        got = load_file(f"{out}.{i}.safetensors")
        want = ref.state_dict()
        assert set(got) == set(want) | {f"requires_grad.{n}" for n, _ in ref.named_parameters()}, overrides
        for name, t in want.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), (overrides, name)
        for name, p in ref.named_parameters():
            assert bool(got[f"requires_grad.{name}"]) == p.requires_grad, (overrides, name)
        assert any(".lora_A" in n for n in want) == cfg.lora.enabled

        figures = [json.loads(Path(f"{out}.{i}.rank{r}.json").read_text()) for r in range(world)]
        largest = max(t.numel() * t.element_size() for t in [*ref.parameters(), *ref.buffers()])
        full = sum(t.numel() * t.element_size() for t in [*ref.parameters(), *ref.buffers()])
        for r, fig in enumerate(figures):
            shard = _shard_bytes(ref, world, cfg.parallel.ep, r)
            assert fig["resident"] == shard, (overrides, r)
            assert fig["peak"] <= shard + largest, (overrides, r, fig["peak"], shard, largest)
            if world == 4:  # the bound means something: the whole model would not fit in it
                assert shard + largest < full, (shard, largest, full)
        # each row is read once, the replicated buffers (layer_scalar, stored in the model's fp32) by every rank
        replicated = sum(b.numel() * b.element_size() for n, b in want.items() if n.endswith("layer_scalar"))
        stored = _text_bytes(ckpt, cfg.model.num_layers)
        assert sum(f["read"] for f in figures) == stored + (world - 1) * replicated
        assert max(f["read"] for f in figures) < stored * (0.3 if world == 4 else 0.55)
        for fig in figures:  # what the rank logs is what it did
            assert (fig["logged"]["bytes_read"], fig["logged"]["resident_bytes"]) == (fig["read"], fig["resident"])


@pytest.mark.dist
def test_resume_on_meta_built_models_across_world_sizes(ckpt, tmp_path):
    from blockdiff.data.synthetic import write_splits
    from blockdiff.train.loop import train

    data = str(write_splits(tmp_path / "data", 40, 8, seed=0)[0])
    run = ["--data.train_path", data, "--data.tokenizer", "tiny", "--model.num_layers", "2",
           "--train.global_batch_size", "4", "--train.micro_batch_size", "1", "--train.log_every", "1",
           "--checkpoint.every_steps", "2", "--checkpoint.export_final", "false", "--logging.progress", "false",
           "--logging.tensorboard", "false"]
    ref = train(_cfg(ckpt, [*run, "--train.output_dir", str(tmp_path / "ref"), "--train.max_steps", "4"]))
    out = tmp_path / "run"
    train(_cfg(ckpt, [*run, "--train.output_dir", str(out), "--train.max_steps", "2"]))
    # 2 processes resume the 1-process checkpoint (step 2) and write a DCP one at step 3 (the final save)
    torchrun(2, "train", tmp_path / "b", *_base(ckpt), *run, "--train.output_dir", str(out), "--train.max_steps",
             "3", "--parallel.ep", "2")
    meta = json.loads((out / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["format"].endswith("dcp-v1")
    train(_cfg(ckpt, [*run, "--train.output_dir", str(out), "--train.max_steps", "4"]))
    want, got = logged_losses(ref), logged_losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4), (step, got[step], want[step])


def test_one_process_goes_through_meta_and_equals_todays_path(ckpt):
    """World size 1 builds on meta too (no full fp32 copy before the fill): same tensors, dtypes and
    trainable set as loading the whole model and applying LoRA to it, and the generator is left where
    LoRA's init left it."""
    from blockdiff.parallel.distributed import DistInfo
    from blockdiff.train.loading import build_training_model
    from blockdiff.lora import adapter_param_names

    cfg = _cfg(ckpt, LORA)
    ref = _reference(cfg)
    after_ref = torch.rand(4)
    torch.manual_seed(cfg.train.seed)
    model = build_training_model(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    assert torch.equal(torch.rand(4), after_ref)
    got, want = model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    assert all(got[n].dtype == t.dtype and torch.equal(got[n], t) for n, t in want.items())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
           {n for n, p in ref.named_parameters() if p.requires_grad}
    for name in ("inv_freq_sliding_attention", "inv_freq_full_attention"):  # non-persistent: recomputed
        assert torch.equal(getattr(model.rotary, name), getattr(ref.rotary, name))
    stats = model._blockdiff_load
    assert stats.bytes_read == stats.checkpoint_bytes and stats.tensors == len(want) - len(adapter_param_names(ref))


def test_bad_checkpoint_is_refused_before_training(ckpt, tmp_path):
    """The meta build reads through the same checks as load_pretrained: one error naming file and tensor."""
    import shutil

    from blockdiff.parallel.distributed import DistInfo
    from blockdiff.errors import CheckpointError
    from blockdiff.train.loading import build_training_model
    from blockdiff.model.hf import load as hf_load

    bad = Path(shutil.copytree(ckpt, tmp_path / "bad"))
    index = json.loads((bad / hf_load.INDEX).read_text())
    name, other = "model.decoder.layers.1.mlp.up_proj.weight", "model.decoder.norm.weight"
    index["weight_map"][name] = index["weight_map"][other] if index["weight_map"][name] != \
        index["weight_map"][other] else sorted(set(index["weight_map"].values()))[0]
    (bad / hf_load.INDEX).write_text(json.dumps(index))
    one = DistInfo(0, 1, 0, torch.device("cpu"))
    with pytest.raises(CheckpointError, match=rf"model-\d+-of-\d+\.safetensors.*missing tensor {name} \(the index "):
        build_training_model(_cfg(bad, []), one)
    del index["weight_map"][name]
    (bad / hf_load.INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{hf_load.INDEX}.*missing tensor {name} \(expected in"):
        build_training_model(_cfg(bad, []), one)
