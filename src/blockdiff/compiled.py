"""``torch.compile`` with an eager fallback, for the few hand-picked functions that need fusing (the
full-vocabulary math of the losses and of the sampler)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("blockdiff")


class CompiledOrEager:
    """``fn`` through ``torch.compile`` when ``enabled`` (callers pass CUDA-ness), else as is. A compile
    failure is logged once and the eager function serves from then on: a missing fusion must never stop
    a training run or a sampling job. ``dynamic`` is passed to ``torch.compile``."""

    def __init__(self, fn, dynamic: bool | None = False):
        self.fn, self.dynamic = fn, dynamic
        self.compiled, self.failed = None, False

    def __call__(self, enabled: bool, *args):
        if not enabled or self.failed:
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=self.dynamic)
        try:
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - any compiler error: go on eagerly
            logger.warning("torch.compile of %s failed (%s: %s); running it eagerly", self.fn.__name__,
                           type(e).__name__, str(e)[:300])
            self.failed = True
            return self.fn(*args)
