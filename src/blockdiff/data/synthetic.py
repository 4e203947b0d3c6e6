"""Deterministic GSM8K-style arithmetic word problems for the CPU demo and tests.

Numbers are small and answers short (one or two lines like ``3 + 4 = 7`` then ``#### 7``) so a
tiny model can learn them in minutes. Every word used here is in the shipped tiny tokenizer's
vocabulary (``vocabulary_words()`` feeds ``build_tokenizer.py``), so no sample falls back to
characters or ``<unk>``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from pathlib import Path

NAMES = ["Tom", "Ann", "Sam", "Mia", "Ben", "Lily", "Max", "Emma", "Leo", "Zoe", "Jack", "Nora"]
ITEMS = ["apples", "pears", "books", "pens", "cookies", "marbles", "stickers", "candies",
         "cards", "balls", "eggs", "flowers"]
VEHICLES = ["car", "bus", "train", "bike", "boat", "truck"]
FRIENDS = ["friends", "kids", "boxes", "bags", "groups"]

# Each template: (kind, question format, answer builder). Answer builders get the random
# generator and return (format fields, answer lines, final answer).


# Operand ranges per difficulty level. "standard" is GSM8K-like small arithmetic; "easy" keeps every
# product and sum small enough that the tiny CPU demo model can learn the facts in a few minutes.
RANGES = {
    "standard": dict(shop_n=(2, 9), shop_p=(1, 9), share_k=(2, 6), share_each=(2, 9), age_a=(3, 40),
                     age_b=(1, 30), speed_s=(2, 12), speed_h=(2, 5), give_a=(5, 30), give_b=(1, 20),
                     save_a=(2, 9), save_w=(2, 8), save_spent=(1, 9)),
    "easy": dict(shop_n=(2, 5), shop_p=(1, 5), share_k=(2, 4), share_each=(2, 5), age_a=(3, 12),
                 age_b=(1, 9), speed_s=(1, 4), speed_h=(2, 3), give_a=(5, 12), give_b=(1, 6),
                 save_a=(2, 5), save_w=(2, 4), save_spent=(1, 5)),
}


def _shopping(rng: random.Random, r: dict):
    n, p = rng.randint(*r["shop_n"]), rng.randint(*r["shop_p"])
    fields = {"n": n, "p": p, "item": rng.choice(ITEMS)}
    q = "{name} buys {n} {item} at ${p} each. How many dollars does {name} spend?"
    return q, fields, [f"{n} * {p} = {n * p}"], n * p


def _sharing(rng: random.Random, r: dict):
    k, each = rng.randint(*r["share_k"]), rng.randint(*r["share_each"])
    fields = {"total": k * each, "k": k, "item": rng.choice(ITEMS), "group": rng.choice(FRIENDS)}
    q = ("{name} has {total} {item} and puts them equally into {k} {group}. "
         "How many {item} are in each of the {group}?")
    return q, fields, [f"{k * each} / {k} = {each}"], each


def _ages(rng: random.Random, r: dict):
    a, b = rng.randint(*r["age_a"]), rng.randint(*r["age_b"])
    fields = {"a": a, "b": b}
    q = "{name} is {a} years old. {other} is {b} years older than {name}. How old is {other}?"
    return q, fields, [f"{a} + {b} = {a + b}"], a + b


def _speed(rng: random.Random, r: dict):
    s, h = rng.randint(*r["speed_s"]) * 5, rng.randint(*r["speed_h"])
    fields = {"s": s, "h": h, "vehicle": rng.choice(VEHICLES)}
    q = "A {vehicle} goes {s} miles per hour for {h} hours. How many miles does the {vehicle} go?"
    return q, fields, [f"{s} * {h} = {s * h}"], s * h


def _give_away(rng: random.Random, r: dict):
    a, b = rng.randint(*r["give_a"]), rng.randint(*r["give_b"])
    c = rng.randint(1, a + b)
    fields = {"a": a, "b": b, "c": c, "item": rng.choice(ITEMS)}
    q = ("{name} has {a} {item}. {name} gets {b} more and then gives {c} to {other}. "
         "How many {item} does {name} have now?")
    return q, fields, [f"{a} + {b} = {a + b}", f"{a + b} - {c} = {a + b - c}"], a + b - c


def _savings(rng: random.Random, r: dict):
    a, w, spent = rng.randint(*r["save_a"]), rng.randint(*r["save_w"]), rng.randint(*r["save_spent"])
    total = a * w
    spent = min(spent, total)
    fields = {"a": a, "w": w, "spent": spent}
    q = ("{name} saves ${a} each week for {w} weeks and then spends ${spent}. "
         "How many dollars does {name} have left?")
    return q, fields, [f"{a} * {w} = {total}", f"{total} - {spent} = {total - spent}"], total - spent


TEMPLATES = [_shopping, _sharing, _ages, _speed, _give_away, _savings]

# Literal words the templates and answers can emit besides the tables above.
_TEMPLATE_WORDS = (
    "buys at each How many dollars does spend has and puts them equally into are in the of "
    "is years old older than How old A goes miles per hour for hours go gets more then "
    "gives to have now saves week weeks spends left"
)

_ANSWER_RE = re.compile(r"####\s*(-?[\d,]+(?:\.\d+)?)\s*$")


def vocabulary_words() -> list[str]:
    """Every word a generated sample can contain (sorted, unique)."""
    words = set(_TEMPLATE_WORDS.split()) | set(NAMES) | set(ITEMS) | set(VEHICLES) | set(FRIENDS)
    return sorted(words)


def _make_problem(rng: random.Random, level: str = "standard") -> tuple[str, str, int]:
    template = rng.choice(TEMPLATES)
    name, other = rng.sample(NAMES, 2)
    question, fields, lines, answer = template(rng, RANGES[level])
    question = question.format(name=name, other=other, **fields)
    solution = "\n".join(lines + [f"#### {answer}"])
    return question, solution, answer


def _row(question: str, solution: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": solution}]}


def _unique_problems(n: int, seed: int, level: str = "standard") -> list[tuple[str, str]]:
    """``n`` problems with pairwise different questions, deterministic in ``seed``."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:  # the problem space is large; this only guards misuse
            raise ValueError(f"could not generate {n} distinct problems (got {len(out)})")
        question, solution, _ = _make_problem(rng, level)
        if question not in seen:
            seen.add(question)
            out.append((question, solution))
    return out


def generate(n: int, seed: int = 0, level: str = "standard") -> list[dict]:
    """``n`` distinct problems as chat rows ``{"messages": [user, assistant]}``."""
    return [_row(q, s) for q, s in _unique_problems(n, seed, level)]


def generate_multiturn(n: int, seed: int = 0, max_turns: int = 3, level: str = "standard") -> list[dict]:
    """``n`` chat rows of 1..``max_turns`` (user, assistant) problem pairs each (multi-turn SFT and
    packing tests: conversations of different lengths). Deterministic in ``seed``."""
    rng = random.Random(seed + 7919)
    turns = [rng.randint(1, max_turns) for _ in range(n)]
    problems = iter(_unique_problems(sum(turns), seed, level))
    rows = []
    for k in turns:
        messages = []
        for q, s in (next(problems) for _ in range(k)):
            messages += _row(q, s)["messages"]
        rows.append({"messages": messages})
    return rows


def write_splits(out_dir, n_train: int, n_test: int, seed: int = 0, level: str = "standard") -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl``; no question appears in both (held-out split)."""
    problems = _unique_problems(n_train + n_test, seed, level)
    out = Path(out_dir)
    os.makedirs(out, exist_ok=True)
    paths = []
    for name, chunk in (("train", problems[:n_train]), ("test", problems[n_train:])):
        path = out / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for q, s in chunk:
                f.write(json.dumps(_row(q, s), ensure_ascii=False) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def extract_final_answer(text: str) -> str | None:
    """The number after the last ``####`` (commas removed), or None if there is none."""
    for line in reversed(text.strip().splitlines()):
        if "####" in line:
            m = _ANSWER_RE.search(line.strip())
            return m.group(1).replace(",", "") if m else None
    return None


def final_answer_of_row(row: dict) -> str | None:
    """Reference answer of a chat row: parsed from its last assistant message."""
    return extract_final_answer(row["messages"][-1]["content"])


def trivial_baseline_accuracy(test_rows: list[dict]) -> float:
    """Accuracy of always answering the most common reference answer (the bar to beat)."""
    answers = [final_answer_of_row(r) for r in test_rows]
    if not answers:
        return 0.0
    _, count = Counter(answers).most_common(1)[0]
    return count / len(answers)


# Token counts of GSM8K chat rows under a Gemma-sized tokenizer (for packing benchmarks and tests, not
# for training): the question ~40-200 tokens (median ~80), the answer ~50-300 (median ~120), plus the
# Gemma 4 chat template's tokens around them (<bos><|turn>user\n ... <turn|>\n<|turn>model\n before the answer,
# <turn|>\n after it).
GSM8K_LIKE = dict(question=(80, 0.35, 40, 200), answer=(120, 0.4, 50, 300), template_prompt=9, template_response=2)


def gsm8k_like_lengths(n: int, seed: int = 0, scale: float = 1.0) -> list[tuple[int, int]]:
    """``n`` (prompt tokens, response tokens) pairs: log-normal question / answer lengths (median,
    sigma, clipped to [lo, hi]) of ``GSM8K_LIKE`` times ``scale`` plus the template tokens.
    Deterministic in ``seed``."""
    rng = random.Random(seed)

    def draw(median, sigma, lo, hi):
        return max(1, round(scale * min(hi, max(lo, rng.lognormvariate(math.log(median), sigma)))))

    g = GSM8K_LIKE
    return [(draw(*g["question"]) + g["template_prompt"], draw(*g["answer"]) + g["template_response"])
            for _ in range(n)]


def length_examples(lengths: list[tuple[int, int]], *, canvas_length: int, seq_length: int, vocab_size: int,
                    eos_id: int = 1, seed: int = 0) -> list:
    """Canvas Examples (``canvas.build_example``: the response EOS-filled to whole canvas blocks, long
    ones truncated, too-long prompts skipped) of random tokens with the given (prompt, response) lengths."""
    # here: writing the synthetic data files (the demo's first step) needs no torch (start-up cost)
    import torch

    from blockdiff.data.canvas import build_example

    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (p, r) in enumerate(lengths):
        ids = torch.randint(3, vocab_size, (p + r,), generator=g).tolist()
        ex = build_example(ids, [False] * p + [True] * r, p, canvas_length=canvas_length, seq_length=seq_length,
                           eos_id=eos_id, sample_id=i)
        if ex is not None:
            out.append(ex)
    return out
