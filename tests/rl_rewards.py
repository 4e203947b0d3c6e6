"""User reward functions for tests/test_rl.py (``rl.rewards: [{name: "rl_rewards:distinct_words"}]``)."""

import math


def distinct_words(prompt, completion, reference):
    """Varies between completions of a random-init model, so advantages are non-zero."""
    return len(set(completion.split())) / 8.0


def two_arguments(prompt, completion):
    return 0.0


def not_finite(prompt, completion, reference):
    return math.nan


def raises(prompt, completion, reference):
    raise RuntimeError("boom")
