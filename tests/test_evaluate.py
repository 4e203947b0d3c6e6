"""Answer extraction, Wilson CI, evaluate_gsm8k's JSONL/metrics, and the generate/eval CLIs."""

import json
from pathlib import Path

import pytest
import torch

from blockdiff.infer import evaluate, prompting, sampling
from blockdiff.data import load_tiny_tokenizer, synthetic
from blockdiff.errors import BlockdiffError
from blockdiff.infer.evaluate import extract_answer, normalize_number, wilson_interval
from blockdiff.infer.settings import SamplerSettings
from helpers import make_hf_checkpoint

EXTRACTION_CASES = [
    ("3 + 4 = 7\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("The total is $1,234,567.00\n#### $1,234,567.00", "1234567"),
    ("#### 3.50", "3.5"),
    ("#### 42.", "42"),
    ("#### -5", "-5"),
    ("#### \u22128", "-8"),
    ("#### $18", "18"),
    ("#### 0.25", "0.25"),
    ("#### .5", "0.5"),
    ("#### 50%", "50"),
    ("#### The answer is 12 apples.", "12"),
    ("So she has 5 + 6 = 11 pens left.", "11"),  # no '####': last number
    ("He pays $3.00 in total.", "3"),
    ("first #### 4\nthen #### 9", "9"),  # the last '####' wins
    ("####", None),
    ("#### none\nwe got 6 before", "6"),  # nothing numeric after '####': last number before it
    ("no numbers here", None),
    ("", None),
    ("10 - 4 = 6", "6"),
    ("#### -0", "0"),
    ("#### 1,000\n<turn|>", "1000"),
]


@pytest.mark.parametrize("text,want", EXTRACTION_CASES)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_normalize_number():
    assert normalize_number("3.50") == normalize_number("3.5") == "3.5"
    assert normalize_number("4.0") == normalize_number("4") == "4"
    assert normalize_number(" $1,200. ") == "1200"
    assert normalize_number("abc") is None and normalize_number(None) is None
    assert normalize_number("1e400") == str(10**400)  # big but finite is fine
    assert normalize_number("nan") is None


def test_matches_synthetic_extractor_on_its_data():
    for row in synthetic.generate(30, seed=3):
        sol = row["messages"][-1]["content"]
        assert extract_answer(sol) == synthetic.extract_final_answer(sol)


def test_wilson_interval():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


# ---- evaluation on a tiny model -------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny(tok):
    from helpers import peaked_tiny_model

    return peaked_tiny_model(vocab=len(tok))


FAST = SamplerSettings(max_new_tokens=8, max_denoising_steps=2, eos_token_ids=(1, 6))


def test_evaluate_gsm8k_end_to_end(tiny, tok, tmp_path):
    rows = synthetic.generate(5, seed=1)
    out = tmp_path / "eval" / "preds.jsonl"
    res = evaluate.evaluate_gsm8k(tiny, tok, rows, FAST, batch_size=2, out_jsonl=out)
    assert res["n"] == 5 and 0 <= res["correct"] <= 5
    assert res["ci_low"] <= res["accuracy"] <= res["ci_high"]
    assert res["ci95"] == [res["ci_low"], res["ci_high"]]
    assert res["seconds"] > 0 and res["tokens_per_second"] >= 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 5
    for line, row in zip(lines, rows):
        assert set(line) == {"prompt", "output", "extracted", "gold", "correct"}
        assert line["prompt"] == row["messages"][0]["content"]
        assert line["gold"] == synthetic.final_answer_of_row(row)
    # per-example seeds: the batch size does not change any output
    res1 = evaluate.evaluate_gsm8k(tiny, tok, rows, FAST, batch_size=3, out_jsonl=tmp_path / "b3.jsonl")
    assert (tmp_path / "b3.jsonl").read_text() == out.read_text() and res1["correct"] == res["correct"]


def test_evaluate_gsm8k_scores_correctness(tok, monkeypatch, tmp_path):
    rows = synthetic.generate(4, seed=2)
    rows.append({"question": "How many?", "answer": "2 + 2 = 4\n#### 4"})  # raw GSM8K row
    answers = [f"so #### {synthetic.final_answer_of_row(r)}" for r in rows[:4]] + ["#### 5"]
    answers[1] = "I think 999"

    def fake_generate(model, prompts, settings, device=None, row_seeds=None):
        return [tok.encode(answers[s - settings.seed], add_special_tokens=False) for s in row_seeds]

    monkeypatch.setattr(sampling, "generate", fake_generate)
    res = evaluate.evaluate_gsm8k(None, tok, rows, FAST, batch_size=2, out_jsonl=tmp_path / "p.jsonl")
    assert (res["n"], res["correct"], res["accuracy"]) == (5, 3, 0.6)
    assert res["ci_low"] < 0.6 < res["ci_high"]
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [x["correct"] for x in lines] == [True, False, True, True, False]
    assert lines[1]["extracted"] == "999" and lines[4]["gold"] == "4" and lines[4]["prompt"] == "How many?"


def test_quick_accuracy_restores_mode(tiny, tok):
    tiny.train()
    acc = evaluate.quick_accuracy(tiny, tok, synthetic.generate(2, seed=4), FAST)
    assert 0.0 <= acc <= 1.0 and tiny.training
    tiny.eval()


# ---- CLI --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), canvas=8, vocab=len(tok))
    tok.save_pretrained(path)
    return path


def test_settings_for_tokenizer_keeps_the_chat_format_stops_and_drops_ordinary_ids(tok):
    # the released generation_config's [1, 106, 50] are <eos>, <turn|>, <|tool_response>; 7 is an ordinary token
    assert tok.convert_ids_to_tokens([1, 106, 50]) == ["<eos>", "<turn|>", "<|tool_response>"]
    assert prompting.settings_for_tokenizer(SamplerSettings(), tok).eos_token_ids == (1, 106, 50)
    assert prompting.settings_for_tokenizer(SamplerSettings(eos_token_ids=(7, 1)), tok).eos_token_ids == (1, 106, 50)
    assert prompting.settings_for_tokenizer(SamplerSettings(eos_token_ids=()), tok).eos_token_ids == ()
    assert evaluate.cli_generate is not None  # cli/main.py imports it from blockdiff.infer.evaluate


def test_settings_for_checkpoint_takes_eos_from_tokenizer(ckpt, tok):
    s = evaluate.settings_for_checkpoint(ckpt, tok, max_denoising_steps=3, max_new_tokens=None)
    assert s.eos_token_ids == (tok.eos_token_id, 106, 50)
    assert s.max_denoising_steps == 3 and s.max_new_tokens == 256


def test_cli_generate(ckpt, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "Tom has 3 apples."}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "Ann buys 2 pens."},
                                              {"role": "assistant", "content": "dropped"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    rc = evaluate.cli_generate(["--model", str(ckpt), "--input", str(inp), "--max-new-tokens", "8", "--steps", "2",
                                "--device", "cpu", "--output", str(out)])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt"] for x in lines] == ["Tom has 3 apples.", "Ann buys 2 pens."]
    assert "### Tom has 3 apples." in capsys.readouterr().out
    rc = evaluate.cli_generate(["--model", str(ckpt), "--prompt", "hi", "--max-new-tokens", "8", "--steps", "1"])
    assert rc == 0
    with pytest.raises(BlockdiffError, match="adapter_config.json"):  # not an adapter directory
        evaluate.cli_generate(["--model", str(ckpt), "--prompt", "hi", "--adapter", str(tmp_path)])


def test_cli_eval(ckpt, tmp_path, capsys):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic.generate(3, seed=5)))
    out = tmp_path / "preds.jsonl"
    rc = evaluate.cli_eval(["gsm8k", "--model", str(ckpt), "--data", str(data), "--limit", "2",
                            "--batch-size", "2", "--max-new-tokens", "8", "--steps", "2", "--output", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "gsm8k accuracy:" in text and "/2)" in text and "tokens/s" in text
    assert len(out.read_text().splitlines()) == 2


def test_cli_temperature_flags(ckpt, tmp_path, monkeypatch, capsys):
    # --t-max / --t-min override the checkpoint's schedule (the demo's low-temperature number uses them)
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic.generate(2, seed=5)))
    seen = []

    def fake_eval(model, tokenizer, rows, settings, **kwargs):
        seen.append(settings)
        return {"accuracy": 0.5, "n": 2, "correct": 1, "ci_low": 0.1, "ci_high": 0.9, "seconds": 1.0,
                "new_tokens": 4, "tokens_per_second": 4.0}

    monkeypatch.setattr(evaluate, "evaluate_gsm8k", fake_eval)
    base = ["gsm8k", "--model", str(ckpt), "--data", str(data)]
    assert evaluate.cli_eval(base + ["--t-max", "0.1", "--t-min", "0.05"]) == 0
    assert evaluate.cli_eval(base) == 0
    assert (seen[0].t_max, seen[0].t_min) == (0.1, 0.05)
    assert (seen[1].t_max, seen[1].t_min) == (SamplerSettings().t_max, SamplerSettings().t_min)
    with pytest.raises(BlockdiffError, match="t_min"):  # validated like every sampler setting
        evaluate.cli_eval(base + ["--t-max", "0.1", "--t-min", "0.2"])


def test_settings_for_checkpoint_reads_a_hub_snapshot(ckpt, tok, monkeypatch, tmp_path):
    """A hub id (served offline from the HF cache): its generation_config.json is read like a local one's."""
    import shutil

    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub-cache"
    repo, commit = cache / "models--org--tiny-dgemma", "0" * 40
    shutil.copytree(ckpt, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    gen = json.loads((Path(ckpt) / "generation_config.json").read_text()) if (Path(ckpt) / "generation_config.json").exists() else {}
    (repo / "snapshots" / commit / "generation_config.json").write_text(json.dumps({**gen, "max_denoising_steps": 7}))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert evaluate.settings_for_checkpoint("org/tiny-dgemma", tok).max_denoising_steps == 7
