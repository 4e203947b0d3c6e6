"""benchmarks/trace_breakdown.py on hand-made traces: idle time, exposed NCCL time, waiting across ranks."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import trace_breakdown as tb  # noqa: E402


def kernel(name, ts, dur, corr=None):
    return {"cat": "kernel", "ph": "X", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def test_rank_breakdown_idle_and_exposed_comm():
    events = [
        kernel("gemm", 0, 100),
        kernel("ncclDevKernel_SendRecv", 50, 100),  # 50 overlapped by the gemm, 50 exposed
        kernel("ncclDevKernel_AllGather_RING", 150, 10),  # fully exposed
        kernel("elementwise", 200, 50, corr=7),  # after an idle gap of 40
        {"cat": "cuda_runtime", "ph": "X", "name": "cudaLaunchKernel", "ts": 190, "dur": 2, "args": {"correlation": 7}},
        {"cat": "cpu_op", "ph": "X", "name": "aten::mul", "ts": 188, "dur": 5},
        {"cat": "cuda_runtime", "ph": "X", "name": "cudaStreamSynchronize", "ts": 120, "dur": 30},
    ]
    got = tb.rank_breakdown(events, steps=1)
    us = 1e-3  # the report is in ms
    assert abs(got["window_ms"] - 250 * us) < 1e-9
    assert abs(got["idle_ms"] - 40 * us) < 1e-9
    assert abs(got["compute_ms"] - 150 * us) < 1e-9
    assert got["nccl"]["all_to_all"]["exposed_ms"] == round(50 * us, 2)
    assert abs(got["host_sync_ms"] - 30 * us) < 1e-9
    gap = got["largest_idle_gaps"][0]
    assert gap["next"] == "elementwise" and gap["host_ops"] == ["aten::mul"]
    # compute kernels by time, NCCL kernels left out
    assert got["top_compute_kernels_ms"] == {"gemm": 0.1, "elementwise": 0.05}


def test_compare_ranks_waiting_and_last_arrival():
    # rank 1 reaches both exchanges late: its kernels are short, rank 0's kernels wait for it
    r0 = [kernel("ncclDevKernel_SendRecv", 0, 500), kernel("ncclDevKernel_SendRecv", 1000, 300)]
    r1 = [kernel("ncclDevKernel_SendRecv", 400, 100), kernel("ncclDevKernel_SendRecv", 1200, 100)]
    per = {0: tb.rank_breakdown(r0, 1), 1: tb.rank_breakdown(r1, 1)}
    got = tb.compare_ranks(per, 1)["all_to_all"]
    assert got["transfer_ms"] == 0.2 and got["wait_ms"] == {0: 0.6, 1: 0.0}
    assert got["arrived_last"] == {0: 0, 1: 2}


def test_breakdown_reads_rank_files(tmp_path):
    for r in range(2):
        trace = {"traceEvents": [kernel("gemm", 0, 10), kernel("ncclDevKernel_AllReduce", 10, 5 + r)],
                 "baseTimeNanoseconds": 0}
        (tmp_path / f"rank{r}.trace.json").write_text(json.dumps(trace))
    got = tb.breakdown(tmp_path, steps=1)
    assert set(got["ranks"]) == {0, 1}
    assert got["collectives_across_ranks"]["all_reduce"]["wait_ms"] == {0: 0.0, 1: 0.0}
