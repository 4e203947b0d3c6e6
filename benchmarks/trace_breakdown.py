"""Where the GPU time of a profiled multi-GPU step goes, from the torch-profiler chrome traces
(``<run>/profile/rank<R>.trace.json``, written by ``logging.profile_at``).

    python benchmarks/trace_breakdown.py RUN_DIR/profile [--steps 2]

Per rank (times per step, ms): the window from first to last kernel; time with no kernel running (idle);
compute kernels (union of the non-NCCL kernels); NCCL kernels by collective, and the part of each that no
compute kernel overlaps (exposed); the time the host spent waiting for the GPU (cudaStreamSynchronize, ...).
Across ranks, for every collective occurrence (matched by order per kind): the duration of the shortest
rank's kernel (about the transfer itself: the last rank to arrive waits least) against each rank's,
so ``wait`` is how long each rank's kernel sat waiting for the others; and which rank arrived last.
The largest idle gaps are listed with the kernel that ended each and the host op that launched the next
(host ops are in the trace unless it was written with ``logging.profile_host_ops: false``), and the compute
kernels taking the most time.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

NCCL_KINDS = (("AllGather", "all_gather"), ("ReduceScatter", "reduce_scatter"), ("AllReduce", "all_reduce"),
              ("SendRecv", "all_to_all"), ("AllToAll", "all_to_all"), ("Broadcast", "broadcast"))
# the host waiting for the GPU (a D2H read is a cudaMemcpyAsync followed by a cudaStreamSynchronize)
HOST_SYNCS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}


def nccl_kind(name: str) -> str | None:
    if "nccl" not in name.lower():
        return None
    return next((kind for key, kind in NCCL_KINDS if key in name), "other")


def merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def covered_length(merged: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in merged)


def uncovered(interval: tuple[float, float], cover: list[tuple[float, float]]) -> float:
    """Length of ``interval`` not covered by the merged, sorted intervals ``cover``."""
    a, b = interval
    covered = sum(max(0.0, min(b, y) - max(a, x)) for x, y in cover if x < b and y > a)
    return (b - a) - covered


def rank_breakdown(events: list[dict], steps: int, top_gaps: int = 8, base_us: float = 0.0,
                   top_kernels: int = 12) -> dict:
    """``base_us``: the trace's time origin (``baseTimeNanoseconds``), so arrivals compare across ranks."""
    kernels = sorted((e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"), key=lambda e: e["ts"])
    if not kernels:
        return {"error": "no kernels in the trace"}
    t0, t1 = kernels[0]["ts"], max(e["ts"] + e["dur"] for e in kernels)
    compute = merge([(e["ts"], e["ts"] + e["dur"]) for e in kernels if nccl_kind(e["name"]) is None])
    busy = merge([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    per = 1e3 * steps  # us -> ms per step
    nccl = defaultdict(lambda: {"count": 0, "kernel_ms": 0.0, "exposed_ms": 0.0})
    occurrences = defaultdict(list)
    for e in kernels:
        kind = nccl_kind(e["name"])
        if kind is None:
            continue
        row = nccl[kind]
        row["count"] += 1
        row["kernel_ms"] += e["dur"] / per
        row["exposed_ms"] += uncovered((e["ts"], e["ts"] + e["dur"]), compute) / per
        occurrences[kind].append((e["ts"] + base_us, e["dur"]))
    syncs = [e for e in events if e.get("cat") == "cuda_runtime" and e.get("name") in HOST_SYNCS]
    # the host op that launched the kernel after each of the largest idle gaps
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("cat") == "cuda_runtime" and "args" in e and "correlation" in e["args"]}
    host_ops = sorted((e for e in events if e.get("cat") == "cpu_op" and e.get("ph") == "X"), key=lambda e: e["ts"])
    gaps = []
    for (a, b), (c, _) in zip(busy, busy[1:]):
        gaps.append((c - b, b, c))
    gaps.sort(reverse=True)
    listed = []
    by_start = {e["ts"]: e for e in kernels}
    ended = {e["ts"] + e["dur"]: e for e in kernels}
    for length, start, end in gaps[:top_gaps]:
        nxt = by_start.get(end)
        launch = launches.get(nxt["args"].get("correlation")) if nxt and "args" in nxt else None
        ops = [o["name"] for o in host_ops if launch and o["ts"] <= launch["ts"] <= o["ts"] + o["dur"]]
        listed.append({"at_ms": round((start - t0) / 1e3, 2), "gap_ms": round(length / 1e3, 2),
                       "after": (ended.get(start) or {}).get("name", "?")[:60],
                       "next": (nxt or {}).get("name", "?")[:60], "host_ops": ops[-3:]})
    window = t1 - t0
    by_name = Counter()
    for e in kernels:
        if nccl_kind(e["name"]) is None:
            by_name[e["name"][:80]] += e["dur"] / per
    return {
        "window_ms": window / per,
        "idle_ms": (window - covered_length(busy)) / per,
        "compute_ms": covered_length(compute) / per,
        "nccl": {k: {**v, "kernel_ms": round(v["kernel_ms"], 2), "exposed_ms": round(v["exposed_ms"], 2)}
                 for k, v in nccl.items()},
        "host_sync_ms": sum(e["dur"] for e in syncs) / per,
        "host_syncs": dict(Counter(e["name"] for e in syncs)),
        "largest_idle_gaps": listed,
        "top_compute_kernels_ms": {k: round(v, 3) for k, v in by_name.most_common(top_kernels)},
        "_occurrences": occurrences,
    }


def compare_ranks(per_rank: dict[int, dict], steps: int) -> dict:
    """Per collective kind: each rank's waiting (its kernel time minus the shortest rank's, summed over the
    occurrences) and how often each rank arrived last (latest kernel start)."""
    out = {}
    kinds = set.intersection(*(set(r["_occurrences"]) for r in per_rank.values()))
    for kind in sorted(kinds):
        seqs = {r: v["_occurrences"][kind] for r, v in per_rank.items()}
        n = min(len(s) for s in seqs.values())
        wait = dict.fromkeys(seqs, 0.0)
        last = Counter()
        transfer = 0.0
        for i in range(n):
            shortest = min(s[i][1] for s in seqs.values())
            transfer += shortest
            for r, s in seqs.items():
                wait[r] += s[i][1] - shortest
            last[max(seqs, key=lambda r: seqs[r][i][0])] += 1
        out[kind] = {"occurrences_per_step": n / steps, "transfer_ms": round(transfer / 1e3 / steps, 2),
                     "wait_ms": {r: round(w / 1e3 / steps, 2) for r, w in sorted(wait.items())},
                     "arrived_last": {r: last[r] for r in sorted(seqs)}}
    return out


def breakdown(trace_dir, steps: int = 2) -> dict:
    per_rank = {}
    for path in sorted(Path(trace_dir).glob("rank*.trace.json")):
        rank = int(path.name[4:].split(".")[0])
        trace = json.loads(path.read_text())
        per_rank[rank] = rank_breakdown(trace["traceEvents"], steps, base_us=trace.get("baseTimeNanoseconds", 0) / 1e3)
    across = compare_ranks(per_rank, steps) if len(per_rank) > 1 else {}
    for v in per_rank.values():
        v.pop("_occurrences", None)
    return {"ranks": per_rank, "collectives_across_ranks": across}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace_dir")
    ap.add_argument("--steps", type=int, default=2, help="profiled steps in the traces")
    args = ap.parse_args()
    print(json.dumps(breakdown(args.trace_dir, args.steps), indent=1, default=str))


if __name__ == "__main__":
    main()
