"""The public Python API: ``import blockdiff`` is cheap, every name is the real object, and a script
trains, exports, loads, denoises and generates through it alone."""

import importlib
import json
import subprocess
import sys

import pytest
import torch

import blockdiff

EXPECTED = {
    "DiffusionGemma": "blockdiff.model.diffusion_gemma",
    "Config": "blockdiff.config.schema",
    "load_config": "blockdiff.config.schema",
    "config_from_dict": "blockdiff.config.schema",
    "export_run": "blockdiff.checkpoint.export",
    "SamplerSettings": "blockdiff.infer.settings",
    "generate": "blockdiff.infer.sampling",
    "generate_text": "blockdiff.infer.prompting",
    "load_for_inference": "blockdiff.infer.evaluate",
    "preview_rows": "blockdiff.data.preview",
    "BlockdiffError": "blockdiff.errors",
    "ConfigError": "blockdiff.errors",
    "DataError": "blockdiff.errors",
    "CheckpointError": "blockdiff.errors",
}


def test_import_blockdiff_loads_no_torch():
    code = ("import json, sys, blockdiff; assert 'torch' not in sys.modules, 'torch'; "
            "blockdiff.load_config, blockdiff.ConfigError; assert 'torch' not in sys.modules, 'config'; "
            "print(json.dumps(blockdiff.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == blockdiff.__all__


def test_every_public_name_is_the_real_object():
    for name, module in EXPECTED.items():
        assert getattr(blockdiff, name) is getattr(importlib.import_module(module), name), name
        assert name in blockdiff.__all__ and name in dir(blockdiff)
    import blockdiff.train.loop as train_module  # the module keeps its name; the loop is blockdiff.fit

    assert blockdiff.fit is train_module.train and blockdiff.train.loop is train_module
    assert set(blockdiff.__all__) == {*EXPECTED, "fit", "__version__"}
    for name in ("from_pretrained", "save_pretrained", "denoise_logits"):
        assert getattr(blockdiff.DiffusionGemma, name).__doc__, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        blockdiff.nope


@pytest.mark.slow
def test_script_trains_exports_loads_denoises_and_generates(tmp_path):
    from blockdiff.data.synthetic import generate as synthetic_rows

    rows = synthetic_rows(8, seed=0)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    C = 16
    cfg = blockdiff.config_from_dict({
        "model": {"name_or_path": "tiny", "dtype": "float32", "from_config": {
            "canvas_length": C,
            "text_config": {"vocab_size": 1024, "hidden_size": 32, "intermediate_size": 64,
                            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                            "head_dim": 16, "global_head_dim": 32, "num_global_key_value_heads": 1,
                            "sliding_window": 32, "num_experts": 4, "top_k_experts": 2,
                            "moe_intermediate_size": 16, "layer_types": ["sliding_attention", "full_attention"]},
            "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8}}},
        "data": {"train_path": str(data), "tokenizer": "tiny", "seq_length": 80, "canvas_length": C},
        "train": {"max_steps": 2, "global_batch_size": 2, "micro_batch_size": 2, "log_every": 1,
                  "output_dir": str(tmp_path / "run")},
        "checkpoint": {"every_steps": 0, "export_final": False},
        "logging": {"progress": False, "tensorboard": False},
    })
    assert isinstance(cfg, blockdiff.Config)
    run_dir = blockdiff.fit(cfg)
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)] == [1, 2]

    export_dir = blockdiff.export_run(run_dir)
    model = blockdiff.DiffusionGemma.from_pretrained(export_dir).eval()
    _, tokenizer, device = blockdiff.load_for_inference(export_dir, device="cpu")
    prompt = tokenizer(rows[0]["messages"][0]["content"], return_tensors="pt")["input_ids"]
    canvas = torch.randint(0, model.config.vocab_size, (1, C), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.denoise_logits(prompt, canvas)
        conditioned = model.denoise_logits(prompt, canvas, self_conditioning_logits=logits)
    assert logits.shape == (1, C, model.config.vocab_size) and torch.isfinite(logits).all()
    assert not torch.equal(logits, conditioned)  # the self-conditioning input reaches the decoder

    settings = blockdiff.SamplerSettings(max_new_tokens=2 * C, max_denoising_steps=3, seed=0, compile=False,
                                         cuda_graphs=False)
    tokens = blockdiff.generate(model, [prompt[0].tolist()], settings)
    assert len(tokens) == 1 and len(tokens[0]) <= 2 * C
    assert all(0 <= t < model.config.vocab_size for t in tokens[0])
    texts = blockdiff.generate_text(model, tokenizer, [rows[1]["messages"][:1]], settings)
    assert len(texts) == 1 and isinstance(texts[0], str)
