"""Typed config: example YAMLs, CLI overrides, located errors, round trip, world-size layouts."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import blockdiff.config.schema  # noqa: F401
except ImportError:  # not installed in the venv: run from the source tree
    sys.path.insert(0, os.path.join(ROOT, "src"))

from blockdiff.config.loader import parse_overrides
from blockdiff.config.schema import Config, apply_world_size, config_from_dict, demo_config_path, load_config
from blockdiff.errors import BlockdiffError, ConfigError

SFT = os.path.join(ROOT, "examples", "dllm_sft", "diffusion_gemma_sft.yaml")
LORA = os.path.join(ROOT, "examples", "dllm_sft", "diffusion_gemma_lora.yaml")
MINIMAL = {"data": {"train_path": "x.jsonl"}, "train": {"output_dir": "runs/x"}}


def write(tmp_path, text, name="run.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(p)


def check_reference(c: Config):
    assert c.model.name_or_path == "google/diffusiongemma-26B-A4B-it" and c.model.dtype == "bfloat16"
    assert c.data.train_path == "gsm8k_chat_train.jsonl"
    assert (c.data.seq_length, c.data.canvas_length) == (1024, 256)
    assert (c.objective.eps, c.objective.self_conditioning_prob, c.objective.freeze_router) == (1e-3, 0.5, True)
    assert c.objective.loss_type == "all_supervised" and c.objective.ar_loss_weight == 1.0
    assert c.objective.ar_loss_reduction == "token"
    o = c.optimizer
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.grad_clip) == (1.5e-4, (0.95, 0.99), 1e-8, 1e-4, 1.0)
    s = c.scheduler
    assert (s.kind, s.warmup_steps, s.decay_steps, s.min_lr) == ("cosine", 25, 800, 1.5e-5)
    t = c.train
    assert (t.max_steps, t.global_batch_size, t.micro_batch_size, t.seed) == (800, 8, 1, 42)
    assert c.checkpoint.every_steps == 400
    assert c.parallel.ep == 8 and c.parallel.activation_checkpointing is True


def test_sft_yaml_reference_values():
    c = load_config(SFT)
    check_reference(c)
    assert c.lora.enabled is False
    assert apply_world_size(c, 8) == 1 and c.parallel.dp == 8


def test_lora_yaml_reference_values():
    c = load_config(LORA)
    check_reference(c)
    lo = c.lora
    assert (lo.enabled, lo.rank, lo.alpha, lo.dropout) == (True, 16, 32.0, 0.0)
    assert lo.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lo.experts is False and lo.self_conditioning is False


def test_defaults_are_the_recipe():
    c = config_from_dict(MINIMAL)
    d = Config().to_dict()
    ref = load_config(SFT).to_dict()
    for sec in ("objective", "optimizer", "scheduler", "checkpoint", "lora"):
        assert c.to_dict()[sec] == d[sec] == ref[sec] or sec == "lora", sec
    assert c.parallel.ep == 1 and c.parallel.dp == -1


def test_demo_config():
    c = load_config(demo_config_path())
    fc = c.model.from_config
    assert fc["canvas_length"] == 32 and fc["text_config"]["hidden_size"] == 64
    assert fc["text_config"]["num_experts"] == 8 and fc["vision_config"]["head_dim"] == 8
    assert c.data.tokenizer == "tiny" and (c.data.seq_length, c.data.canvas_length) == (128, 32)
    assert c.model.dtype == "float32" and c.optimizer.lr == 3e-3
    assert (c.scheduler.warmup_steps, c.scheduler.decay_steps, c.train.max_steps) == (20, 600, 600)
    assert (c.train.global_batch_size, c.train.micro_batch_size) == (16, 16)
    assert c.parallel.ep == 1 and c.parallel.activation_checkpointing is False
    assert c.checkpoint.every_steps == 100
    assert apply_world_size(c, 1) == 1


def test_overrides_types_and_forms():
    c = load_config(SFT, ["--train.max_steps", "10", "--optimizer.lr=1e-3", "--optimizer.betas", "[0.9,0.95]",
                          "--lora.enabled", "true", "--parallel.compile", "--data.eval_path", "ev.jsonl",
                          "--data.tokenizer=null", "--train.output-dir", "runs/o", "--optimizer.weight_decay", "0",
                          "--lora.targets", "[q_proj, v_proj]", "--model.from_config.text_config.vocab_size", "128"])
    assert c.train.max_steps == 10 and type(c.train.max_steps) is int
    assert c.optimizer.lr == 1e-3 and type(c.optimizer.lr) is float
    assert c.optimizer.betas == (0.9, 0.95)
    assert c.lora.enabled is True and c.parallel.compile is True
    assert c.data.eval_path == "ev.jsonl" and c.data.tokenizer is None and c.train.output_dir == "runs/o"
    assert c.optimizer.weight_decay == 0.0 and type(c.optimizer.weight_decay) is float
    assert c.lora.targets == ["q_proj", "v_proj"]
    assert c.model.from_config == {"text_config": {"vocab_size": 128}}
    assert parse_overrides(["--a.b=-1", "--c.d", "-2.5", "--e.f", "x y"]) == [("a.b", -1), ("c.d", -2.5), ("e.f", "x y")]


def test_overrides_without_file():
    c = load_config(None, ["--data.train_path", "d.jsonl", "--train.output_dir", "o"])
    assert c.data.train_path == "d.jsonl" and c.optimizer.lr == 1.5e-4


def test_scientific_notation_in_yaml_is_a_float(tmp_path):
    p = write(tmp_path, """
        data: {train_path: x, seq_length: 512}
        train: {output_dir: o}
        optimizer:
          lr: 1e-4
          eps: 1E-8
        """)
    c = load_config(p)
    assert c.optimizer.lr == 1e-4 and c.optimizer.eps == 1e-8


BASE = """
data:
  train_path: x.jsonl
train:
  output_dir: runs/x
"""

# (yaml text appended to BASE, dotted field, line of the offending key, fragment of the message)
BAD = [
    ("optimiser:\n  lr: 1.0\n", "optimiser", 5, "did you mean 'optimizer'"),
    ("optimizer:\n  lrr: 1.0\n", "optimizer.lrr", 6, "did you mean 'lr'"),
    ("optimizer:\n  lr: '1e-3'\n", "optimizer.lr", 6, "expected a number, got string"),
    ("train:\n  max_steps: 10.5\n", "train.max_steps", 6, "expected an integer"),
    ("train:\n  max_steps: true\n", "train.max_steps", 6, "got boolean"),
    ("lora:\n  enabled: 1\n", "lora.enabled", 6, "expected a boolean"),
    ("data:\n  train_path: 5\n", "data.train_path", 6, "expected a string"),
    ("optimizer:\n  betas: [0.9]\n", "optimizer.betas", 6, "a list of 2 numbers"),
    ("lora:\n  targets: q_proj\n", "lora.targets", 6, "a list of strings"),
    ("objective:\n  loss_type: all_supervisd\n", "objective.loss_type", 6, "did you mean 'all_supervised'"),
    ("objective:\n  ar_loss_reduction: examples\n", "objective.ar_loss_reduction", 6, "did you mean 'example'"),
    ("model:\n  dtype: fp16\n", "model.dtype", 6, "one of 'bfloat16', 'float32'"),
    ("optimizer:\n  lr: 0\n", "optimizer.lr", 6, "> 0"),
    ("objective:\n  eps: 1.5\n", "objective.eps", 6, "< 1"),
    ("objective:\n  self_conditioning_prob: -0.1\n", "objective.self_conditioning_prob", 6, ">= 0"),
    ("optimizer:\n  betas: [0.9, 1.0]\n", "optimizer.betas", 6, "[0, 1)"),
    ("data:\n  canvas_length: 0\n", "data.canvas_length", 6, "> 0"),
    ("data:\n  seq_length: 256\n", "data.seq_length", 6, "canvas_length + 1"),
    ("checkpoint:\n  keep_last: 0\n", "checkpoint.keep_last", 6, ">= 1"),
    ("parallel:\n  ep: 0\n", "parallel.ep", 6, ">= 1"),
    ("parallel:\n  dp: 0\n", "parallel.dp", 6, "-1"),
    ("lora:\n  rank: 0\n", "lora.rank", 6, ">= 1"),
    ("lora:\n  dropout: 1.0\n", "lora.dropout", 6, "< 1"),
    ("scheduler:\n  min_lr: 1.0\n", "scheduler.min_lr", 6, "optimizer.lr"),
    ("model:\n  from_config: [1, 2]\n", "model.from_config", 6, "a mapping"),
    ("logging: 3\n", "logging", 5, "must be a mapping"),
    ("eval:\n  loss_every: -1\n", "eval.loss_every", 6, ">= 0"),
    ("eval:\n  loss_samples: 0\n", "eval.loss_samples", 6, ">= 1"),
    ("eval:\n  accuracy_samples: 0\n", "eval.accuracy_samples", 6, ">= 1"),
    ("eval:\n  accuracy_every: 5\n", "eval.accuracy_every", 6, "needs data.eval_path"),
    ("eval:\n  loss_evry: 5\n", "eval.loss_evry", 6, "did you mean 'loss_every'"),
    ("train:\n  eval_every: 5\n", "train.eval_every", 6, "set eval.accuracy_every"),
    ("train:\n  eval_samples: 5\n", "train.eval_samples", 6, "set eval.accuracy_samples"),
    ("data:\n  num_workers: 2\n", "data.num_workers", 6, "unknown field 'num_workers' in section 'data'"),
    ("data:\n  shuffle: false\n", "data.shuffle", 6, "unknown field 'shuffle' in section 'data'"),
    ("objective:\n  block_choice: uniform\n", "objective.block_choice", 6, "unknown field 'block_choice'"),
]


@pytest.mark.parametrize("extra,dotted,line,fragment", BAD, ids=[b[1] + ":" + b[3][:12] for b in BAD])
def test_bad_values_are_located(tmp_path, extra, dotted, line, fragment):
    lines = BASE.lstrip("\n").splitlines()
    sec, *body = extra.splitlines()
    if sec in lines:  # merge into the section BASE already has (replace the key if BASE sets it)
        key = body[0].split(":")[0] + ":"
        start = lines.index(sec) + 1
        hit = [j for j in range(start, len(lines)) if lines[j].startswith(key)]
        j = hit[0] if hit else start
        lines[j:j + bool(hit)] = [body[0]]
        line = j + 1
    else:
        lines += extra.splitlines()
    text = "\n".join(lines) + "\n"
    p = write(tmp_path, text, name="bad_run.yaml")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:{line}: field '{dotted}': "), msg
    assert fragment in msg, msg
    assert isinstance(ei.value, BlockdiffError) and ei.value.field == dotted and ei.value.line == line


def test_batch_divisibility_is_located(tmp_path):
    p = write(tmp_path, BASE.lstrip("\n").replace("train:\n", "train:\n  global_batch_size: 7\n  micro_batch_size: 2\n"))
    with pytest.raises(ConfigError, match=r"run.yaml:4: field 'train.global_batch_size': .*multiple of micro"):
        load_config(p)


def test_missing_required_field(tmp_path):
    p = write(tmp_path, "train:\n  output_dir: o\n")
    with pytest.raises(ConfigError, match=r"run.yaml: field 'data.train_path': required"):
        load_config(p)


def test_duplicate_key(tmp_path):
    p = write(tmp_path, BASE.lstrip("\n") + "optimizer:\n  lr: 1.0\n  lr: 2.0\n")
    with pytest.raises(ConfigError, match=r"run.yaml:7: field 'optimizer.lr': duplicate key 'lr' \(first at line 6\)"):
        load_config(p)


def test_missing_file_and_syntax_error(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))
    p = write(tmp_path, "data:\n  train_path: x\n  seq_length: [1, 2\ntrain: {}\n")
    with pytest.raises(ConfigError, match=r"run.yaml:4: invalid YAML"):
        load_config(p)
    p = write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"run.yaml:1: expected a mapping of sections"):
        load_config(p)


@pytest.mark.parametrize("argv,fragment", [
    (["--optimizer.lrr", "1"], "--optimizer.lrr: unknown field 'lrr' in section 'optimizer' (did you mean 'lr'?)"),
    (["--optimiser.lr", "1"], "--optimiser.lr: unknown section 'optimiser' (did you mean 'optimizer'?)"),
    (["--train.max_steps", "ten"], "--train.max_steps: expected an integer, got string 'ten'"),
    (["--train.max_steps", "1.5"], "--train.max_steps: expected an integer, got number 1.5"),
    (["--optimizer.lr", "-1"], "--optimizer.lr: expected a value > 0, got -1.0"),
    (["--data.seq_length", "100"], "--data.seq_length: expected seq_length >= canvas_length + 1 = 257"),
    (["--train.resume", "sometimes"], "--train.resume: expected one of 'auto', 'never', 'must'"),
    (["--optimizer.lr.x", "1"], "--optimizer.lr.x: cannot set 'x' inside optimizer.lr"),
    (["max_steps", "1"], "expected an override '--section.field value'"),
    (["--max_steps", "1"], "--max_steps: expected '--section.field'"),
])
def test_bad_overrides(argv, fragment):
    with pytest.raises(ConfigError) as ei:
        load_config(SFT, argv)
    assert fragment in str(ei.value), str(ei.value)


def test_config_from_dict_errors_name_the_source():
    with pytest.raises(ConfigError, match=r"<mine>: field 'lora.rank': expected an integer"):
        config_from_dict({**MINIMAL, "lora": {"rank": "16"}}, source="<mine>")


def test_save_yaml_round_trip(tmp_path):
    for src in (SFT, LORA, demo_config_path()):
        c = load_config(src, ["--optimizer.betas", "[0.9, 0.95]"])
        out = tmp_path / "run" / "config.yaml"
        c.save_yaml(out)
        c2 = load_config(str(out))
        assert c2 == c and c2.to_dict() == c.to_dict()
        assert c2.optimizer.betas == (0.9, 0.95)


def test_validate_in_code():
    c = config_from_dict(MINIMAL)
    c.optimizer.lr = -1.0
    with pytest.raises(ConfigError, match="optimizer.lr"):
        c.validate()


@pytest.mark.parametrize("world,ep,gbs,mbs,accum", [(8, 8, 8, 1, 1), (4, 2, 16, 2, 2), (1, 1, 8, 1, 8),
                                                   (2, 1, 8, 4, 1), (16, 8, 32, 1, 2)])
def test_apply_world_size_good(world, ep, gbs, mbs, accum):
    c = config_from_dict({**MINIMAL, "parallel": {"ep": ep},
                          "train": {"output_dir": "o", "global_batch_size": gbs, "micro_batch_size": mbs}})
    assert apply_world_size(c, world) == accum
    assert c.parallel.dp == world


def test_apply_world_size_bad(tmp_path):
    p = write(tmp_path, BASE.lstrip("\n") + "parallel:\n  ep: 8\n  dp: 4\n")
    c = load_config(p, ["--parallel.dp", "-1"])
    with pytest.raises(ConfigError, match=r"run.yaml:6: field 'parallel.ep': ep=8 does not divide the world size 6"):
        apply_world_size(c, 6)
    with pytest.raises(ConfigError, match=r"global_batch_size=8 is not a multiple of .* = 16"):
        apply_world_size(load_config(SFT), 16)
    c = load_config(p)
    with pytest.raises(ConfigError, match=r"run.yaml:7: field 'parallel.dp': dp=4 but the world size is 8"):
        apply_world_size(c, 8)
