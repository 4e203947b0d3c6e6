"""``blockdiff data preview``: rows exactly as SFTDataset builds them, markers, limits, errors."""

import io
import json

import pytest

from blockdiff.cli.main import main
from blockdiff.config.schema import demo_config_path, load_config
from blockdiff.data import load_tiny_tokenizer
from blockdiff.data.canvas import SFTDataset
from blockdiff.data.chat import tokenize_conversation
from blockdiff.data.preview import CLOSE, OPEN, preview_rows, render_plain, render_rich
from blockdiff.train.loading import model_config
from blockdiff.data.synthetic import generate, generate_multiturn

C, S = 32, 96  # canvas_length, seq_length: a long reply is cut to 2 blocks, a long prompt is skipped


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def rows():
    base = generate(6, seed=3)
    question, answer = base[0]["messages"][0]["content"], base[0]["messages"][1]["content"]
    long_reply = {"messages": [{"role": "user", "content": question},
                               {"role": "assistant", "content": "\n".join([answer] * 8)}]}
    long_prompt = {"messages": [{"role": "user", "content": " ".join([question] * 4)},
                                {"role": "assistant", "content": answer}]}
    return base[:2] + [long_reply] + base[2:4] + [long_prompt] + base[4:]


@pytest.fixture(scope="module")
def data(rows, tmp_path_factory):
    return _write(tmp_path_factory.mktemp("preview") / "train.jsonl", rows)


def _args(path, *extra):
    return ["data", "preview", "-c", demo_config_path(), "--data.train_path", str(path),
            "--data.seq_length", str(S), "--data.canvas_length", str(C), *extra]


def _json_rows(capsys, argv):
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_json_rows_equal_what_the_dataset_builds(data, rows, capsys):
    out = _json_rows(capsys, _args(data, "--rows", "100", "--json"))
    tok = load_tiny_tokenizer()
    cfg = load_config(demo_config_path(), ["--data.train_path", str(data)])
    eos = model_config(cfg).eos_token_id  # the model config's EOS fills the canvas, as in train
    ds = SFTDataset(str(data), tok, canvas_length=C, seq_length=S, prompt_policy="skip", eos_id=eos)
    by_id = {e.sample_id: e for e in ds.examples}
    assert [r["line"] for r in out] == list(range(1, len(rows) + 1))
    assert sum(r["skipped"] for r in out) == ds.n_skipped_prompt_too_long == 1
    assert sum(r["truncated"] for r in out) == ds.n_truncated == 1
    assert cfg.data.mask_history
    for r in out:
        ex = by_id.get(r["line"] - 1)
        assert r["skipped"] == (ex is None)
        if ex is None:
            assert "exceeds seq_length" in r["reason"] and r["n_blocks"] == 0 and not r["spans"]
            continue
        P, n = ex.prompt_length, r["n_supervised_tokens"]
        ids, _, plen = tokenize_conversation(tok, rows[r["line"] - 1]["messages"])
        assert r["n_prompt_tokens"] == P == plen
        assert r["prompt_text"] == tok.decode(ex.input_ids[:P], skip_special_tokens=False)
        assert r["supervised_text"] == tok.decode(ex.input_ids[P:P + n], skip_special_tokens=False)
        assert r["n_blocks"] == ex.num_blocks and r["n_tokens"] == len(ex.input_ids)
        assert r["truncated"] == ex.truncated
        assert n + r["n_fill_tokens"] == ex.num_blocks * C
        assert set(ex.input_ids[P + n:]) <= {eos}
        # the reply as tokenized, whole, or cut at the last block that fits
        assert n == (ex.num_blocks * C if ex.truncated else len(ids) - plen)
        assert ex.input_ids[P:P + n] == ids[plen:plen + n]
        assert [s["start"] for s in r["spans"]] == [P]
    cut = next(r for r in out if r["truncated"])
    assert cut["n_blocks"] == (S - cut["n_prompt_tokens"]) // C and "tokens kept" in cut["reason"]


def test_multiturn_rows_list_every_supervised_turn(tmp_path, capsys):
    rows = generate_multiturn(6, seed=1, max_turns=3)
    path = _write(tmp_path / "multi.jsonl", rows)
    seq = 4 * C + 64
    out = _json_rows(capsys, _args(path, "--json", "--rows", "6", "--data.mask_history", "false",
                                   "--data.seq_length", str(seq), "--data.packing", "true"))
    tok = load_tiny_tokenizer()
    ds = SFTDataset(str(path), tok, canvas_length=C, seq_length=seq, eos_id=tok.eos_token_id, mask_history=False)
    assert len(out) == len(ds) == 6
    for r, ex in zip(out, ds.examples):
        assert [(s["start"], s["n_blocks"]) for s in r["spans"]] == ex.segment_list()
        for s in r["spans"]:
            start, n = s["start"], s["n_tokens"]
            assert s["text"] == tok.decode(ex.input_ids[start:start + n], skip_special_tokens=False)
            assert set(ex.input_ids[start + n:start + s["n_blocks"] * C]) <= {tok.eos_token_id}
        assert r["supervised_text"] == "".join(s["text"] for s in r["spans"])
        assert r["n_supervised_tokens"] == sum(s["n_tokens"] for s in r["spans"])
        assert r["n_blocks"] == ex.num_blocks and r["truncated"] == ex.truncated
    assert any(len(r["spans"]) > 1 for r in out)


def test_terminal_view_marks_the_supervised_region_and_rows_limits(data, capsys):
    assert main(_args(data, "--rows", "2")) == 0
    text = capsys.readouterr().out  # not a terminal: plain markers
    assert text.count("--- line ") == 2 and "line 3" not in text
    first = _json_rows(capsys, _args(data, "--rows", "1", "--json"))
    assert len(first) == 1
    assert OPEN + first[0]["supervised_text"] + CLOSE in text
    assert f"{first[0]['n_fill_tokens']} x EOS fill" in text
    assert "2 rows of" in text.splitlines()[-1]


def test_colour_view_and_skips_are_flagged(data):
    from rich.console import Console

    cfg = load_config(demo_config_path(), ["--data.train_path", str(data), "--data.seq_length", str(S),
                                           "--data.canvas_length", str(C)])
    previews = preview_rows(cfg, rows=100)
    buf = io.StringIO()
    render_rich(previews, cfg, Console(file=buf, force_terminal=True, color_system="standard", highlight=False))
    coloured = buf.getvalue()
    assert "\x1b[" in coloured and OPEN not in coloured
    assert previews[0].supervised_text.split("\n")[0] in coloured
    plain = render_plain(previews, cfg)
    assert "SKIPPED: prompt of" in plain and "TRUNCATED: reply needs" in plain


def test_model_dir_with_only_config_json_is_enough(data, tmp_path, capsys):
    from helpers import tiny_hf_config

    tok = load_tiny_tokenizer()
    model_dir = tmp_path / "model"
    tiny_hf_config(canvas=C, vocab=-(-len(tok) // 64) * 64).save_pretrained(model_dir)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model:\n  name_or_path: {model_dir}\ndata:\n  train_path: {data}\n  tokenizer: tiny\n"
                   f"  seq_length: {S}\n  canvas_length: {C}\ntrain:\n  output_dir: {tmp_path / 'run'}\n")
    assert main(["data", "preview", "-c", str(cfg), "--rows", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_blocks"] == 1


def test_bad_input_gets_the_trainers_one_line_errors(data, tmp_path, capsys):
    good = json.loads(data.read_text().splitlines()[0])
    bad = _write(tmp_path / "bad.jsonl", [good, {"messages": [{"role": "user"}]}])
    assert main(_args(bad, "--json")) == 2
    err = capsys.readouterr()
    assert err.out == "" and f"{bad}:2: field 'messages[0].content'" in err.err
    assert main(_args(bad, "--rows", "1", "--json")) == 0  # only the rows asked for are read
    capsys.readouterr()
    assert main(_args(tmp_path / "missing.jsonl")) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err
    assert main(_args(data, "--data.prompt_too_long", "fail", "--rows", "100")) == 2
    assert f"{data}:6: field 'messages'" in capsys.readouterr().err
    assert main(_args(data, "--data.canvas_length", "16")) == 2  # the model's canvas is 32, as train checks
    assert "canvas_length" in capsys.readouterr().err
    assert main(["data", "show"]) == 2
