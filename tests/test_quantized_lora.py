"""LoRA over a quantized frozen base (``lora.base_quantization``): error bounds per format, logits near the
unquantized model, adapter gradients equal to a dequantized reference, a run's save/resume and exports,
the memory plan's figures. Tiny checkpoints written by transformers (tests/helpers.py)."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers import load_blockdiff, make_hf_checkpoint, randomize_lora_b

from blockdiff.errors import ConfigError
from blockdiff.lora import apply_lora, load_peft_adapter
from blockdiff.lora.quantize import has_quantized_base, quantize_frozen_base_, quantized_bytes, quantized_weights
from blockdiff.model.quantized import (FORMATS, NF4_GROUP, NF4_MAX_HALF_GAP, QuantizedLinear, QuantizedWeight,
                                       dequantize, quantize, storage_bytes)

V = 1024  # the shipped tiny tokenizer trains on it
# every input dimension a multiple of nf4's group of 64: hidden, heads * head_dim, intermediates
DIMS = dict(hidden_size=64, head_dim=16, global_head_dim=16, intermediate_size=64, moe_intermediate_size=64)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"rank": 4, "alpha": 8.0, "targets": ALL, "experts": True}
# relative logit error ||q - ref|| / ||ref|| of the quantized model on this tiny random checkpoint (measured:
# int8 0.031, fp8 0.11, nf4 0.49; its weights' own relative errors are 0.7 %, 2.6 % and 9 %: the tiny random
# model amplifies them ~5x, a random 0.7 % perturbation of every matrix moves its logits by ~4 % too)
LOGIT_TOL = {"int8": 0.06, "fp8": 0.2, "nf4": 0.7}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("q"), randomize=False, num_layers=2, vocab=V, canvas=8, **DIMS)[0]


def quantized_model(path, fmt, seed=0):
    torch.manual_seed(seed)
    model = load_blockdiff(path)
    apply_lora(model, LORA)
    randomize_lora_b(model, seed, std=0.05)
    quantize_frozen_base_(model, fmt)
    return model


def dequantized_copy(model):
    """The same model with every quantized weight as a plain frozen fp32 tensor."""
    model = copy.deepcopy(model)
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, QuantizedLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=False)
                linear.weight = nn.Parameter(child.weight.dequantize(torch.float32), requires_grad=False)
                setattr(mod, name, linear)
            elif isinstance(child, QuantizedWeight):
                delattr(mod, name)
                setattr(mod, name, nn.Parameter(child.dequantize(torch.float32), requires_grad=False))
    assert not has_quantized_base(model)
    return model


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (2, 7), generator=g), torch.randint(3, V, (2, 8), generator=g)


# ---------------------------------------------------------------------------------------- formats


def _rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 2 * NF4_GROUP, generator=g) * 0.05
    w[1] = 0.0  # an all-zero row
    w[2, 5] = 40.0  # one outlier: every other element of its row (and nf4 group) rounds to ~0
    w[3] = torch.logspace(-12, 1, w.shape[1])  # magnitudes across 13 decades (fp8 subnormals)
    return w


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["random", "adversarial"])
def test_quantization_error_bounds(fmt, kind):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 16, 4 * NF4_GROUP, generator=g) if kind == "random" else _rows()
    q, s = quantize(w, fmt)
    err = (dequantize(q, s, fmt, torch.float32) - w).abs()
    slack = 1e-6 * w.abs().amax(-1, keepdim=True)  # fp32 arithmetic of the bound itself
    if fmt == "int8":
        bound = s / 2
    elif fmt == "fp8":  # half an e4m3 ulp: 2^-4 relative for normals, 2^-10 * scale below 2^-6 * scale
        bound = torch.maximum(w.abs() / 16, s / 1024)
    else:
        bound = (s * NF4_MAX_HALF_GAP).repeat_interleave(NF4_GROUP, -1)
    assert (err <= bound + slack).all(), float((err - bound).max())
    assert q.numel() * q.element_size() + s.numel() * 4 == storage_bytes(w.shape, fmt)
    if kind == "adversarial":
        assert (dequantize(q, s, fmt, torch.float32)[1] == 0).all()  # zeros stay exact
        assert dequantize(q, s, fmt, torch.float32)[2, 5] == pytest.approx(40.0, rel=1e-6)  # absmax is exact


def test_nf4_needs_whole_groups_and_unknown_format_is_refused(ckpt):
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize(torch.ones(4, 48), "nf4")
    with pytest.raises(ConfigError, match="choose from"):
        quantize_frozen_base_(load_blockdiff(ckpt), "int4")


def test_to_dtype_keeps_the_storage():
    q = QuantizedWeight.from_tensor(torch.randn(8, 64), "fp8")
    before = q.dequantize(torch.float32)
    q.to(torch.bfloat16)
    assert q.qweight.dtype == torch.float8_e4m3fn and q.scale.dtype == torch.float32
    torch.testing.assert_close(q.dequantize(torch.float32), before, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_near_the_unquantized_model_and_only_adapters_get_gradients(ckpt, fmt):
    model = quantized_model(ckpt, fmt)
    reference = load_blockdiff(ckpt)
    apply_lora(reference, LORA)
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k or "adapter" in k},
                              strict=False)
    # what is quantized: attention, dense MLP, experts; not the embedding, router or self-conditioning block
    names = set(quantized_weights(model))
    assert {"layers.1.self_attn.o_proj.weight", "layers.0.mlp.down_proj.weight", "layers.0.experts.gate_up_proj",
            "layers.1.experts.down_proj"} <= names and len(names) == 2 * (len(ALL) + 2) - 1  # no v_proj: full layer
    assert model.embed_tokens.weight.dtype == torch.float32 and "layers.0.router.proj.weight" in dict(
        model.named_parameters())
    prompt, canvas = inputs()
    sc = torch.randn(2, 8, V)
    with torch.no_grad():
        ref = reference.denoise_logits(prompt, canvas, sc)
    got = model.denoise_logits(prompt, canvas, sc)
    rel = float((got.detach() - ref).norm() / ref.norm())
    assert rel <= LOGIT_TOL[fmt], rel
    got.square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad and all("lora_" in n or ".adapter." in n for n in with_grad)
    assert all(not b.requires_grad and b.grad is None for q in quantized_weights(model).values() for b in q.buffers())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_adapter_gradients_match_the_dequantized_reference(ckpt, fmt, checkpointing):
    from blockdiff.parallel.parallelize import apply_activation_checkpointing

    model = quantized_model(ckpt, fmt, seed=3)
    reference = dequantized_copy(model)
    if checkpointing:
        apply_activation_checkpointing(model)
    prompt, canvas = inputs(seed=4)
    grads = []
    for m in (model, reference):
        m.denoise_logits(prompt, canvas).square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, rtol=1e-5, atol=1e-7 * float(g.abs().max()), msg=name)


# ---------------------------------------------------------------------------------------- a run


def _cfg(ckpt, data, out, steps, *extra):
    from blockdiff.config.schema import demo_config_path, load_config

    return load_config(demo_config_path(), _cfg_args(ckpt, data, out, steps, *extra))


def _cfg_args(ckpt, data, out, steps, *extra):
    return [
        "--model.name_or_path", str(ckpt), "--model.from_config", "null", "--data.canvas_length", "8",
        "--data.train_path", str(data), "--train.output_dir", str(out),
        "--train.max_steps", str(steps), "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
        "--logging.progress", "false", "--logging.tensorboard", "false", "--train.log_every", "1", "--lora.enabled", "true",
        "--lora.rank", "4", "--lora.experts", "true", "--checkpoint.every_steps", "2", *extra]


@pytest.mark.slow
def test_run_resumes_bit_exactly_and_exports_for_the_bf16_base(ckpt, tmp_path):
    import transformers

    from blockdiff.checkpoint.export import export_run
    from blockdiff.data.synthetic import write_splits
    from blockdiff.train.loop import train

    data, _ = write_splits(tmp_path / "data", 16, 4, seed=0)
    q = ["--lora.base_quantization", "nf4"]
    run = train(_cfg(ckpt, data, tmp_path / "run", 3, *q))
    step3 = run / "checkpoints" / "step_00000003"
    state = load_file(str(step3 / "model.safetensors"))
    assert json.loads((step3 / "meta.json").read_text())["adapters_only"]
    assert state and all("lora_" in k or ".adapter." in k for k in state)  # adapters only, never the base
    assert all("::" in k and ("lora_" in k or ".adapter." in k) for k in load_file(str(step3 / "optimizer.safetensors")))

    resumed = tmp_path / "resumed"  # 2 steps, then a new process resumes from step 2 (re-quantizing the base)
    train(_cfg(ckpt, data, resumed, 2, *q, "--checkpoint.export_final", "false"))
    train(_cfg(ckpt, data, resumed, 3, *q, "--checkpoint.export_final", "false"))
    again = load_file(str(resumed / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)

    # the trained model: the quantized base with the run's adapters
    trained = load_blockdiff(ckpt)
    apply_lora(trained, LORA)
    quantize_frozen_base_(trained, "nf4")
    trained.load_state_dict(state, strict=False)
    prompt, canvas = inputs(seed=6)
    with torch.no_grad():
        ours = trained.denoise_logits(prompt, canvas)
    # the PEFT adapter (+ expert file) applied to the unquantized base: within the format's tolerance
    adapter = export_run(run, tmp_path / "adapter")
    assert (adapter / "adapter_config.json").is_file()
    served = load_peft_adapter(load_blockdiff(ckpt), adapter)
    with torch.no_grad():
        theirs = served.denoise_logits(prompt, canvas)
    assert float((theirs - ours).norm() / ours.norm()) <= LOGIT_TOL["nf4"]
    # --merge folds the adapters into the SOURCE weights: exactly the served model's tensors, loadable by
    # transformers; the run's own final export (from the live quantized model) is the same checkpoint
    merged = export_run(run, tmp_path / "merged", merge=True)
    hf = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(merged).eval()
    with torch.no_grad():
        hf_logits = hf(input_ids=prompt, decoder_input_ids=canvas).logits
        torch.testing.assert_close(load_blockdiff(merged).denoise_logits(prompt, canvas), theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf_logits, theirs, atol=1e-4, rtol=0)
    final, again = load_file(str(run / "export" / "model.safetensors")), load_file(str(merged / "model.safetensors"))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)


# ---------------------------------------------------------------------------------------- the plan


def test_plan_bytes_per_format_equal_the_real_quantized_model(ckpt):
    from blockdiff.config.schema import demo_config_path, load_config
    from blockdiff.plan.estimate import make_plan
    from blockdiff.train.loading import _prepare, build_model

    plans, real = {}, {}
    for fmt in ("none", *FORMATS):
        cfg = load_config(demo_config_path(), ["--model.name_or_path", str(ckpt), "--model.from_config", "null",
                                               "--data.canvas_length", "8", "--lora.enabled", "true",
                                               "--lora.experts", "true", "--lora.base_quantization", fmt,
                                               "--model.dtype", "bfloat16"])
        plans[fmt] = make_plan(cfg, gpus=1, gpu_memory_gib=24)
        model = build_model(cfg, torch.device("cpu"))
        _prepare(model, cfg, torch.device("cuda"))  # as a GPU run: LoRA on a bf16 base, then quantized
        real[fmt] = model
    # the plan's quantized state is the real model's buffer bytes, and its weights every tensor's bytes
    for fmt in FORMATS:
        assert plans[fmt].state.quantized == quantized_bytes(real[fmt]) > 0
        params = sum(p.numel() * p.element_size() for p in real[fmt].parameters())  # the tied embedding once
        assert plans[fmt].state.weights == params + quantized_bytes(real[fmt])
    # bf16 bytes of the quantized tensors vs their storage: int8 and fp8 ~1/2, nf4 ~1/4 (+ fp32 scales)
    bf16 = sum(2 * q.qweight.numel() for q in quantized_weights(real["int8"]).values())
    shapes = [q.shape for q in quantized_weights(real["int8"]).values()]
    for fmt, ratio in (("int8", 0.5), ("fp8", 0.5), ("nf4", 0.25)):
        assert plans[fmt].state.quantized == sum(storage_bytes(s, fmt) for s in shapes)
        assert ratio < plans[fmt].state.quantized / bf16 < ratio * 1.3
    drop = plans["none"].state.weights - plans["int8"].state.weights
    assert drop == bf16 - plans["int8"].state.quantized
    assert plans["nf4"].state.weights < plans["int8"].state.weights == plans["fp8"].state.weights
    assert plans["none"].dequantized == 0 < plans["nf4"].dequantized


# ---------------------------------------------------------------------------------------- NVFP4 checkpoints

E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _fake_nvfp4(rows, cols, g):
    """(stored tensors, the fp32 values they stand for) of one NVFP4 weight, from random codes and scales."""
    codes = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    scale = (torch.rand(rows, cols // 16, generator=g) * 2 + 0.25).to(torch.float8_e4m3fn)
    scale_2 = torch.tensor(0.01 + torch.rand((), generator=g).item())
    value = torch.tensor([(-1) ** int(c >= 8) * E2M1_VALUES[int(c) & 7] for c in codes.flatten()]).view(rows, cols)
    expected = value * scale.float().repeat_interleave(16, -1) * scale_2
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return {"weight": packed, "weight_scale": scale, "weight_scale_2": scale_2, "input_scale": torch.tensor(1.0)}, expected


def _nvfp4_checkpoint(src, out):
    """``src`` rewritten in ModelOpt's NVFP4 layout: experts per expert, attention q/o projections quantized."""
    import shutil

    from safetensors.torch import save_file

    out.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    g = torch.Generator().manual_seed(7)
    tensors, expected = {}, {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            base, per = name.rsplit(".", 1)[0], []
            for e in range(t.shape[0]):
                parts = []
                for proj in (("down_proj",) if name.endswith("down_proj") else ("gate_proj", "up_proj")):
                    rows = t.shape[1] if proj == "down_proj" else t.shape[1] // 2
                    stored, value = _fake_nvfp4(rows, t.shape[2], g)
                    tensors.update({f"{base}.{e}.{proj}.{k}": v for k, v in stored.items()})
                    parts.append(value)
                per.append(torch.cat(parts))
            expected[name] = torch.stack(per)
        elif name.endswith(("self_attn.q_proj.weight", "self_attn.o_proj.weight")):
            stored, expected[name] = _fake_nvfp4(*t.shape, g)
            tensors.update({f"{name.removesuffix('.weight')}.{k}": v for k, v in stored.items()})
        else:
            tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}
    (out / "config.json").write_text(json.dumps(config))
    (out / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                              "exclude_modules": ["lm_head"]}}))
    return expected


@pytest.mark.slow
def test_nvfp4_checkpoint_loads_dequantized_and_unknown_quantization_is_refused(ckpt, tmp_path):
    from blockdiff.errors import CheckpointError
    from blockdiff.model.hf import names as hf_names
    from blockdiff.model.hf.load import Checkpoint

    expected = _nvfp4_checkpoint(ckpt, tmp_path / "nvfp4")
    model = load_blockdiff(tmp_path / "nvfp4")
    state = model.state_dict()
    assert len(expected) == 2 * 2 + 2 * 2  # per layer: fused experts (2) + q/o (2)
    for name, value in expected.items():
        torch.testing.assert_close(state[hf_names.from_hf(name)], value, rtol=0, atol=0, msg=name)
    plain = load_blockdiff(ckpt).state_dict()
    assert all(torch.equal(state[k], plain[k]) for k in plain if hf_names.to_hf(k) not in expected)
    with Checkpoint(tmp_path / "nvfp4") as source:  # expert rows read a range of experts only
        rows = source.read("model.decoder.layers.1.experts.gate_up_proj", (4, 128, 64), (1, 3))
        torch.testing.assert_close(rows, expected["model.decoder.layers.1.experts.gate_up_proj"][1:3], rtol=0, atol=0)
        assert not hasattr(source.hf_config, "quantization_config")  # exports are unquantized checkpoints
    # a quantized LoRA base built from it: the containers hold the NVFP4 values re-quantized
    lora = load_blockdiff(tmp_path / "nvfp4")
    apply_lora(lora, LORA)
    quantize_frozen_base_(lora, "int8")
    q = quantized_weights(lora)["layers.0.experts.down_proj"]
    w = expected["model.decoder.layers.0.experts.down_proj"]
    assert ((q.dequantize(torch.float32) - w).abs() <= q.scale / 2 + 1e-6).all()

    config = json.loads((tmp_path / "nvfp4" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "nvfp4" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'gptq'.*not supported.*ModelOpt NVFP4") as e:
        load_blockdiff(tmp_path / "nvfp4")
    assert "quantization_config" in str(e.value) and "config.json" in str(e.value)


@pytest.mark.slow
@pytest.mark.dist
def test_int8_base_on_two_gloo_processes_with_expert_parallelism_matches_one(ckpt, tmp_path):
    from helpers import logged_losses, torchrun

    from blockdiff.data.synthetic import write_splits
    from blockdiff.train.loop import train

    data, _ = write_splits(tmp_path / "data", 16, 4, seed=0)
    args = ["--lora.base_quantization", "int8", "--checkpoint.export_final", "false"]
    one = train(_cfg(ckpt, data, tmp_path / "one", 2, *args))
    two = tmp_path / "two"
    torchrun(2, "train", tmp_path / "done", *[str(a) for a in _cfg_args(ckpt, data, two, 2, *args)],
             "--parallel.ep", "2", "--train.micro_batch_size", "1")
    ref, got = logged_losses(one), logged_losses(two)
    assert ref.keys() == got.keys() and len(ref) == 2
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4)
