"""Checkpoint I/O against transformers' own DiffusionGemma checkpoints (the oracle)."""

import json
import shutil

import pytest
import torch
import transformers
from helpers import load_blockdiff, make_hf_checkpoint, tiny_hf_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from blockdiff.errors import CheckpointError
from blockdiff.model.hf import io as hf_io, load as hf_load, save as hf_save

VOCAB = 128


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from intra-op threads; on a shared, loaded CPU they cost ~4x wall time.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def inputs(batch, prompt_len, canvas=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, VOCAB, (batch, prompt_len), generator=g)
    canvas_ids = torch.randint(3, VOCAB, (batch, canvas), generator=g)
    sc_logits = 3.0 * torch.randn(batch, canvas, VOCAB, generator=g)
    sc_mask = torch.arange(batch) % 2 == 0  # mixed: some examples use SC, others get zeros
    return prompt, canvas_ids, sc_logits, sc_mask


@torch.no_grad()
def assert_parity(model, hf, batch, prompt_len, canvas=8, tol=1e-4):
    prompt, canvas_ids, sc_logits, sc_mask = inputs(batch, prompt_len, canvas)
    ours = model.denoise_logits(prompt, canvas_ids)
    ref = hf(input_ids=prompt, decoder_input_ids=canvas_ids).logits
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= tol
    ours = model.denoise_logits(prompt, canvas_ids, self_conditioning_logits=sc_logits,
                                self_conditioning_mask=sc_mask)
    ref = hf(input_ids=prompt, decoder_input_ids=canvas_ids, self_conditioning_logits=sc_logits,
             self_conditioning_mask=sc_mask).logits
    assert (ours - ref).abs().max().item() <= tol


def tensors_of(ckpt_dir):
    """{name: (dtype string, raw bytes)} of every tensor in a checkpoint."""
    out = {}
    for name, file in hf_load.weight_map(ckpt_dir).items():
        with safe_open(str(ckpt_dir / file), "pt") as f:
            t = f.get_tensor(name)
        out[name] = (str(t.dtype), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


# ---- parity ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("cfg,batch,prompt_len", [
    (dict(num_layers=6), 2, 13),
    (dict(num_layers=12, kv_heads=1), 3, 9),
    (dict(num_layers=18, hidden_size=16, intermediate_size=24, moe_intermediate_size=8), 2, 7),
    (dict(num_layers=6, kv_heads=4), 3, 5),
    (dict(num_layers=6, sliding_window=4), 2, 13),  # window shorter than the prompt
    (dict(num_layers=6, kv_heads=4, sliding_window=4), 3, 13),
])
def test_parity_with_transformers(tmp_path, cfg, batch, prompt_len):
    ckpt, hf = make_hf_checkpoint(tmp_path, **cfg)
    model = load_blockdiff(ckpt)
    assert model.config.num_layers == cfg["num_layers"]
    assert_parity(model, hf, batch, prompt_len)


@pytest.mark.slow
def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    single, hf = make_hf_checkpoint(tmp_path, seed=3)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / hf_load.INDEX).is_file() and not (sharded / hf_load.SINGLE).exists()
    a, b = load_blockdiff(single), load_blockdiff(sharded)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert_parity(b, hf, 2, 10)
    assert len(set(b.hf_source["carried"].values())) > 1  # carried tensors remembered per shard


def test_dtype_and_meta_free_load(tmp_path):
    ckpt, _ = make_hf_checkpoint(tmp_path)
    model = load_blockdiff(ckpt, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert model.rotary.inv_freq_full_attention.dtype == torch.float32  # rope tables stay fp32


# ---- round trips -------------------------------------------------------------------------------


@pytest.mark.slow
def test_blockdiff_save_loads_in_transformers(tmp_path):
    ckpt, hf = make_hf_checkpoint(tmp_path)
    (ckpt / "tokenizer_config.json").write_text('{"x": 1}')
    (ckpt / "chat_template.jinja").write_text("{{ messages }}")
    model = load_blockdiff(ckpt)
    out = tmp_path / "export"
    model.save_pretrained(out)
    assert (out / "tokenizer_config.json").read_text() == '{"x": 1}'
    assert (out / "chat_template.jinja").is_file() and (out / "generation_config.json").is_file()
    hf2, info = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_parity(model, hf2.eval(), 2, 11)
    assert not list(tmp_path.glob("export.tmp-*"))


def test_carried_tensors_byte_identical_and_text_equal(tmp_path):
    ckpt, _ = make_hf_checkpoint(tmp_path, shard_size="20KB")
    model = load_blockdiff(ckpt)
    carried = model.hf_source["carried"]
    assert any(k.startswith("model.encoder.vision_tower.") for k in carried)
    assert any(k.startswith("model.encoder.embed_vision.") for k in carried)
    out = tmp_path / "export"
    hf_save.save_pretrained(model, out, max_shard_size=30_000)
    assert (out / hf_load.INDEX).is_file()
    src, dst = tensors_of(ckpt), tensors_of(out)
    expected = {k for k in src if not k.startswith("lm_head.")}
    assert set(dst) == expected
    for name in expected:
        assert dst[name] == src[name], name  # carried: byte-identical; text: equal (fp32 in, fp32 out)


def test_save_in_bf16_writes_every_tensor_and_dtype_field_in_bf16(tmp_path):
    ckpt, _ = make_hf_checkpoint(tmp_path)  # an fp32 source
    model = load_blockdiff(ckpt)
    out = tmp_path / "bf16"
    hf_save.save_pretrained(model, out, dtype=torch.bfloat16)
    st = load_file(str(out / hf_load.SINGLE))
    assert {t.dtype for t in st.values()} == {torch.bfloat16}  # carried tensors included
    assert st["model.encoder.embed_vision.embedding_projection.weight"].equal(
        load_file(str(ckpt / hf_load.SINGLE))["model.encoder.embed_vision.embedding_projection.weight"].bfloat16())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_replaces_previous_export_only(tmp_path):
    ckpt, _ = make_hf_checkpoint(tmp_path)
    model = load_blockdiff(ckpt)
    out = tmp_path / "export"
    model.save_pretrained(out)
    model.save_pretrained(out, max_shard_size=30_000)  # a previous export is replaced
    assert (out / hf_load.INDEX).is_file() and not (out / hf_load.SINGLE).exists()
    other = tmp_path / "not-an-export"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        model.save_pretrained(other)
    assert (other / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_from_config_saves_and_transformers_loads(tmp_path):
    model = hf_io.from_config(tiny_hf_config(num_layers=6), seed=1)
    assert model.hf_source is None
    out = tmp_path / "fresh"
    model.save_pretrained(out)
    hf, info = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_parity(model.eval(), hf.eval(), 2, 9)
    again = hf_io.from_config(tiny_hf_config(num_layers=6).to_dict(), seed=1)  # kwargs dict works too
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_num_layers_reduction_round_trip(tmp_path):
    ckpt, _ = make_hf_checkpoint(tmp_path, num_layers=12)
    model = load_blockdiff(ckpt, num_layers=6)
    assert model.config.num_layers == 6 and len(model.layers) == 6
    out = tmp_path / "six"
    model.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())["text_config"]
    assert cfg["num_hidden_layers"] == 6 and len(cfg["layer_types"]) == 6
    assert all(int(k) < 6 for k in cfg.get("per_layer_config", {}))
    hf6, info = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_parity(model, hf6.eval(), 2, 10)
    # A reduced depth that ends on a sliding layer still loads in blockdiff (training runs).
    four = load_blockdiff(ckpt, num_layers=4)
    assert four.config.layer_types[-1] == "sliding_attention"
    with pytest.raises(CheckpointError, match="num_layers"):
        load_blockdiff(ckpt, num_layers=13)


# ---- bad checkpoints ---------------------------------------------------------------------------


@pytest.fixture
def ckpt_copy(tmp_path):
    ckpt, _ = make_hf_checkpoint(tmp_path, shard_size="20KB")
    return ckpt


def test_missing_shard(ckpt_copy):
    wm = hf_load.weight_map(ckpt_copy)
    shard = wm["model.decoder.layers.3.mlp.up_proj.weight"]
    (ckpt_copy / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"{shard}.*missing \(it holds tensor model\.decoder\."):
        load_blockdiff(ckpt_copy)


def test_missing_tensor(ckpt_copy):
    name = "model.decoder.layers.3.mlp.up_proj.weight"
    index = json.loads((ckpt_copy / hf_load.INDEX).read_text())
    del index["weight_map"][name]
    (ckpt_copy / hf_load.INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{hf_load.INDEX}.*missing tensor {name} \(expected in"):
        load_blockdiff(ckpt_copy)


def test_wrong_shape(tmp_path):
    ckpt, _ = make_hf_checkpoint(tmp_path)
    name = "model.decoder.layers.2.self_attn.q_proj.weight"
    st = load_file(str(ckpt / hf_load.SINGLE))
    st[name] = torch.zeros(7, 32)
    save_file(st, str(ckpt / hf_load.SINGLE), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"model\.safetensors.*{name} has shape \[7, 32\], model expects \[32, 32\]"):
        load_blockdiff(ckpt)


def test_unknown_model_type(tmp_path):
    ckpt, _ = make_hf_checkpoint(tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json.*'llama', expected 'diffusion_gemma'"):
        load_blockdiff(ckpt)


def test_truncated_file(tmp_path):
    ckpt, _ = make_hf_checkpoint(tmp_path)
    path = ckpt / hf_load.SINGLE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(corrupted|truncated)"):
        load_blockdiff(ckpt)


def test_pickle_only_checkpoint_refused(tmp_path):
    ckpt, _ = make_hf_checkpoint(tmp_path)
    (ckpt / hf_load.SINGLE).unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*only safetensors are read"):
        load_blockdiff(ckpt)


def test_offline_hub_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"cannot download google/diffusiongemma-26B-A4B-it: offline / no network"):
        load_blockdiff("google/diffusiongemma-26B-A4B-it")


def test_offline_hub_id_served_from_hf_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    ckpt, hf = make_hf_checkpoint(tmp_path)
    cache = tmp_path / "hub-cache"
    repo = cache / "models--org--tiny-dgemma"
    commit = "0" * 40
    shutil.copytree(ckpt, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    model = load_blockdiff("org/tiny-dgemma")
    assert model.hf_source["dir"].endswith(commit)
    assert_parity(model, hf, 2, 6)


def test_missing_local_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_blockdiff(str(tmp_path / "nope"))


def test_copy_tokenizer(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json", "other.txt"):
        (src / name).write_text(name)
    assert sorted(hf_save.copy_tokenizer(src, dst)) == ["special_tokens_map.json", "tokenizer.json"]
    assert not (dst / "other.txt").exists()
    shutil.rmtree(src)
