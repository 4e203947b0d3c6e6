"""How the sampler decides when to stop: alone (one process) or together with the other ranks.

``sampling.generate`` takes two decisions that depend on its rows' values: the early stop of a block's
denoising loop (every row stable and confident) and, after each block, which rows go on (no EOS yet;
none left: stop). A sharded model (FSDP2 all-gathers, expert-parallel all-to-alls) makes every forward a
collective, so ranks that sample their own rows of one model must take both decisions together and run
the same forward passes: ``Lockstep`` all-reduces them. A rank with nothing left to sample (its rows all
ended, or it got no prompt) carries one dummy row through the remaining passes; dummy rows never delay
the stop and their tokens are discarded. Rows are independent in the sampler (own random streams, rows
that stopped keep their output), so every real row gets the tokens one process would give it.
"""

from __future__ import annotations

import torch


class LocalRows:
    """One process: stop a block once its rows all stopped; keep the rows without an EOS."""

    def block_done(self, finished: torch.Tensor) -> bool:
        return bool(finished.all())

    def rows_to_keep(self, alive: torch.Tensor) -> torch.Tensor:
        """Indices of the rows that go on to the next block (empty: generation ends)."""
        return alive.nonzero().squeeze(-1)


LOCAL_ROWS = LocalRows()


class Lockstep(LocalRows):
    """Both decisions summed over the ranks of ``group`` (default: the world). ``n_real`` of this rank's
    ``n_rows`` first rows are prompts; the rest are dummies (padding of an empty share)."""

    def __init__(self, n_rows: int, n_real: int, group=None):
        self.dummy = torch.arange(n_rows) >= n_real
        self.group = group

    def _global(self, count: torch.Tensor) -> int:
        count = count.to(torch.int64).reshape(1)
        torch.distributed.all_reduce(count, group=self.group)
        return int(count)

    def block_done(self, finished: torch.Tensor) -> bool:
        running = ~(finished | self.dummy.to(finished.device))
        return self._global(running.sum()) == 0

    def rows_to_keep(self, alive: torch.Tensor) -> torch.Tensor:
        live = alive & ~self.dummy.to(alive.device)
        if self._global(live.sum()) == 0:
            return live.nonzero().squeeze(-1)  # empty on every rank: every rank stops
        keep = live.nonzero().squeeze(-1)
        if keep.numel() == 0:  # this rank is done, others are not: row 0 (it ended) runs on as a dummy
            keep = torch.zeros(1, dtype=torch.long, device=alive.device)
        self.dummy = live.index_select(0, keep).logical_not().cpu()
        return keep
