"""An example user reward for ``rl.rewards`` (``{name: "grounded_reward:grounded", weight: 1.0}``, with this folder
on ``PYTHONPATH``): a process reward for the demo's synthetic problems.

``grounded`` pays 1.0 when a completion's steps form a chain from the prompt to its answer: at least one
``a op b = c`` step, every number on a step's left side is in the prompt or an earlier step's result, and the
last ``#### N`` line repeats the last step's result. It says nothing about whether the arithmetic is right
(the built-in ``equations``) or the answer is (``gsm8k_exact``). It suits problems whose every operand is
written in the prompt, as the demo's are; on GSM8K many steps use numbers the text only names ("half",
"a dozen"), which it would refuse.
"""

from __future__ import annotations

import re

_STEP = re.compile(r"(\d[\d ]*(?:[-+*/] *\d[\d ]*)+)= *(\d+)")
_ANSWER = re.compile(r"^\s*####\s*(\d+)\s*$", re.M)


def grounded(prompt: str, completion: str, reference: str | None) -> float:
    known = set(re.findall(r"\d+", prompt))
    steps = _STEP.findall(completion)
    answers = _ANSWER.findall(completion)
    if not steps or not answers:
        return 0.0
    for lhs, result in steps:
        if not set(re.findall(r"\d+", lhs)) <= known:
            return 0.0
        known.add(result)
    return float(answers[-1] == steps[-1][1])
