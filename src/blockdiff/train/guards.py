"""Run-health guards called from the training loop (cheap, host-side, no effect on the trajectory)."""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque

log = logging.getLogger("blockdiff")


class GradNormGuard:
    """Warn when the gradient norm explodes repeatedly.

    A step "explodes" when its (pre-clipping) grad norm exceeds ``factor`` x the running median of the
    last ``window`` finite norms. After ``patience`` consecutive exploding steps one warning is logged
    (and returned); the next warning needs a calm step in between. Non-finite norms are the NaN policy's
    business and are ignored here. Needs ``min_history`` norms before it judges anything.
    """

    def __init__(self, factor: float = 10.0, patience: int = 3, window: int = 50, min_history: int = 5):
        self.factor, self.patience, self.min_history = factor, patience, min_history
        self.history: deque[float] = deque(maxlen=window)
        self.streak = 0
        self.warnings = 0

    def observe(self, step: int, norm: float) -> str | None:
        if not math.isfinite(norm):
            return None
        message = None
        if len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            if norm > self.factor * median:
                self.streak += 1
                if self.streak == self.patience:
                    self.warnings += 1
                    message = (f"grad norm exploding: {self.patience} consecutive steps above {self.factor:g}x "
                               f"the running median {median:.4g} (step {step}: {norm:.4g}); consider a lower "
                               "optimizer.lr or optimizer.grad_clip")
                    log.warning(message)
            else:
                self.streak = 0
        self.history.append(norm)
        return message
