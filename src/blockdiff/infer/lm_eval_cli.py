"""``blockdiff eval lm-eval``: lm-evaluation-harness tasks on a blockdiff checkpoint (the ``blockdiff`` model).

Prints lm-eval's own result table and, with ``--output DIR``, writes ``DIR/results.json`` (lm-eval's results
dict without the per-sample records) and ``DIR/samples_<task>.jsonl`` (one record per document: the
prompt, the reply, the filtered answer and the metrics). Only generation tasks run: a task whose
``output_type`` needs likelihoods is refused before the model loads. lm-eval is imported only here.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from blockdiff.errors import ConfigError
from blockdiff.infer.evaluate import add_model_args

GENERATION = "generate_until"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockdiff eval lm-eval",
                                description="Run lm-evaluation-harness generation tasks with the blockdiff sampler.")
    add_model_args(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names, e.g. gsm8k")
    p.add_argument("--limit", type=int, help="first N documents of each task")
    p.add_argument("--output", help="directory for results.json and samples_<task>.jsonl")
    p.add_argument("--include-path", action="append", default=[],
                   help="directory of extra task YAMLs (repeatable); its tasks load without lm-eval's built-in index")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="lm-eval builds the chat (few-shot examples as turns); default: the prompt is one user turn")
    p.add_argument("--model-args", default="",
                   help="extra model_args k=v,... (SamplerSettings fields, e.g. entropy_bound=0.05)")
    return p


def _check_paths(args) -> None:
    for path in args.include_path:
        if not Path(path).is_dir():
            raise ConfigError("not a directory", file=path, field="--include-path")
    if args.output is not None and Path(args.output).exists() and not Path(args.output).is_dir():
        raise ConfigError("exists and is not a directory", file=args.output, field="--output")
    for flag, value in (("--limit", args.limit), ("--num-fewshot", args.num_fewshot)):
        if value is not None and value < (1 if flag == "--limit" else 0):
            raise ConfigError(f"must be >= {1 if flag == '--limit' else 0} (got {value})", field=flag)


def task_manager_for(names: list[str], include_paths: list[str]):
    """A TaskManager that knows ``names``: the include paths alone when they hold every one of them (indexing
    lm-eval's thousands of built-in YAMLs takes tens of seconds), else the built-in tasks as well."""
    from lm_eval.tasks import TaskManager

    if include_paths:
        local = TaskManager(include_path=include_paths, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    manager = TaskManager(include_path=include_paths or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s) {unknown} (not built in"
                          f"{' nor in ' + ', '.join(include_paths) if include_paths else ''})", field="--tasks")
    return manager


def check_generation_tasks(manager, names: list[str]) -> None:
    """Refuse (before any model loads) every task that is not ``generate_until``."""
    from blockdiff.infer.lm_eval_model import unsupported_request

    for name, task in manager.load(names)["tasks"].items():
        output_type = task.get_config("output_type")
        if output_type != GENERATION:
            raise unsupported_request(output_type, name)


def _sampler_overrides(args) -> dict:
    from lm_eval.utils import simple_parse_args_string

    overrides = {"max_new_tokens": args.max_new_tokens, "max_denoising_steps": args.steps, "seed": args.seed,
                 "t_max": args.t_max, "t_min": args.t_min}
    extra = simple_parse_args_string(args.model_args)
    for key in ("pretrained", "adapter", "dtype", "device", "batch_size", "enable_thinking"):
        if key in extra:
            raise ConfigError(f"'{key}' has its own flag", field="--model-args")
    return {k: v for k, v in overrides.items() if v is not None} | extra


def _write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON through a temporary file, so a failed write never leaves a truncated file."""
    from lm_eval.utils import handle_non_serializable

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)


def write_results(out_dir, results: dict) -> list[Path]:
    """``results.json`` (all but the samples) and one ``samples_<task>.jsonl`` per task; returns the paths."""
    from lm_eval.utils import handle_non_serializable

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json"]
    _write_json(written[0], {k: v for k, v in results.items() if k != "samples"})
    for task, samples in (results.get("samples") or {}).items():
        path = out / f"samples_{task}.jsonl"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        written.append(path)
    return written


def run_lm_eval(lm, names: list[str], manager, *, limit=None, num_fewshot=None, apply_chat_template=False) -> dict:
    """``lm_eval.simple_evaluate`` with the per-sample records kept (the Python API of the command)."""
    from lm_eval.evaluator import simple_evaluate

    return simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                           apply_chat_template=apply_chat_template, fewshot_as_multiturn=apply_chat_template,
                           log_samples=True)


def cli_lm_eval(argv=None) -> int:
    """``blockdiff eval lm-eval --model DIR [--adapter DIR] --tasks T,... [--limit N] [--output DIR] [...]``."""
    args = _parser().parse_args(argv)
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise ConfigError("no task names given", field="--tasks")
    _check_paths(args)

    from blockdiff.infer.lm_eval_model import BlockdiffLM  # raises the install hint without lm-eval
    from lm_eval.utils import make_table

    manager = task_manager_for(names, args.include_path)
    check_generation_tasks(manager, names)
    lm = BlockdiffLM(pretrained=args.model, adapter=args.adapter, dtype=args.dtype, device=args.device,
                     batch_size=args.batch_size, enable_thinking=args.enable_thinking, **_sampler_overrides(args))
    results = run_lm_eval(lm, names, manager, limit=args.limit, num_fewshot=args.num_fewshot,
                          apply_chat_template=args.apply_chat_template)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output is not None:
        for path in write_results(args.output, results):
            print(f"wrote {path}")
    return 0
