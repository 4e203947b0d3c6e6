"""Rewards of RL completions: the built-in GSM8K exact match and format rewards, and user functions.

``rl.rewards`` lists ``{name, weight}`` entries; a completion's reward is the weighted sum of its terms.
``name`` is a built-in (``gsm8k_exact``, ``format``, ``equations``) or ``"module:function"``, a function
``fn(prompt: str, completion: str, reference: str | None) -> float`` importable from the run's Python
path. Every entry is resolved and called once on a probe at start-up, so an import error, a wrong
signature or a non-finite return is one ConfigError naming the function, before any weight is read.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import operator
import re
from dataclasses import dataclass
from typing import Callable

from blockdiff.errors import ConfigError
from blockdiff.infer.evaluate import extract_answer, normalize_number

RewardFn = Callable[[str, str, "str | None"], float]

# a line holding only "#### N" (N a number as extract_answer reads it), the final-answer line of GSM8K
_ANSWER_LINE = re.compile(r"^\s*####\s*[-\u2212]?\$?\s?[\d,]*\.?\d+\s*$", re.M)


def gsm8k_exact(prompt: str, completion: str, reference: str | None) -> float:
    """1.0 when the completion's last well-formed ``#### N`` line holds the reference answer (the eval's number
    normalisation). Stricter than the eval's ``extract_answer``, which also reads a malformed ending such as
    ``12 * 3 = 36\\n########`` (the last number before it): rewarding that teaches malformed answers."""
    lines = _ANSWER_LINE.findall(completion)
    return float(bool(lines) and reference is not None and
                 extract_answer(lines[-1]) == normalize_number(reference))


def eval_exact(prompt: str, completion: str, reference: str | None) -> float:
    """``blockdiff eval gsm8k``'s rule (``extract_answer``): what the rollouts' logged ``accuracy`` counts."""
    got = extract_answer(completion)
    return float(got is not None and reference is not None and got == normalize_number(reference))


def format_reward(prompt: str, completion: str, reference: str | None) -> float:
    """1.0 when the completion has a well-formed ``#### N`` line."""
    return float(_ANSWER_LINE.search(completion) is not None)


# "lhs = n" where lhs is arithmetic on numbers (GSM8K's worked steps and its <<48/2=24>> calculator notes)
_EQUATION = re.compile(r"([\d.,$() \t+\-*/\u00d7\u00f7]*\d[\d.,$() \t+\-*/\u00d7\u00f7]*)=[ \t]*\$?(-?[\d,]*\.?\d+)")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _arith(node):
    """The value of an arithmetic expression tree of numbers and + - * / (anything else: ValueError)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_arith(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left), _arith(node.right))
    raise ValueError("not arithmetic")


def _equation_holds(lhs: str, rhs: str) -> bool | None:
    """Whether ``lhs = rhs`` is true (None: ``lhs`` is no arithmetic, e.g. a bare number or a date)."""
    expr = lhs.replace(",", "").replace("$", "").replace("\u00d7", "*").replace("\u00f7", "/").strip()
    expr = re.sub(r"^-\s+", "", expr)  # a list bullet ("- 3 + 4 = 7"), not a minus sign
    while expr.count("(") > expr.count(")") and expr.startswith("("):  # "(so 3 + 4 = 7": the text's bracket
        expr = expr[1:].lstrip()
    if not re.search(r"\d\s*[-+*/]\s*[\d(]", expr):
        return None
    try:
        value = _arith(ast.parse(expr, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return False
    want = float(rhs.replace(",", ""))
    return math.isclose(value, want, rel_tol=1e-6, abs_tol=1e-9)


def equations_reward(prompt: str, completion: str, reference: str | None) -> float:
    """1.0 when the completion shows its arithmetic (at least one ``a op b = c`` step) and every step is right:
    an answer reached through wrong steps (a lucky guess) earns gsm8k_exact but not this."""
    held = [_equation_holds(lhs, rhs) for lhs, rhs in _EQUATION.findall(completion)]
    held = [h for h in held if h is not None]
    return float(bool(held) and all(held))


BUILTIN: dict[str, RewardFn] = {"gsm8k_exact": gsm8k_exact, "format": format_reward, "equations": equations_reward}

# the probe every reward is called on at start-up
_PROBE = ("What is 2 + 3?", "2 + 3 = 5\n#### 5", "5")


@dataclass
class RewardTerm:
    name: str
    weight: float
    fn: RewardFn


def _located(msg: str, field: str, where) -> ConfigError:
    return where.error(field, msg) if where is not None else ConfigError(msg, field=field)


def _resolve(name: str, field: str, where) -> RewardFn:
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise _located(f"unknown reward {name!r}: a built-in ({', '.join(BUILTIN)}) or 'module:function'",
                       field, where)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001  (whatever the user's module raised on import)
        raise _located(f"reward {name!r}: cannot import {module_name!r} ({type(e).__name__}: {e})",
                       field, where) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise _located(f"reward {name!r}: {module_name!r} has no function {attr!r}", field, where)
    try:
        inspect.signature(fn).bind("prompt", "completion", "reference")
    except TypeError:
        raise _located(f"reward {name!r}: expected fn(prompt, completion, reference) -> float, got "
                       f"{attr}{inspect.signature(fn)}", field, where) from None
    except ValueError:  # a builtin without a signature: the probe call below decides
        pass
    return fn


def call_reward(term: RewardTerm, prompt: str, completion: str, reference: str | None) -> float:
    """One term's value; anything but a finite number is a ConfigError naming the function."""
    try:
        value = term.fn(prompt, completion, reference)
    except Exception as e:  # noqa: BLE001  (the user's function failed: say which one)
        raise ConfigError(f"reward {term.name!r} raised {type(e).__name__}: {e}", field="rl.rewards") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"reward {term.name!r} returned {value!r}; expected a finite float", field="rl.rewards")
    return float(value)


def build_rewards(entries: list[dict], where=None) -> list[RewardTerm]:
    """Resolve and probe ``rl.rewards`` (see the module doc). ``where``: the config's locator (file and line)."""
    if not entries:
        raise _located("no rewards: give at least one {name, weight}", "rl.rewards", where)
    terms = []
    for i, entry in enumerate(entries):
        field = "rl.rewards"
        if not isinstance(entry, dict) or set(entry) - {"name", "weight"} or "name" not in entry:
            raise _located(f"entry {i}: expected {{name: ..., weight: ...}}, got {entry!r}", field, where)
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise _located(f"entry {i} ({entry['name']!r}): weight must be a finite number, got {weight!r}",
                           field, where)
        term = RewardTerm(str(entry["name"]), float(weight), _resolve(str(entry["name"]), field, where))
        try:
            call_reward(term, *_PROBE)
        except ConfigError as e:
            raise _located(e.msg + " on the start-up probe", field, where) from None
        terms.append(term)
    return terms


def score(terms: list[RewardTerm], prompt: str, completion: str, reference: str | None) -> tuple[float, dict]:
    """(weighted total, {term name: unweighted value})."""
    parts = {t.name: call_reward(t, prompt, completion, reference) for t in terms}
    return sum(t.weight * parts[t.name] for t in terms), parts
