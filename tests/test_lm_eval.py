"""lm-evaluation-harness through the ``blockdiff`` model: the same replies and scores as ``blockdiff eval gsm8k``,
adapters, ``until`` stop strings, the refusal of likelihood tasks, and ``blockdiff eval lm-eval`` end to end.

Tasks are the repository's example YAML (examples/lm_eval/demo_gsm8k.yaml: lm-eval's gsm8k prompt fields, filters and
``exact_match`` metric) pointed at local JSONL files in tmp_path (``dataset_path: json``); nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from blockdiff.data import load_tiny_tokenizer
from blockdiff.data.chat import render_generation_prompt
from blockdiff.errors import ConfigError
from blockdiff.infer import evaluate, prompting, sampling
from helpers import load_blockdiff, make_hf_checkpoint, randomize_lora_b

pytest.importorskip("lm_eval")

from blockdiff.infer import lm_eval_cli  # noqa: E402  (needs lm-eval)
from blockdiff.infer.lm_eval_model import BlockdiffLM, cut_at_stop_strings  # noqa: E402

FAST = {"max_new_tokens": 8, "max_denoising_steps": 2}  # one 8-token canvas, two denoising steps
# the repository's example task: lm-eval's gsm8k prompt fields, filters and metric over a local chat JSONL
EXAMPLE_TASK = Path(__file__).resolve().parents[1] / "examples" / "lm_eval" / "demo_gsm8k.yaml"
# (question, gold answer, reply, correct by lm-eval's strict-match, by its flexible-extract, by blockdiff eval)
SCORING_CASES = [
    ("q0", "3 + 4 = 7\n#### 7", "3 + 4 = 7\n#### 7", True, True, True),
    ("q1", "#### 5", "#### 12", False, False, False),
    ("q2", "#### 1200", "so #### 1,200", True, True, True),  # thousands separators ignored by all
    ("q3", "#### 9", "#### 9.", True, True, True),  # a trailing period too
    ("q4", "#### 4", "#### 4 apples", True, True, True),
    ("q5", "#### 999", "I think 999", False, True, True),  # no '####': the last number
    ("q6", "#### 3.5", "#### 3.50", False, False, True),  # blockdiff compares numbers, lm-eval strings
    ("q7", "#### 18", "#### $18", False, True, True),  # strict-match's regex needs a digit right after '#### '
    ("q8", "#### 6", "first #### 4\nthen #### 6", False, True, True),  # strict: first '####'; blockdiff: last
    ("q9", "#### 12", "15 - 1 = 12\n####", False, True, True),  # nothing after '####': the last number
    ("q10", "#### 3", "1 5 - 6 =#### 3####", True, True, False),  # blockdiff: nothing after the last '####' -> -6
    ("q11", "#### 6", "2 * 3 = 6\n#### 6 1", True, False, True),  # flexible-extract: the last number anywhere
]


@pytest.fixture(scope="module", autouse=True)
def offline_one_thread():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    """A tiny random checkpoint (transformers writes it) with the shipped tokenizer and its chat template."""
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), canvas=8, vocab=len(tok))
    tok.save_pretrained(path)
    return path


def chat_rows(pairs) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def gsm8k_style_task(name: str, data, cache, max_gen_toks=8) -> dict:
    """The example task (``examples/lm_eval/demo_gsm8k.yaml``) renamed and pointed at ``data``."""
    spec = yaml.safe_load(EXAMPLE_TASK.read_text(encoding="utf-8"))
    spec["task"] = name
    spec["dataset_kwargs"] = {"data_files": {"test": str(data)}, "cache_dir": str(cache)}
    spec["generation_kwargs"]["max_gen_toks"] = max_gen_toks
    return spec


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A task directory: ``local_gsm8k`` over 6 synthetic rows, ``scoring`` over SCORING_CASES and a
    ``multiple_choice`` task ``local_mc``."""
    from blockdiff.data import synthetic

    root = tmp_path_factory.mktemp("tasks")
    rows = synthetic.generate(6, seed=11)
    write_jsonl(root / "gsm.jsonl", rows)
    write_jsonl(root / "scoring.jsonl", chat_rows((q, a) for q, a, *_ in SCORING_CASES))
    specs = {"local_gsm8k": gsm8k_style_task("local_gsm8k", root / "gsm.jsonl", root / "cache"),
             "scoring": gsm8k_style_task("scoring", root / "scoring.jsonl", root / "cache"),
             "local_mc": {"task": "local_mc", "dataset_path": "json", "output_type": "multiple_choice",
                          "dataset_kwargs": {"data_files": {"test": str(root / "gsm.jsonl")},
                                             "cache_dir": str(root / "cache")},
                          "test_split": "test", "doc_to_text": "{{messages[0].content}}",
                          "doc_to_choice": ["yes", "no"], "doc_to_target": 0, "metric_list": [{"metric": "acc"}]}}
    for name, spec in specs.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return root, rows


@pytest.fixture(scope="module")
def manager(tasks):
    return lm_eval_cli.task_manager_for(["local_gsm8k", "scoring", "local_mc"], [str(tasks[0])])


@pytest.fixture(scope="module")
def lm(ckpt):
    return BlockdiffLM(pretrained=str(ckpt), device="cpu", dtype="float32", batch_size=4, **FAST)


def samples_by_filter(results, task: str, name: str) -> list[dict]:
    rows = [s for s in results["samples"][task] if s["filter"] == name]
    return sorted(rows, key=lambda s: s["doc_id"])


def request(context: str, doc_id: int, **gen_kwargs):
    from lm_eval.api.instance import Instance

    return Instance(request_type="generate_until", doc={}, arguments=(context, gen_kwargs), idx=0,
                    metadata=("t", doc_id, 1))


def test_lm_eval_replies_equal_blockdiff_eval_gsm8k(lm, manager, tasks, tok, tmp_path):
    """Same rows, same sampler settings: lm-eval's replies are ``evaluate_gsm8k``'s, document by document, and
    wherever lm-eval's strict-match extracts a number the two scores agree."""
    _, rows = tasks
    results = lm_eval_cli.run_lm_eval(lm, ["local_gsm8k"], manager)
    ours = tmp_path / "ours.jsonl"
    summary = evaluate.evaluate_gsm8k(lm.model, tok, rows, lm.settings, batch_size=3, out_jsonl=ours)
    records = [json.loads(x) for x in ours.read_text().splitlines()]
    strict = samples_by_filter(results, "local_gsm8k", "strict-match")
    assert [s["doc_id"] for s in strict] == list(range(len(rows)))
    replies = [s["resps"][0][0] for s in strict]
    assert replies == [r["output"] for r in records]
    assert any(replies), "the random model should say something"
    for s, rec in zip(strict, records):
        if s["filtered_resps"][0] != "[invalid]" and rec["extracted"] is not None:
            assert bool(s["exact_match"]) == rec["correct"]
    if all(s["filtered_resps"][0] != "[invalid]" for s in strict):
        assert results["results"]["local_gsm8k"]["exact_match,strict-match"] == summary["accuracy"]


@pytest.mark.parametrize("apply_chat_template", [False, True])
def test_scores_agree_where_the_extraction_rules_agree(lm, manager, tok, monkeypatch, tmp_path, apply_chat_template):
    """Scripted replies (keyed by the row seed, so by document) scored by lm-eval's gsm8k filters and by
    ``evaluate_gsm8k``: equal except in the cases the guide lists. The prompts are the training chat prompt
    whether lm-eval builds the conversation (``apply_chat_template``) or the model does."""
    questions = [q for q, *_ in SCORING_CASES]

    def scripted_generate(model, prompts, settings, device=None, row_seeds=None, **kwargs):
        docs = [s - settings.seed for s in row_seeds]
        for doc, prompt in zip(docs, prompts):  # both paths render the question as one chat turn
            assert prompt == render_generation_prompt(tok, [{"role": "user", "content": questions[doc]}])
        return [tok.encode(SCORING_CASES[d][2], add_special_tokens=False) for d in docs]

    monkeypatch.setattr(sampling, "generate", scripted_generate)
    results = lm_eval_cli.run_lm_eval(lm, ["scoring"], manager, apply_chat_template=apply_chat_template)
    rows = chat_rows((q, a) for q, a, *_ in SCORING_CASES)
    ours = tmp_path / "ours.jsonl"
    evaluate.evaluate_gsm8k(None, tok, rows, lm.settings, batch_size=4, out_jsonl=ours)
    records = [json.loads(x) for x in ours.read_text().splitlines()]
    strict = samples_by_filter(results, "scoring", "strict-match")
    flexible = samples_by_filter(results, "scoring", "flexible-extract")
    assert [s["resps"][0][0] for s in strict] == [c[2] for c in SCORING_CASES] == [r["output"] for r in records]
    assert [bool(s["exact_match"]) for s in strict] == [c[3] for c in SCORING_CASES]
    assert [bool(s["exact_match"]) for s in flexible] == [c[4] for c in SCORING_CASES]
    assert [r["correct"] for r in records] == [c[5] for c in SCORING_CASES]
    assert results["results"]["scoring"]["exact_match,strict-match"] == pytest.approx(
        sum(c[3] for c in SCORING_CASES) / len(SCORING_CASES))


def test_apply_chat_template_renders_the_training_prompt(lm, tok):
    turn = [{"role": "user", "content": "Tom has 3 apples."}]
    text = lm.apply_chat_template(turn)
    assert lm.prompt_ids(text) == lm.prompt_ids("Tom has 3 apples.") == render_generation_prompt(tok, turn)
    prefilled = lm.apply_chat_template(turn + [{"role": "assistant", "content": "3 + 1"}], add_generation_prompt=False)
    assert prefilled == text + "3 + 1"  # lm-eval's gen_prefix: the reply continues the prefix
    assert lm.prompt_ids(prefilled) == render_generation_prompt(tok, turn) + tok.encode("3 + 1", add_special_tokens=False)


def test_until_string_cuts_the_reply(lm):
    """A request's ``until`` strings cut the sampled text at the earliest one; the sampler itself is unchanged."""
    context = "Tom has 3 apples and buys 2 more. How many apples does Tom have?"
    full = lm.generate_until([request(context, 0, max_gen_toks=8)])[0]
    assert len(full) > 4
    stop = full[2:4]
    cut = lm.generate_until([request(context, 0, max_gen_toks=8, until=["never in a reply", stop])])[0]
    assert cut == full[: full.find(stop)] and len(cut) < len(full)
    assert lm.generate_until([request(context, 0, max_gen_toks=8, until=stop)])[0] == cut  # a bare string
    assert cut_at_stop_strings("a Question: b\n\nc", ["\n\n", "Question:", ""]) == "a "
    assert cut_at_stop_strings("abc", None) == "abc"


def test_adapter_generations_equal_the_adapted_model(ckpt, tok, tmp_path):
    """``adapter=DIR`` samples what the project's own path samples with the adapter applied in memory."""
    from blockdiff.lora import apply_lora, merge_lora_, save_peft_adapter

    model = load_blockdiff(ckpt)
    apply_lora(model, {"rank": 4, "alpha": 8.0, "dropout": 0.0, "self_conditioning": False, "experts": False,
                       "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})
    randomize_lora_b(model, seed=3, std=0.5)
    adapter = save_peft_adapter(model, tmp_path / "adapter", str(ckpt))
    merge_lora_(model)

    contexts = [f"Ann has {n} pens and gives away 1. How many pens are left?" for n in range(2, 6)]
    adapted_lm = BlockdiffLM(pretrained=str(ckpt), adapter=str(adapter), device="cpu", dtype="float32",
                             batch_size=3, **FAST)
    theirs = adapted_lm.generate_until([request(c, i) for i, c in enumerate(contexts)])
    ours = prompting.generate_text(model, tok, [[{"role": "user", "content": c}] for c in contexts],
                                   adapted_lm.settings, row_seeds=[adapted_lm.settings.seed + i for i in range(4)])
    assert theirs == ours
    base_lm = BlockdiffLM(pretrained=str(ckpt), device="cpu", dtype="float32", **FAST)
    assert base_lm.generate_until([request(c, i) for i, c in enumerate(contexts)]) != theirs  # the adapter matters


def test_likelihood_tasks_are_refused(lm, manager, tasks, ckpt, capsys):
    from blockdiff.cli.main import main

    with pytest.raises(ConfigError, match="not supported by a diffusion model: the per-sequence likelihood"):
        lm.loglikelihood([request("x", 0)])
    with pytest.raises(ConfigError, match="loglikelihood_rolling is not supported by a diffusion model"):
        lm.loglikelihood_rolling([])
    with pytest.raises(ConfigError, match="task 'local_mc' needs multiple_choice, which is not supported"):
        lm_eval_cli.check_generation_tasks(manager, ["local_gsm8k", "local_mc"])
    rc = main(["eval", "lm-eval", "--model", str(ckpt), "--tasks", "local_mc", "--include-path", str(tasks[0])])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "use generation tasks" in err[0]


def test_cli_end_to_end_writes_results_json(ckpt, tasks, tmp_path, capsys):
    from blockdiff.cli.main import main

    out = tmp_path / "results"
    argv = ["eval", "lm-eval", "--model", str(ckpt), "--tasks", "local_gsm8k", "--include-path", str(tasks[0]),
            "--limit", "3", "--batch-size", "2", "--max-new-tokens", "8", "--steps", "2", "--device", "cpu",
            "--dtype", "float32", "--output", str(out), "--model-args", "entropy_bound=0.2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "local_gsm8k" in printed and "strict-match" in printed and "exact_match" in printed
    results = json.loads((out / "results.json").read_text())
    metrics = results["results"]["local_gsm8k"]
    assert 0.0 <= metrics["exact_match,strict-match"] <= 1.0 and "exact_match,flexible-extract" in metrics
    assert results["config"]["sampler"]["entropy_bound"] == 0.2 and results["config"]["sampler"]["max_new_tokens"] == 8
    samples = [json.loads(x) for x in (out / "samples_local_gsm8k.jsonl").read_text().splitlines()]
    assert sorted({s["doc_id"] for s in samples}) == [0, 1, 2] and len(samples) == 6  # 3 documents x 2 filters

    # bad input: one line naming the field, exit 2, the results already written untouched
    before = (out / "results.json").read_bytes()
    # (an unknown task name is not tried here: telling it from lm-eval's built-in tasks indexes them all, ~30 s)
    for extra, where in ((["--model-args", "bogus=1"], "bogus"), (["--limit", "0"], "--limit"),
                         (["--include-path", str(tmp_path / "missing")], "--include-path")):
        assert main(argv + extra) == 2
        assert where in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_eval_keeps_its_gsm8k_forms(ckpt, tasks, tmp_path, capsys):
    """``blockdiff eval gsm8k ...`` and the bare ``blockdiff eval --model ... --data ...`` are the same command."""
    data = tasks[0] / "gsm.jsonl"
    outs = []
    for head in (["gsm8k"], []):
        out = tmp_path / f"preds{len(head)}.jsonl"
        assert evaluate.cli_eval([*head, "--model", str(ckpt), "--data", str(data), "--limit", "2", "--max-new-tokens",
                                  "8", "--steps", "2", "--device", "cpu", "--output", str(out)]) == 0
        outs.append(out.read_text())
    assert outs[0] == outs[1] and "gsm8k accuracy:" in capsys.readouterr().out


def test_missing_lm_eval_names_the_extra(ckpt, monkeypatch, capsys):
    from blockdiff.cli.main import main

    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # import of lm_eval halts
    monkeypatch.delitem(sys.modules, "blockdiff.infer.lm_eval_model")
    assert main(["eval", "lm-eval", "--model", str(ckpt), "--tasks", "gsm8k"]) == 2
    assert "pip install 'blockdiff[lm_eval]'" in capsys.readouterr().err
