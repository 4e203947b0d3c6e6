"""Row plans for packed micro-batches (``data.packing: true``): which conversations share a row.

The packer only REGROUPS the conversations of one micro-batch: which samples a rank and a micro-batch
get is decided before (``train.host_micro_batches``), and every conversation keeps its own sample id
and noise stream, so the plan never changes what is trained on, only how it is laid out.

What it minimises: the tokens the model runs over, padding included. The encoder runs over the clean
rows, ``rows x width`` (``width``: the longest row rounded up to ``pad_to_multiple``); the decoder over
the canvas, ``rows x the most canvas blocks in a row x canvas_length``. The unpacked batch is
``n x round_up(longest conversation)`` and ``n x its most blocks``. ``pack_rows`` tries, for every
feasible row count r, the smallest row capacity W (between the longest conversation and ``capacity``)
at which best-fit decreasing places everything in at most r rows; the candidates also include
one conversation per row (the unpacked layout), best-fit decreasing at W = the longest conversation and
the greedy next-fit in the given order (the first packer). Among the candidates that pad the clean rows
no more than the unpacked batch it keeps the one with the fewest clean + canvas tokens (ties: fewer
clean tokens, fewer canvas tokens, the narrower row (cheaper attention), the smaller capacity). So the
logged ``packing_efficiency`` (real / padded clean tokens) is never below the unpacked batch's, the
clean + canvas tokens never exceed the unpacked batch's, and when packing cannot help (e.g. equal
lengths that do not tile a row) the plan is one conversation per row. Everything is integer arithmetic
on the lengths in the given order: the same input always gives the same plan.
"""

from __future__ import annotations

from typing import Sequence


def round_up(n: int, multiple: int | None) -> int:
    return -(-n // multiple) * multiple if multiple else n


def next_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy next-fit in the given order (the first packer; kept as a baseline for comparison):
    append to the current row while it stays within ``capacity``, else open a new row."""
    rows: list[list[int]] = []
    used = capacity + 1
    for i, n in enumerate(lengths):
        if used + n > capacity:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: conversations from longest to shortest (ties: lower index first), each into
    the row with the least room left that still holds it (ties: the earlier row), else a new row.
    A conversation longer than ``capacity`` gets a row of its own. Rows list their indices in
    ascending order and are sorted by their first index."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        best = -1
        for r, left in enumerate(room):
            if n <= left and (best < 0 or left < room[best]):
                best = r
        if best < 0:
            rows.append([i])
            room.append(capacity - n)
        else:
            rows[best].append(i)
            room[best] -= n
    return sorted((sorted(r) for r in rows), key=lambda r: r[0])


def plan_cost(rows: list[list[int]], lengths: Sequence[int], blocks: Sequence[int] | None = None,
              pad_to_multiple: int | None = None) -> tuple[int, int, int]:
    """(padded clean tokens, padded canvas blocks, row width) of a plan: rows x round_up(longest row),
    rows x the most canvas blocks in a row (0 without ``blocks``), the padded row width."""
    width = round_up(max(sum(lengths[i] for i in r) for r in rows), pad_to_multiple)
    canvas = max(sum(blocks[i] for i in r) for r in rows) if blocks is not None else 0
    return len(rows) * width, len(rows) * canvas, width


def unpacked_cost(lengths: Sequence[int], blocks: Sequence[int] | None = None,
                  pad_to_multiple: int | None = None) -> tuple[int, int, int]:
    """``plan_cost`` of one conversation per row (what ``collate`` builds)."""
    return plan_cost([[i] for i in range(len(lengths))], lengths, blocks, pad_to_multiple)


def pack_rows(lengths: Sequence[int], capacity: int, pad_to_multiple: int | None = None,
              blocks: Sequence[int] | None = None, canvas_length: int = 0) -> list[list[int]]:
    """Group indices of ``lengths`` into rows of at most ``capacity`` tokens (a conversation longer than
    ``capacity`` alone in its row) with the fewest tokens to run (see the module docstring).

    ``blocks``: canvas blocks per conversation and ``canvas_length``: their size, for the decoder's share
    of the cost (without them only the clean rows count). Returns the rows (ascending indices, rows
    sorted by their first index)."""
    lengths = [int(n) for n in lengths]
    if not lengths:
        return []
    n, total, longest = len(lengths), sum(lengths), max(lengths)
    lo = min(longest, capacity)
    one_each = [[i] for i in range(n)]
    limit = plan_cost(one_each, lengths, None, pad_to_multiple)[0]  # the unpacked batch's clean tokens
    best_key, best_rows = None, None

    def consider(width_cap: int, rows: list[list[int]] | None = None) -> list[list[int]]:
        nonlocal best_key, best_rows
        rows = best_fit_decreasing(lengths, width_cap) if rows is None else rows
        clean, canvas, width = plan_cost(rows, lengths, blocks, pad_to_multiple)
        key = (clean + canvas * canvas_length, clean, canvas, width, width_cap)
        if clean <= limit and (best_key is None or key < best_key):
            best_key, best_rows = key, rows
        return rows

    consider(lo, one_each)  # always allowed: the unpacked layout
    consider(lo)
    consider(capacity, next_fit(lengths, capacity))
    fewest = len(consider(capacity)) if capacity > lo else n
    # r rows need a capacity of at least total / r; below fewest rows nothing fits, above
    # total / longest the bound is the longest conversation itself (already tried)
    for r in range(fewest, min(n, -(-total // max(lo, 1))) + 1):
        a, b = max(lo, -(-total // r)), capacity
        if a > b:
            continue
        while a < b:  # smallest capacity at which best-fit decreasing needs <= r rows
            mid = (a + b) // 2
            if len(best_fit_decreasing(lengths, mid)) <= r:
                b = mid
            else:
                a = mid + 1
        consider(a)
    return best_rows


def packing_efficiency(lengths: Sequence[int], rows: list[list[int]], pad_to_multiple: int | None = None) -> float:
    """Real / padded clean tokens of a plan (the ``packing_efficiency`` the trainer logs)."""
    return sum(lengths) / plan_cost(rows, lengths, None, pad_to_multiple)[0]
