"""``blockdiff train`` on the hub DiffusionGemma chat template (read from TRL's wheel, set by data.chat_template on
a tokenizer holding Gemma 4's control tokens): it trains on chat and tool-calling rows, the run dir and the export
carry the template, the export samples and stops on <turn|>. Bad chat input fails with one located error before
anything is written."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from blockdiff.cli.main import main
from blockdiff.config.schema import demo_config_path
from blockdiff.data import load_tiny_tokenizer
from blockdiff.data.chat import render_generation_prompt
from blockdiff.data.synthetic import write_splits

FAST = ["--model.num_layers", "1", "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
        "--train.log_every", "1", "--logging.progress", "false", "--logging.tensorboard", "false"]
CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}
TOOL_ROW = {"tools": [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                                        "parameters": {"type": "object", "properties": {
                                                            "a": {"type": "integer"}, "b": {"type": "integer"}}}}}],
            "messages": [{"role": "developer", "content": "Use tools."}, {"role": "user", "content": "3 + 4?"},
                         {"role": "assistant", "content": None, "tool_calls": [CALL]},
                         {"role": "tool", "tool_call_id": "c1", "content": "7"},
                         {"role": "assistant", "content": "3 + 4 = 7\n#### 7"}]}


def hub_template() -> str:
    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl is not installed (pip install 'blockdiff[dev]'): the hub chat template ships in its wheel")
    return (Path(spec.origin).parent / "chat_templates" / "diffusion_gemma.jinja").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    train_path, _ = write_splits(d, 16, 2, seed=0)
    with open(train_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(TOOL_ROW) + "\n")
    tok_dir = d / "tok"
    load_tiny_tokenizer().save_pretrained(tok_dir)  # a tokenizer directory with blockdiff's template
    (d / "hub.jinja").write_text(hub_template(), encoding="utf-8")
    return d, train_path, tok_dir, d / "hub.jinja"


def run_cli(capsys, *args):
    capsys.readouterr()
    rc = main(["train", "-c", demo_config_path(), *FAST, *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, [ln for ln in err.splitlines() if ln.startswith("blockdiff train: error:")]


@pytest.mark.slow
def test_train_on_the_hub_template_exports_it_and_stops_on_turn_end(setup, capsys, monkeypatch):
    from blockdiff.infer import evaluate, prompting, sampling

    d, train_path, tok_dir, hub = setup
    run = d / "run"
    rc, errors = run_cli(capsys, "--data.train_path", str(train_path), "--data.tokenizer", str(tok_dir),
                         "--data.chat_template", str(hub), "--train.output_dir", str(run), "--train.max_steps", "2",
                         "--data.seq_length", "256")
    assert rc == 0 and not errors
    assert json.loads((run / "data_stats.json").read_text())["n_kept"] == 17  # the tool-calling row trained too
    template = hub.read_text()
    assert (run / "chat_template.jinja").read_text() == template  # what training rendered with
    export = run / "export"
    assert (export / "chat_template.jinja").read_text() == template

    model, tok, _ = evaluate.load_for_inference(export, "float32", "cpu")
    assert tok.chat_template == template
    settings = prompting.settings_for_tokenizer(
        evaluate.settings_for_checkpoint(export, tok, max_new_tokens=64, max_denoising_steps=2), tok)
    assert 106 in settings.eos_token_ids and tok.convert_ids_to_tokens(106) == "<turn|>"
    conv = [{"role": "user", "content": "Tom has 3 apples."}]
    assert isinstance(prompting.generate_text(model, tok, [conv], dataclasses.replace(settings, max_new_tokens=32))[0], str)  # the real sampler runs

    # the stop fires: a canvas holding <turn|> ends the reply there and no further block is denoised
    blocks = []

    def fake_block(model, cache, rng, settings, canvas_length, *lockstep):
        blocks.append(canvas_length)
        out = torch.full((len(rng.gens), canvas_length), 7, dtype=torch.long)
        out[:, 3] = 106
        return out, 1

    monkeypatch.setattr(sampling, "denoise_block", fake_block)
    prompt = render_generation_prompt(tok, conv)
    assert tok.decode(prompt).endswith("<turn|>\n<|turn>model\n")  # thinking off: no channel preamble
    out = sampling.generate(model, [prompt], dataclasses.replace(settings, max_new_tokens=3 * model.config.canvas_length))
    assert out == [[7, 7, 7]] and len(blocks) == 1


def row(*messages, **extra):
    return json.dumps({"messages": list(messages), **extra})


U = {"role": "user", "content": "3 + 4?"}
BAD_ROWS = [  # (id, line 2 of the data, regex after "<file>:2: ")
    ("unrenderable-role", row(U, {"role": "function", "content": "7"}),
     r"field 'messages\[1\]\.role': expected one of 'system', 'developer', 'user', 'assistant', 'tool', got 'function'"),
    ("arguments-not-json", row(U, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{a: 3"}}]}),
     r"field 'messages\[1\]\.tool_calls\[0\]\.function\.arguments': not valid JSON"),
    ("arguments-a-list", row(U, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": [3, 4]}}]}),
     r"field 'messages\[1\]\.tool_calls\[0\]\.function\.arguments': expected a JSON object of named arguments, got list"),
    ("call-without-name", row(U, {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}),
     r"field 'messages\[1\]\.tool_calls\[0\]\.function\.name': missing"),
    ("response-to-no-call", row(U, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                                {"role": "tool", "tool_call_id": "c9", "content": "7"}, {"role": "assistant", "content": "7"}),
     r"field 'messages\[2\]\.tool_call_id': 'c9' matches no tool_calls\[\]\.id"),
    ("call-left-unanswered", row(U, {"role": "assistant", "content": "", "tool_calls": [CALL]}, U,
                                 {"role": "assistant", "content": "7"}),
     r"field 'messages\[2\]\.role': expected a 'tool' turn answering the tool_calls of messages\[1\]"),
    ("bad-tool-declaration", row(U, {"role": "assistant", "content": "7"}, tools=[{"type": "function", "function": {}}]),
     r"field 'tools\[0\]\.function\.name': missing"),
]


@pytest.mark.parametrize("line,pattern", [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_bad_chat_rows_are_one_located_error_and_nothing_is_written(setup, tmp_path, capsys, line, pattern):
    d, train_path, tok_dir, hub = setup
    data = tmp_path / "bad.jsonl"
    rows = Path(train_path).read_text().splitlines()
    data.write_text("\n".join([rows[0], line] + rows[1:4]) + "\n")
    out = tmp_path / "run"
    rc, errors = run_cli(capsys, "--data.train_path", str(data), "--data.chat_template", str(hub),
                         "--train.output_dir", str(out), "--train.max_steps", "1")
    assert rc == 2 and len(errors) == 1, errors
    assert re.search(rf"error: {re.escape(str(data))}:2: {pattern}", errors[0]), errors[0]
    assert not out.exists()


def test_template_that_is_not_prefix_stable_or_cannot_render_a_role(setup, tmp_path, capsys):
    d, train_path, tok_dir, hub = setup
    unstable = tmp_path / "unstable.jinja"  # the generation prompt opens an "assistant" turn, the data a "model" one
    unstable.write_text("{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m.role == 'assistant' else m.role }}"
                        "\n{{ m.content }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>assistant\n{% endif %}")
    out = tmp_path / "run"
    rc, errors = run_cli(capsys, "--data.train_path", str(train_path), "--data.chat_template", str(unstable),
                         "--train.output_dir", str(out), "--train.max_steps", "1")
    assert rc == 2 and len(errors) == 1, errors
    assert re.search(rf"error: {re.escape(str(train_path))}:1: field 'chat_template': chat template of tokenizer "
                     r"'.*' is not prefix-stable", errors[0]), errors[0]
    assert not out.exists()

    no_dev = tmp_path / "no_developer.jinja"
    no_dev.write_text(hub.read_text().replace("{{- bos_token -}}", "{%- if messages[0]['role'] == 'developer' -%}"
                      "{{- raise_exception('developer turns are not supported') -}}{%- endif -%}{{- bos_token -}}", 1))
    rc, errors = run_cli(capsys, "--data.train_path", str(train_path), "--data.chat_template", str(no_dev),
                         "--train.output_dir", str(out), "--train.max_steps", "1")
    assert rc == 2 and len(errors) == 1, errors
    assert re.search(rf"error: {re.escape(str(train_path))}:17: field 'chat_template': .* failed to render: "
                     r"TemplateError: developer turns are not supported", errors[0]), errors[0]
    assert not out.exists()

    rc, errors = run_cli(capsys, "--data.train_path", str(train_path), "--data.chat_template", str(tmp_path / "no.jinja"),
                         "--train.output_dir", str(out), "--train.max_steps", "1")
    assert rc == 2 and re.search(r"no\.jinja: field 'data\.chat_template': cannot read the chat template", errors[0])
    assert not out.exists()
