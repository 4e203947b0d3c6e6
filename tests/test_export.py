"""Export at scale: a 2-process FSDP2 + EP export equals the 1-process export byte for byte; the writer's
held bytes stay within one shard plus one tensor; tokenizer / processor files and dtype fields; the
export loads in transformers and its PEFT adapter in peft; ``blockdiff export`` of a sharded (DCP)
checkpoint; bad input.

The source is a bf16 checkpoint written by transformers (tiny config, 4 experts) with tokenizer and
processor files; models hold fp32 masters, so the default export (the source's dtype) is bf16.
"""

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from helpers import randomize_hf_model, tiny_hf_config
from safetensors import safe_open

from blockdiff.config.schema import apply_world_size, demo_config_path, load_config
from blockdiff.parallel.distributed import DistInfo
from blockdiff.errors import CheckpointError
from blockdiff.model.hf import io as hf_io, load as hf_load, save as hf_save

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import dist_worker  # noqa: E402
from helpers import torchrun  # noqa: E402

CARRIED_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
                 "preprocessor_config.json", "generation_config.json"]
ONE = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """bf16 transformers checkpoint + the tokenizer and processor files of a released checkpoint."""
    from blockdiff.data import load_tiny_tokenizer

    config = tiny_hf_config()
    config.vision_config.position_embedding_size, config.vision_config.patch_size = 64, 4  # a small tower
    torch.manual_seed(0)
    hf = randomize_hf_model(transformers.DiffusionGemmaForBlockDiffusion(config))
    src = tmp_path_factory.mktemp("src") / "bf16"
    hf.to(torch.bfloat16).save_pretrained(src)
    load_tiny_tokenizer().save_pretrained(src)
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (src / "processor_config.json").write_text(json.dumps({"processor_class": "Gemma4Processor",
                                                          "image_seq_length": 280}))
    (src / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "Gemma4ImageProcessor"}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["dtype"] = "bfloat16"  # the released config names the dtype in text_config too
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    return src


@pytest.fixture(scope="module")
def exports(source, tmp_path_factory):
    """(1-process exports, 2-process exports, 2-process writer stats) of every ``EXPORT_CASES`` model."""
    root = tmp_path_factory.mktemp("exports")
    one, two = root / "one", root / "two"
    dist_worker.export_models(one, str(source))
    torchrun(2, "export", two, str(source))
    return one, two, json.loads((two / "stats.json").read_text())


def files_of(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def tensors_of(d: Path) -> dict[str, tuple[str, bytes]]:
    out = {}
    for name, file in hf_load.weight_map(d).items():
        with safe_open(str(d / file), "pt") as f:
            t = f.get_tensor(name)
        out[name] = (str(t.dtype), t.view(torch.uint8).numpy().tobytes())
    return out


def case_model(source, case):
    cfg = load_config(demo_config_path(), ["--train.output_dir", "unused", "--data.train_path", "unused"])
    apply_world_size(cfg, 1)
    return dist_worker.export_case_model(str(source), case, cfg, ONE).eval()


def inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (2, 9), generator=g), torch.randint(3, 128, (2, 8), generator=g)


# ---- sharded == one process, bounded writer ----------------------------------------------------


@pytest.mark.dist
@pytest.mark.parametrize("case", list(dist_worker.EXPORT_CASES))
def test_two_process_export_equals_one_process_byte_for_byte(exports, case):
    one, two, stats = exports
    a, b = files_of(one / case), files_of(two / case)
    assert sorted(a) == sorted(b)
    assert [n for n in a if a[n] != b[n]] == []
    shards = [n for n in a if n.startswith("model-")]
    assert len(shards) >= 4 and hf_load.INDEX in a  # the checkpoint spans several shards
    assert {t[0] for t in tensors_of(one / case).values()} == {"torch.bfloat16"}
    if case != "full":
        assert "adapter/adapter_config.json" in a and "adapter/adapter_model.safetensors" in a
    # rank 0 never held more than one shard plus the largest tensor, far less than the whole state
    largest = max(len(raw) for _, raw in tensors_of(one / case).values())
    held, total = stats[case]["peak_bytes"], stats[case]["total_size"]
    assert 0 < held <= dist_worker.EXPORT_SHARD + largest
    assert held < total / 4


@pytest.mark.dist
def test_a_failure_on_rank_0_is_raised_on_every_rank_and_keeps_the_export(exports, source):
    _, two, _ = exports
    for rank in (0, 1):
        refused = (two / f"failure.refused.rank{rank}").read_text()
        assert ("refusing to overwrite: the export path is a file" if rank == 0 else "rank 0 could not start") \
            in refused, refused
        disk_full = (two / f"failure.disk_full.rank{rank}").read_text()
        assert "could not write the export" in disk_full and "previous export there is intact" in disk_full
    assert "No space left" in (two / "failure.disk_full.rank0").read_text()
    assert (two / "a-file").read_text() == "keep"
    assert files_of(two / "full") == files_of(exports[0] / "full")  # the earlier export, untouched
    assert not list(two.glob("*.tmp-*"))


@pytest.mark.dist
def test_export_is_the_source_with_its_files_and_dtype_fields(exports, source):
    one, _, _ = exports
    out = one / "full"
    src, got = tensors_of(source), tensors_of(out)
    assert set(got) == {k for k in src if not k.startswith("lm_head.")}
    assert [k for k in got if got[k] != src[k]] == []  # bf16 -> fp32 masters -> bf16: the same bytes
    for name in CARRIED_FILES:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["text_config"]["dtype"] == "bfloat16"
    index = json.loads((out / hf_load.INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(len(raw) for _, raw in got.values())
    hf = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(source)
    assert index["metadata"]["total_parameters"] == hf.num_parameters()
    tok_src, tok_out = (transformers.AutoTokenizer.from_pretrained(d) for d in (source, out))
    text = "Natalia sold 48 clips"
    assert tok_out(text).input_ids == tok_src(text).input_ids
    assert tok_out.chat_template == tok_src.chat_template


def assert_rounded_from(low: Path, high: Path) -> None:
    """Every tensor of the export ``low`` is the one of ``high`` in ``low``'s dtype (same names)."""
    assert set(hf_load.weight_map(low)) == set(hf_load.weight_map(high))
    for name, file in hf_load.weight_map(low).items():
        with safe_open(str(low / file), "pt") as f, safe_open(str(high / hf_load.weight_map(high)[name]), "pt") as g:
            a = f.get_tensor(name)
            assert torch.equal(a, g.get_tensor(name).to(a.dtype)), name


def hf_and_blockdiff_logits(export: Path, prompt, canvas):
    hf, info = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(export, dtype=torch.float32,
                                                                           output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = hf_io.load_pretrained(export, attn_backend="sdpa").eval()
    with torch.no_grad():
        return hf.eval()(input_ids=prompt, decoder_input_ids=canvas).logits, ours.denoise_logits(prompt, canvas)


@pytest.mark.dist
def test_export_loads_in_transformers_with_blockdiff_logits(exports, source, tmp_path):
    from blockdiff.checkpoint.live_export import export_model

    one, _, _ = exports
    prompt, canvas = inputs()
    for case in ("full", "lora_experts"):
        theirs, ours = hf_and_blockdiff_logits(one / case, prompt, canvas)
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
        trained = case_model(source, case)
        with torch.no_grad():
            expected = trained.denoise_logits(prompt, canvas)
        if case == "full":  # the export holds the source's bf16 values exactly
            torch.testing.assert_close(theirs, expected, atol=1e-4, rtol=0)
            continue
        # LoRA: the merge is exact in fp32, and the bf16 export is that merge rounded to bf16
        fp32 = tmp_path / "fp32"
        export_model(trained, fp32, dtype="float32", max_shard_size=dist_worker.EXPORT_SHARD,
                     lora_cfg=dist_worker.EXPORT_CASES[case])
        theirs32, _ = hf_and_blockdiff_logits(fp32, prompt, canvas)
        torch.testing.assert_close(theirs32, expected, atol=1e-4, rtol=0)
        assert_rounded_from(one / case, fp32)


@pytest.mark.dist
def test_peft_adapter_of_the_sharded_export_loads_onto_the_source(exports, source):
    import peft

    _, two, _ = exports
    adapter = two / "lora" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(source)
    base = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(source, dtype=torch.float32).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(base, adapter).eval()
    assert not [str(w.message) for w in caught if "missing" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()]
    prompt, canvas = inputs(5)
    ours = case_model(source, "lora")
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=prompt, decoder_input_ids=canvas).logits,
                                   ours.denoise_logits(prompt, canvas), atol=1e-4, rtol=0)


# ---- blockdiff export RUN_DIR (a DCP checkpoint, streamed) ---------------------------------------


def make_run(tmp_path, source, case) -> Path:
    """A run dir whose checkpoint is a DCP (sharded-format) checkpoint of the case's model."""
    from blockdiff.checkpoint.training import save_sharded_checkpoint

    run = tmp_path / f"run-{case}"
    overrides = ["--train.output_dir", str(run), "--data.train_path", "unused", "--model.name_or_path", str(source),
                 "--data.tokenizer", str(source)]
    for k, v in (dist_worker.EXPORT_CASES[case] or {}).items():
        overrides += [f"--lora.{k}", json.dumps(v)]
    if dist_worker.EXPORT_CASES[case] is not None:
        overrides += ["--lora.enabled", "true"]
    cfg = load_config(demo_config_path(), overrides)
    cfg.model.from_config = None
    run.mkdir()
    cfg.save_yaml(run / "config.yaml")
    save_sharded_checkpoint(run, 3, case_model(source, case), None, {"world_size": 1})
    return run


@pytest.mark.dist
@pytest.mark.parametrize("case", ["full", "lora_experts"])
def test_cli_export_of_a_sharded_checkpoint_streams_the_same_bytes(exports, source, tmp_path, case):
    from blockdiff.cli.main import main
    from blockdiff.checkpoint.export import export_run

    one, _, _ = exports
    run = make_run(tmp_path, source, case)
    assert json.loads((run / "checkpoints" / "step_00000003" / "meta.json").read_text())["format"].endswith("dcp-v1")
    out = export_run(run, tmp_path / "out", merge=case != "full", max_shard_size=dist_worker.EXPORT_SHARD)
    assert tensors_of(out) == tensors_of(one / case)
    assert json.loads((out / hf_load.INDEX).read_text()) == json.loads((one / case / hf_load.INDEX).read_text())
    if case != "full":
        adapter_only = export_run(run, tmp_path / "adapter")  # no --merge: the PEFT adapter, no base read
        assert files_of(adapter_only) == files_of(one / case / "adapter")
        return
    assert main(["export", str(run), "--out", str(tmp_path / "fp32"), "--dtype", "float32"]) == 0
    fp32 = tensors_of(tmp_path / "fp32")
    assert {d for d, _ in fp32.values()} == {"torch.float32"}
    cfg = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert cfg["dtype"] == "float32" and cfg["text_config"]["dtype"] == "float32"
    assert_rounded_from(one / case, tmp_path / "fp32")  # fp32 holds the bf16 source's values, upcast


# ---- bad input -------------------------------------------------------------------------------------


@pytest.mark.dist
def test_bad_dtype_and_out_paths_are_refused_and_leave_exports_intact(exports, source, tmp_path, capsys):
    from blockdiff.cli.main import main
    from blockdiff.checkpoint.export import export_run

    model = hf_io.load_pretrained(source, attn_backend="sdpa")
    with pytest.raises(CheckpointError, match="unknown export dtype 'float16'"):
        hf_save.save_pretrained(model, tmp_path / "x", dtype="float16")
    with pytest.raises(CheckpointError, match="unknown export dtype 'fp8'"):
        export_run(tmp_path / "no-run", dtype="fp8")
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path), "--dtype", "float16"])
    assert e.value.code == 2 and "invalid choice: 'float16'" in capsys.readouterr().err
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        model.save_pretrained(a_file)
    assert a_file.read_text() == "keep"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not a previous export"):
        model.save_pretrained(notes)
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.dist
def test_failed_write_leaves_the_previous_export_intact(exports, source, tmp_path, monkeypatch):
    one, _, _ = exports
    out = tmp_path / "export"
    shutil.copytree(one / "full", out)
    before = files_of(out)
    model = hf_io.load_pretrained(source, attn_backend="sdpa")
    real, written = hf_save.save_file, []

    def disk_full_on_third_shard(tensors, path, metadata=None):
        written.append(path)
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf_save, "save_file", disk_full_on_third_shard)
    with pytest.raises(CheckpointError, match="could not write the export .*No space left.*previous export"):
        model.save_pretrained(out, max_shard_size=dist_worker.EXPORT_SHARD)
    assert files_of(out) == before
    assert not list(tmp_path.glob("export.tmp-*"))
