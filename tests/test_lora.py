"""LoRA: only adapters train, merge equals the adapted model, PEFT reproduces our logits, expert LoRA
matches a loop-over-experts reference, adapters of another base are refused, a LoRA run end to end."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from helpers import load_blockdiff, make_hf_checkpoint, randomize_lora_b

from blockdiff.config.schema import ObjectiveSection, demo_config_path, load_config
from blockdiff.data.canvas import CanvasBatch
from blockdiff.errors import CheckpointError
from blockdiff.lora import (EXPERT_FILE, ExpertLora, LoraLinear, apply_lora, cast_frozen_base_,
                            load_model_with_adapter, load_peft_adapter, merge_lora_, save_peft_adapter,
                            trainable_state_dict)
from blockdiff.objective.loss import ObjectiveSettings, compute_loss, count_scored, draw_noise

V, C = 128, 8
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lcfg(**kw):
    return {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ALL, "self_conditioning": False, "experts": False,
            **kw}


def inputs(seed=1, B=2, P=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (B, P), generator=g), torch.randint(3, V, (B, C), generator=g)


def batch(seed=2):
    g = torch.Generator().manual_seed(seed)
    P, N = [5, 7], [2, 1]
    L = max(p + n * C for p, n in zip(P, N))
    ids = torch.randint(3, V, (2, L), generator=g)
    valid = torch.zeros(2, L, dtype=torch.bool)
    for b, (p, n) in enumerate(zip(P, N)):
        valid[b, : p + n * C] = True
    ids[~valid] = 0
    return CanvasBatch(ids, valid, torch.tensor(P), torch.tensor(N), torch.arange(2), C)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d, hf = make_hf_checkpoint(tmp_path_factory.mktemp("base"), num_layers=4)
    return d, hf


def test_structure_names_and_dtypes(ckpt):
    model = load_blockdiff(ckpt[0])
    apply_lora(model, lcfg(self_conditioning=True, experts=True))
    names = dict(model.named_parameters())
    assert "layers.0.self_attn.q_proj.base.weight" in names and "layers.0.self_attn.q_proj.lora_A" in names
    assert "layers.0.experts.adapter.gate_up_A" in names and "self_conditioning.gate_proj.lora_B" in names
    trainable = set(trainable_state_dict(model))
    assert trainable and all(("lora_" in n) or (".adapter." in n) for n in trainable)
    assert not any(isinstance(m, LoraLinear) for n, m in model.named_modules() if "router" in n)
    a = model.layers[0].experts.adapter
    E = model.config.num_experts
    assert a.gate_up_A.shape == (E, 4, 32) and a.gate_up_B.shape == (E, 32, 4)  # 2*moe_intermediate = 32
    cast_frozen_base_(model, torch.bfloat16)
    assert model.layers[0].self_attn.q_proj.base.weight.dtype == torch.bfloat16
    assert model.layers[0].experts.gate_up_proj.dtype == torch.bfloat16
    assert model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32
    assert model.layers[0].input_layernorm.weight.dtype == torch.float32
    prompt, canvas = inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 base is meant for autocast
        assert torch.isfinite(model.denoise_logits(prompt, canvas)).all()


@pytest.mark.slow
def test_only_adapters_train_and_base_is_unchanged(ckpt):
    model = load_blockdiff(ckpt[0]).train()
    apply_lora(model, lcfg(experts=True, self_conditioning=True))
    frozen = {n: t.clone() for n, t in model.state_dict().items() if n not in trainable_state_dict(model)}
    before = {n: p.detach().clone() for n, p in trainable_state_dict(model).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    settings = ObjectiveSettings.from_config(ObjectiveSection())
    for step in range(3):
        b = batch(seed=step)
        noise = draw_noise(b, torch.arange(2) + 2 * step, seed=0, vocab_size=V, eps=settings.eps, sc_prob=1.0)
        nd, na = count_scored(b, noise, settings)
        out = compute_loss(model, b, noise, settings, nd, na)
        out["loss"].backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
        opt.step()
        opt.zero_grad(set_to_none=True)
    for n, t in model.state_dict().items():
        if n in frozen:
            assert torch.equal(t, frozen[n]), n
    moved = [n for n, p in trainable_state_dict(model).items() if not torch.equal(p, before[n])]
    assert any(".lora_B" in n for n in moved) and any("adapter.down_B" in n for n in moved)
    assert any("self_conditioning" in n for n in moved)


def test_merge_equals_adapted_logits(ckpt, tmp_path):
    model = load_blockdiff(ckpt[0])
    apply_lora(model, lcfg(experts=True, self_conditioning=True))
    randomize_lora_b(model, 0, std=0.1)
    prompt, canvas = inputs()
    sc = torch.randn(2, C, V)
    with torch.no_grad():
        adapted = model.denoise_logits(prompt, canvas, sc)
        plain = load_blockdiff(ckpt[0]).denoise_logits(prompt, canvas, sc)
        merge_lora_(model)
        merged = model.denoise_logits(prompt, canvas, sc)
    assert (adapted - plain).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert not any(isinstance(m, (LoraLinear, ExpertLora)) for m in model.modules())
    # the merged model saves as a normal transformers checkpoint and reloads to the same logits
    model.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        again = load_blockdiff(tmp_path / "merged").denoise_logits(prompt, canvas, sc)
    torch.testing.assert_close(again, adapted, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("self_conditioning", [False, True])
def test_peft_loads_adapter_and_reproduces_logits(ckpt, tmp_path, self_conditioning):
    import peft
    import transformers

    model = load_blockdiff(ckpt[0])
    apply_lora(model, lcfg(self_conditioning=self_conditioning))
    randomize_lora_b(model, 3, std=0.1)
    out = save_peft_adapter(model, tmp_path / "adapter", str(ckpt[0]))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    base = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(ckpt[0]).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(base, out).eval()
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    # injected into BOTH tied trees, and into the self-conditioning block only when asked
    inner = pm.base_model.model.model
    for tree in (inner.encoder.language_model.layers[1], inner.decoder.layers[1]):
        for mod in (tree.self_attn.q_proj, tree.self_attn.o_proj, tree.mlp.down_proj):
            assert hasattr(mod, "lora_A"), mod
    assert hasattr(inner.decoder.self_conditioning.gate_proj, "lora_A") == self_conditioning
    assert not any("vision" in n for n, _ in pm.named_modules() if n.endswith("lora_A"))
    n_lora = sum(1 for n, _ in pm.named_parameters() if "lora_" in n)
    assert n_lora == len(load_file(str(out / "adapter_model.safetensors")))
    prompt, canvas = inputs(seed=5)
    sc = torch.randn(2, C, V)
    with torch.no_grad():
        ours = model.denoise_logits(prompt, canvas, sc)
        theirs = pm(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
        plain = load_blockdiff(ckpt[0]).denoise_logits(prompt, canvas, sc)
    assert (ours - plain).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    # and back: the PEFT directory loads into a fresh blockdiff model with the same logits
    fresh = load_peft_adapter(load_blockdiff(ckpt[0]), out)
    with torch.no_grad():
        torch.testing.assert_close(fresh.denoise_logits(prompt, canvas, sc), ours, atol=1e-6, rtol=0)
    merged = load_model_with_adapter(ckpt[0], out, dtype=torch.float32, attn_backend="sdpa")
    with torch.no_grad():
        torch.testing.assert_close(merged.denoise_logits(prompt, canvas, sc), ours, atol=1e-5, rtol=0)


def test_expert_adapters_roundtrip_through_separate_file(ckpt, tmp_path):
    model = load_blockdiff(ckpt[0])
    apply_lora(model, lcfg(experts=True))
    randomize_lora_b(model, 4, std=0.1)
    with pytest.warns(UserWarning, match="PEFT cannot express"):
        out = save_peft_adapter(model, tmp_path / "adapter")
    assert (out / EXPERT_FILE).is_file()
    prompt, canvas = inputs()
    fresh = load_peft_adapter(load_blockdiff(ckpt[0]), out)
    with torch.no_grad():
        torch.testing.assert_close(fresh.denoise_logits(prompt, canvas), model.denoise_logits(prompt, canvas),
                                   atol=1e-6, rtol=0)


def test_expert_lora_gradients_match_loop_over_experts(ckpt):
    torch.manual_seed(0)
    experts = load_blockdiff(ckpt[0]).layers[0].experts
    adapter = ExpertLora(experts, rank=3, alpha=6.0)
    with torch.no_grad():
        for name in ExpertLora.NAMES:
            adapter.factors(name)[1].normal_(0, 0.2)
    experts.adapter = adapter
    T, K, E = 11, 2, experts.num_experts
    x = torch.randn(T, 32, requires_grad=True)
    index = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    weights = torch.rand(T, K)
    out = experts(x, weights, index)
    g = torch.randn_like(out)
    params = [x] + [p for n in ExpertLora.NAMES for p in adapter.factors(n)]
    grads = torch.autograd.grad((out * g).sum(), params)

    def reference():
        y = torch.zeros_like(x)
        for t in range(T):
            for k in range(K):
                e = int(index[t, k])
                A, B = adapter.factors("gate_up_proj")
                gu = x[t] @ experts.gate_up_proj[e].t() + (x[t] @ A[e].t()) @ B[e].t() * adapter.scaling
                gate, up = gu.chunk(2)
                inner = experts.act(gate) * up
                A, B = adapter.factors("down_proj")
                h = inner @ experts.down_proj[e].t() + (inner @ A[e].t()) @ B[e].t() * adapter.scaling
                y[t] = y[t] + weights[t, k] * h
        return y

    ref = reference()
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(gr.abs().sum() > 0 for gr in grads)


@pytest.mark.slow
def test_adapter_for_a_different_base_is_refused(ckpt, tmp_path):
    model = load_blockdiff(ckpt[0])
    apply_lora(model, lcfg())
    out = save_peft_adapter(model, tmp_path / "adapter", str(ckpt[0]))
    other_dir, _ = make_hf_checkpoint(tmp_path, seed=1, num_layers=4, hidden_size=48)
    with pytest.raises(CheckpointError, match="adapter for a different base"):
        load_peft_adapter(load_blockdiff(other_dir), out)  # named base differs
    with pytest.raises(CheckpointError, match="adapter for a different base"):
        load_peft_adapter(load_blockdiff(other_dir), out, check_base=False)  # shapes differ
    deeper = save_peft_adapter(_six_layer(tmp_path), tmp_path / "deep")
    with pytest.raises(CheckpointError, match="adapter for a different base"):
        load_peft_adapter(load_blockdiff(ckpt[0]), deeper, check_base=False)  # layers the model lacks


def _six_layer(tmp_path):
    d, _ = make_hf_checkpoint(tmp_path, seed=2, num_layers=6)
    m = load_blockdiff(d)
    apply_lora(m, lcfg())
    return m


@pytest.mark.slow
def test_lora_run_end_to_end(tmp_path):
    from blockdiff.data.synthetic import write_splits
    from blockdiff.checkpoint.export import export_run
    from blockdiff.train.loop import train

    train_path, _ = write_splits(tmp_path / "data", 16, 4, seed=0)
    fast = ["--train.global_batch_size", "2", "--train.micro_batch_size", "2", "--train.log_every", "1",
            "--logging.progress", "false", "--logging.tensorboard", "false"]

    def cfg(out, steps, *extra):
        return load_config(demo_config_path(), ["--data.train_path", str(train_path), "--train.output_dir", str(out),
                                                "--train.max_steps", str(steps), "--lora.enabled", "true",
                                                "--lora.rank", "4", *fast, *extra])

    run = train(cfg(tmp_path / "run", 3, "--checkpoint.every_steps", "2"))
    ckpt = run / "checkpoints" / "step_00000003"
    meta = json.loads((ckpt / "meta.json").read_text())
    state = load_file(str(ckpt / "model.safetensors"))
    assert meta["adapters_only"] and state and all("lora_" in k for k in state)
    export = run / "export"
    assert (export / "config.json").is_file() and (export / "adapter" / "adapter_config.json").is_file()
    assert json.loads((export / "adapter" / "adapter_config.json").read_text())["r"] == 4

    # resume from step 2 (adapters + optimizer only) reproduces the step-3 adapters
    resumed_dir = tmp_path / "resumed"
    train(cfg(resumed_dir, 2, "--checkpoint.every_steps", "2", "--checkpoint.export_final", "false"))
    train(cfg(resumed_dir, 3, "--checkpoint.every_steps", "2", "--checkpoint.export_final", "false"))
    again = load_file(str(resumed_dir / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert all(torch.equal(state[k], again[k]) for k in state)

    # export --merge == the in-run export; the unmerged export is the PEFT adapter
    merged = export_run(run, tmp_path / "merged", merge=True)
    a, b = load_file(str(merged / "model.safetensors")), load_file(str(export / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    adapter = export_run(run, tmp_path / "adapter_only")
    assert (adapter / "adapter_model.safetensors").is_file()
