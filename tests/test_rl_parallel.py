"""``blockdiff rl`` on 2 CPU processes (gloo, FSDP2 + expert parallel 2) equals 1 process: identical rollouts
(the sampler's rows split over the ranks in lockstep, seeded by global prompt and completion index), equal
loss sums and gradients of the GRPO step (with the KL to a frozen reference copy). Tolerances as
tests/test_parallel.py: loss sums rel 1e-6, every gradient max|diff| <= 1e-5 * max|g| + 1e-7."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import ROOT, TIMEOUT, check_ranks_done, torchrun_env

WORKER = str(ROOT / "tests" / "rl_dist_worker.py")
ARGS = ["--model.num_layers", "2", "--rl.prompts_per_step", "2", "--rl.group_size", "2", "--rl.max_new_tokens", "32",
        "--rl.max_denoising_steps", "4", "--rl.rewards", '[{name: "rl_rewards:distinct_words", weight: 1.0}]',
        "--rl.kl_beta", "0.1", "--train.micro_batch_size", "1", "--train.global_batch_size", "2",
        "--objective.self_conditioning_prob", "0.5"]


def completions(path) -> list:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["completions"])


@pytest.mark.dist
@pytest.mark.slow
def test_rl_step_on_2_processes_equals_1(tmp_path):
    import subprocess

    from blockdiff.data.synthetic import write_splits
    from safetensors.torch import save_file

    import rl_dist_worker

    data = str(write_splits(tmp_path / "data", 12, 2, seed=0)[0])
    base = ["--data.train_path", data, "--train.output_dir", str(tmp_path / "run"), *ARGS]
    ref_file = tmp_path / "ref.safetensors"
    tensors, meta = rl_dist_worker.rl_step_grads(base)
    save_file(tensors, str(ref_file), metadata=meta)
    out = tmp_path / "grads.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", WORKER, str(out), *base,
           "--parallel.ep", "2"]
    p = subprocess.run(cmd, cwd=ROOT, env=torchrun_env(), capture_output=True, text=True, timeout=TIMEOUT)
    check_ranks_done(out, 2, p.stdout + p.stderr)
    assert completions(out) == completions(ref_file)
    assert len({tuple(c) for c in completions(out)}) > 1  # the rows really differ
    ref, got = load_file(str(ref_file)), load_file(str(out))
    assert set(ref) == set(got)
    assert ref["advantages"].abs().max() > 0  # a gradient to compare
    torch.testing.assert_close(got["sums"], ref["sums"], rtol=1e-6, atol=1e-12)
    for k in ref:
        if k.startswith("grad."):
            scale, diff = float(ref[k].abs().max()), float((got[k] - ref[k]).abs().max())
            assert diff <= 1e-5 * scale + 1e-7, f"{k}: max|diff| {diff:.3g} vs max|g| {scale:.3g}"
