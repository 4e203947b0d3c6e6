"""GSM8K-style evaluation and the ``blockdiff generate`` / ``blockdiff eval`` commands.

Answers are compared as normalised numbers (``"1,234.50"`` == ``"1234.5"``). Every example gets
its own sampling seed (``settings.seed + index``), so results do not depend on the batch size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch
from tqdm import tqdm

from blockdiff.data.chat import render_generation_prompt
from blockdiff.data.jsonl import load_dataset_rows
from blockdiff.errors import DataError
from blockdiff.infer import prompting, sampling
from blockdiff.infer.settings import SamplerSettings, read_generation_config
from blockdiff.lora import load_adapter
from blockdiff.model.diffusion_gemma import DiffusionGemma
from blockdiff.model.hf.load import resolve_checkpoint_dir

# A number: optional sign, thousands groups or plain digits, optional decimals (or ".5").
_NUMBER = re.compile(r"[-\u2212]?\$?\s?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def normalize_number(text: str | None) -> str | None:
    """Canonical string of a number: no ``$``/commas/``%``/trailing period, ``3.50`` -> ``3.5``,
    ``4.0`` -> ``4``, ``-0`` -> ``0``. None if ``text`` is not a number."""
    if text is None:
        return None
    s = text.strip().replace("\u2212", "-").replace("$", "").replace(",", "").replace(" ", "")
    s = s.rstrip(".%")
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    return [m.group(0) for m in _NUMBER.finditer(text)]


def extract_answer(text: str | None) -> str | None:
    """The final answer of a GSM8K-style solution, normalised.

    The first number after the last ``####``; without ``####`` (or with nothing numeric after it),
    the last number anywhere in the text. None when there is no number at all.
    """
    if not text:
        return None
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        found = _numbers(tail)
        if found:
            return normalize_number(found[0])
    found = _numbers(text.split("####")[0] if "####" in text else text)
    return normalize_number(found[-1]) if found else None


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z=1.96) Wilson score interval of a binomial proportion; (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def _as_messages(row: dict) -> list[dict]:
    """Chat rows pass through; raw GSM8K rows ({question, answer}) become a user/assistant pair."""
    if "messages" in row:
        return row["messages"]
    if "question" in row:
        msgs = [{"role": "user", "content": row["question"]}]
        if row.get("answer") is not None:
            msgs.append({"role": "assistant", "content": row["answer"]})
        return msgs
    raise DataError("expected a row with 'messages' or 'question'", field="messages")


def question_and_gold(row: dict) -> tuple[list[dict], str, str | None]:
    msgs = _as_messages(row)
    gold = extract_answer(msgs[-1]["content"]) if msgs[-1]["role"] == "assistant" else None
    context = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
    question = next((m["content"] for m in reversed(context) if m["role"] == "user"), "")
    return context, question, gold


def evaluate_gsm8k(model, tokenizer, rows, settings: SamplerSettings | None = None, batch_size: int = 8,
                   out_jsonl=None, device=None, progress=None, enable_thinking: bool = False,
                   generate=None) -> dict:
    """Sample an answer per row and score the extracted number against the reference's.

    Returns {accuracy, n, correct, ci_low, ci_high, ci95: [low, high], seconds, new_tokens,
    tokens_per_second}. EOS ids are fitted to the tokenizer (``prompting.settings_for_tokenizer``); prompts are
    rendered with thinking off unless ``enable_thinking``.
    ``out_jsonl`` gets one line per example: {prompt, output, extracted, gold, correct}.
    ``progress`` (tqdm-like, optional) gets ``update(k)`` after each batch of k examples.
    ``generate`` (default ``sampling.generate``, same signature) samples each batch, e.g. with the rows split
    over the ranks of a sharded model (``periodic_eval.generate_across_ranks``).
    """
    settings = prompting.settings_for_tokenizer(settings or SamplerSettings(), tokenizer)
    rows = list(rows)
    records, new_tokens = [], 0
    start = time.perf_counter()
    for lo in range(0, len(rows), batch_size):
        chunk = [question_and_gold(r) for r in rows[lo:lo + batch_size]]
        prompts = [render_generation_prompt(tokenizer, context, enable_thinking=enable_thinking)
                   for context, _, _ in chunk]
        seeds = [settings.seed + lo + i for i in range(len(chunk))]
        outputs = (generate or sampling.generate)(model, prompts, settings, device=device, row_seeds=seeds)
        for (_, question, gold), ids in zip(chunk, outputs):
            new_tokens += len(ids)
            text = prompting.decode_reply(tokenizer, ids)
            extracted = extract_answer(text)
            records.append({"prompt": question, "output": text, "extracted": extracted, "gold": gold,
                            "correct": extracted is not None and extracted == gold})
        if progress is not None:
            progress.update(len(chunk))
    seconds = time.perf_counter() - start

    if out_jsonl is not None:
        path = Path(out_jsonl)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    n = len(records)
    correct = sum(r["correct"] for r in records)
    lo_ci, hi_ci = wilson_interval(correct, n)
    return {"accuracy": correct / n if n else 0.0, "n": n, "correct": correct, "ci_low": lo_ci,
            "ci_high": hi_ci, "ci95": [lo_ci, hi_ci], "seconds": seconds, "new_tokens": new_tokens,
            "tokens_per_second": new_tokens / seconds if seconds > 0 else 0.0}


def quick_accuracy(model, tokenizer, rows, settings: SamplerSettings | None = None, batch_size: int = 8,
                   device=None, generate=None) -> float:
    """Accuracy only (demo and periodic eval during training); the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return evaluate_gsm8k(model, tokenizer, rows, settings, batch_size=batch_size, device=device,
                              generate=generate)["accuracy"]
    finally:
        model.train(was_training)


# ---- CLI ----------------------------------------------------------------------------------------

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (transformers format)")
    p.add_argument("--adapter", help="LoRA adapter directory")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--steps", type=int, help="max denoising steps per block")
    p.add_argument("--t-max", type=float, help="first denoising step's temperature (default: the checkpoint's)")
    p.add_argument("--t-min", type=float, help="temperature the schedule decays towards (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--enable-thinking", action="store_true",
                   help="render prompts with the template's thinking switch on (default: off)")


def load_for_inference(model_dir, dtype: str | None = None, device: str | None = None, adapter=None):
    """(model in eval mode, the checkpoint's tokenizer with its own chat template, device). A blockdiff export
    carries the template training used (``chat_template.jinja``)."""
    from transformers import AutoTokenizer  # here: seconds of import, `blockdiff eval --help` stays fast

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = _DTYPES[dtype] if dtype else ("bfloat16" if str(device).startswith("cuda") else "float32")
    model = DiffusionGemma.from_pretrained(str(model_dir), dtype=getattr(torch, name), device=device).eval()
    if adapter is not None:
        model = load_adapter(model, adapter)  # PEFT-format adapter, checked against the base, merged for speed
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return model, tokenizer, device


def settings_for_checkpoint(model_dir, tokenizer=None, **overrides) -> SamplerSettings:
    """Checkpoint's generation_config.json + overrides; EOS from the tokenizer if the file names none.
    ``model_dir``: a local directory or a hub id (its snapshot, as the weights are read)."""
    if isinstance(model_dir, (str, os.PathLike)) and not Path(model_dir).exists():
        model_dir = resolve_checkpoint_dir(model_dir)
    raw = read_generation_config(model_dir)
    if raw.get("eos_token_id") is None and tokenizer is not None and overrides.get("eos_token_ids") is None:
        overrides["eos_token_ids"] = prompting.eos_ids_for_tokenizer(tokenizer)
    return SamplerSettings.from_generation_config(raw, **overrides)


def _read_prompt_file(path) -> list[list[dict]]:
    """JSONL of {"messages": [...]} (a trailing assistant turn is dropped), {"prompt": str} or {"question": str}."""
    convs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if isinstance(row, dict) and isinstance(row.get("prompt"), str):
                    convs.append([{"role": "user", "content": row["prompt"]}])
                    continue
                msgs = _as_messages(row)
            except (json.JSONDecodeError, DataError, AttributeError, TypeError) as e:
                raise DataError(f"expected a JSON object with 'messages', 'prompt' or 'question' ({e})",
                                file=path, line=lineno) from None
            convs.append(msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs)
    return convs


def _tqdm(total: int, desc: str):
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=None)


def cli_generate(argv=None) -> int:
    """``blockdiff generate --model DIR (--prompt TEXT | --input FILE.jsonl) [...]``."""
    p = argparse.ArgumentParser(prog="blockdiff generate", description="Sample replies with block diffusion.")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one user message")
    src.add_argument("--input", help="JSONL of conversations / prompts")
    p.add_argument("--output", help="write JSONL {prompt, output} here")
    args = p.parse_args(argv)

    model, tokenizer, device = load_for_inference(args.model, args.dtype, args.device, args.adapter)
    settings = settings_for_checkpoint(args.model, tokenizer, max_new_tokens=args.max_new_tokens,
                                       max_denoising_steps=args.steps, seed=args.seed,
                                       t_max=args.t_max, t_min=args.t_min)
    convs = [[{"role": "user", "content": args.prompt}]] if args.prompt is not None else _read_prompt_file(args.input)
    outputs = []
    with _tqdm(len(convs), "generate") as bar:
        for lo in range(0, len(convs), args.batch_size):
            chunk = convs[lo:lo + args.batch_size]
            seeds = [settings.seed + lo + i for i in range(len(chunk))]
            outputs += prompting.generate_text(model, tokenizer, chunk, settings, device=device, row_seeds=seeds,
                                               enable_thinking=args.enable_thinking)
            bar.update(len(chunk))
    for conv, out in zip(convs, outputs):
        if len(convs) > 1:
            print(f"### {conv[-1]['content']}")
        print(out)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for conv, out in zip(convs, outputs):
                f.write(json.dumps({"prompt": conv[-1]["content"], "output": out}, ensure_ascii=False) + "\n")
    return 0


def cli_eval(argv=None) -> int:
    """``blockdiff eval [gsm8k] --model DIR --data FILE.jsonl [--limit N] [--batch-size N] [--output FILE]``;
    ``blockdiff eval lm-eval ...`` runs lm-evaluation-harness tasks (``blockdiff.infer.lm_eval_cli``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:
        from blockdiff.infer.lm_eval_cli import cli_lm_eval  # lm-eval is an optional extra

        return cli_lm_eval(argv[1:])
    p = argparse.ArgumentParser(prog="blockdiff eval", description="Evaluate answer accuracy "
                                "(`blockdiff eval lm-eval -h`: lm-evaluation-harness tasks).")
    p.add_argument("task", nargs="?", default="gsm8k", choices=["gsm8k"], help="default: gsm8k")
    add_model_args(p)
    p.add_argument("--data", required=True, help="chat JSONL whose last assistant turn ends in '#### N'")
    p.add_argument("--limit", type=int)
    p.add_argument("--output", help="per-example JSONL")
    args = p.parse_args(argv)

    rows = list(load_dataset_rows(args.data, split="test"))
    if args.limit is not None:
        rows = rows[: args.limit]
    if not rows:
        raise DataError("no rows to evaluate", file=args.data)
    model, tokenizer, device = load_for_inference(args.model, args.dtype, args.device, args.adapter)
    settings = settings_for_checkpoint(args.model, tokenizer, max_new_tokens=args.max_new_tokens,
                                       max_denoising_steps=args.steps, seed=args.seed,
                                       t_max=args.t_max, t_min=args.t_min)
    with _tqdm(len(rows), "eval gsm8k") as bar:
        res = evaluate_gsm8k(model, tokenizer, rows, settings, batch_size=args.batch_size,
                             out_jsonl=args.output, device=device, progress=bar,
                             enable_thinking=args.enable_thinking)
    half = (res["ci_high"] - res["ci_low"]) / 2
    print(f"gsm8k accuracy: {res['accuracy']:.4f} ± {half:.4f} (95% Wilson CI "
          f"[{res['ci_low']:.4f}, {res['ci_high']:.4f}]; {res['correct']}/{res['n']})")
    print(f"time: {res['seconds']:.1f} s, {res['new_tokens']} new tokens, {res['tokens_per_second']:.1f} tokens/s")
    return 0
