"""Parallelism applied from outside the plain model (torchtitan's pattern).

Today: one process, or several processes with replicated weights and gradients summed by the
training loop. FSDP2, expert parallelism, activation checkpointing and compile arrive with the
scale-out issue and plug in here.
"""

from __future__ import annotations

from .distributed import DistInfo


def parallelize(model, cfg, dist: DistInfo):
    """Return the model to train (on ``dist.device``)."""
    return model.to(dist.device)
