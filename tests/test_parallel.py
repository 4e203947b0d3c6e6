"""FSDP2 + expert parallelism on CPU processes (gloo): equal to the single-process run.

Each distributed case launches ``torchrun ... tests/dist_worker.py`` as a subprocess (timeout) and
trusts the per-rank ``.done`` files the worker writes after a clean finish, not the launcher's exit
code (gloo teardown can abort after a clean run).

Tolerances (fp32 on CPU; only the float summation order differs): loss sums rel 1e-6; every gradient
tensor max|diff| <= 1e-5 * max|g| + 1e-7; global grad norm rel 1e-5; loss curves after a resharded
resume rel 1e-4 (Adam and top-k routing amplify reduction-order rounding a little). The packed multi-turn
case (different row layouts on 1 and 2 processes) uses the same step tolerances.

The tiny model: the demo config with 2 layers (hidden 64, 8 experts, top-2). Self-conditioning
probability 0.5, so ranks draw different coins: pass 1 must still run on every rank (its collectives).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, TIMEOUT, TINY, WORKER, check_ranks_done, free_port, logged_losses, torchrun, torchrun_env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from blockdiff.data.synthetic import write_splits

    d = tmp_path_factory.mktemp("pdata")
    return str(write_splits(d, 40, 8, seed=0)[0])


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Single-process loss and gradients of step 0 (in-process)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import dist_worker

    out = tmp_path_factory.mktemp("ref")
    return dist_worker.step_grads(["--data.train_path", data, "--train.output_dir", str(out / "run"), *TINY])


def assert_same_step(ref: dict, got: dict) -> None:
    assert set(ref) == set(got)
    torch.testing.assert_close(got["sums"], ref["sums"], rtol=1e-6, atol=0)
    torch.testing.assert_close(got["grad_norm"], ref["grad_norm"], rtol=1e-5, atol=0)
    for k in ref:
        if k.startswith("grad."):
            scale = float(ref[k].abs().max())
            diff = float((got[k] - ref[k]).abs().max())
            assert diff <= 1e-5 * scale + 1e-7, f"{k}: max|diff| {diff:.3g} vs max|g| {scale:.3g}"


@pytest.mark.dist
@pytest.mark.parametrize("nproc,ep,extra", [(2, 1, []), (2, 2, []), (4, 2, []),
                                            (4, 2, ["--parallel.reshard_after_forward", "false"])],
                         ids=["fsdp", "ep", "fsdp+ep", "fsdp+ep-no-reshard"])
def test_step_equals_single_process(data, reference, tmp_path, nproc, ep, extra):
    out = tmp_path / "grads.safetensors"
    torchrun(nproc, "grads", out, "--data.train_path", data, "--train.output_dir", str(tmp_path / "run"), *TINY,
             "--parallel.ep", str(ep), *extra)
    got = load_file(str(out))
    assert_same_step(reference, got)
    # FSDP parameter all-gathers per micro-batch: one per unit (2 layers, + their experts' units when
    # ep > 1 and an expert is sharded over more than one rank) per use, + the root's one. Resharding after forward: the encoder, both decoder passes and the
    # two backwards each gather. Without: the encoder's gather lasts through backward, except that the
    # no-grad decoder pass 1 reshards (FSDP2 does after a forward without grad), so pass 2 gathers again.
    units = 2 * (2 if 1 < ep < nproc else 1)
    per_unit = 2 if extra else 5
    assert int(got["gathers"]) == int(got["micro_batches"]) * (per_unit * units + 1)


# Packing + multi-turn (data.mask_history: false) under FSDP2 + EP: the 1-process reference packs the 8
# conversations of the global batch as ONE micro-batch; each of 2 processes (ep 2) packs its 4 as two
# micro-batches of 2. The rows differ, every conversation keeps its noise stream and the losses are
# normalised by the global token counts: same losses and gradients within assert_same_step's tolerances.
# ``ar_loss_reduction: example`` too: each conversation's AR mean, divided by the global conversation count.
PACKED = [*TINY, "--train.global_batch_size", "8", "--data.packing", "true", "--data.mask_history", "false",
          "--data.seq_length", "256"]


@pytest.fixture(scope="module")
def multiturn_data(tmp_path_factory):
    from blockdiff.data.synthetic import generate_multiturn

    path = tmp_path_factory.mktemp("mtdata") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in generate_multiturn(40, seed=0)))
    return str(path)


@pytest.mark.dist
@pytest.mark.parametrize("reduction", ["token", "example"])
def test_packed_multiturn_step_equals_single_process(multiturn_data, tmp_path, reduction):
    sys.path.insert(0, str(ROOT / "tests"))
    import dist_worker
    from blockdiff.config.schema import demo_config_path, load_config
    from blockdiff.data import load_tiny_tokenizer
    from blockdiff.data.canvas import SFTDataset
    from blockdiff.parallel.distributed import DistInfo
    from blockdiff.objective.loss import ObjectiveSettings
    from helpers import rank_micro_batches

    base = ["--data.train_path", multiturn_data, *PACKED, "--objective.ar_loss_reduction", reduction]
    # the layouts really differ and really pack (several turns, several conversations per row)
    ds = SFTDataset(multiturn_data, load_tiny_tokenizer(), canvas_length=32, seq_length=256, mask_history=False)
    rows = {}
    for mb, world in ((8, 1), (2, 2)):
        cfg = load_config(demo_config_path(), [*base, "--train.micro_batch_size", str(mb)])
        micro = rank_micro_batches(0, cfg, ds, DistInfo(0, world, 0, torch.device("cpu")), 1024, ObjectiveSettings())
        rows[mb] = [(b.input_ids.shape[0], len(b.sample_ids)) for b, _ in micro]
        assert any(r < n for r, n in rows[mb]) and any(b.segment_table().shape[1] > 1 for b, _ in micro)
    assert rows[8] != rows[2]

    ref = dist_worker.step_grads([*base, "--train.output_dir", str(tmp_path / "ref"), "--train.micro_batch_size", "8"])
    out = tmp_path / "grads.safetensors"
    torchrun(2, "grads", out, *base, "--train.output_dir", str(tmp_path / "run"), "--train.micro_batch_size", "2",
             "--parallel.ep", "2")
    assert_same_step(ref, load_file(str(out)))


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_gradients(data, reference, tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    import dist_worker

    got = dist_worker.step_grads(["--data.train_path", data, "--train.output_dir", str(tmp_path / "run"), *TINY,
                                  "--parallel.activation_checkpointing", "true"])
    assert_same_step(reference, got)


@pytest.mark.dist
@pytest.mark.parametrize("recompute", [False, True], ids=["keep-exchanges", "recompute-exchanges"])
def test_activation_checkpointing_with_expert_parallel(data, reference, tmp_path, recompute):
    """AC + ep 2: the same step as one process either way; by default the recomputed layers replay the
    forward's all-to-all results (no exchange in the recomputation), with ``recompute_expert_exchanges``
    they exchange again. Exchanges per MoE call: counts, dispatch, combine in forward; the reverse
    dispatch and combine in backward. Per micro-batch and layer: 3 passes forward (encoder, decoder
    passes 1 and 2), 2 backward (pass 1 has no grad), and 2 recomputed forwards when recomputing."""
    out = tmp_path / "grads.safetensors"
    torchrun(2, "grads", out, "--data.train_path", data, "--train.output_dir", str(tmp_path / "run"), *TINY,
             "--parallel.ep", "2", "--parallel.activation_checkpointing", "true",
             "--parallel.recompute_expert_exchanges", str(recompute).lower())
    got = load_file(str(out))
    assert_same_step(reference, got)
    per_layer = 3 * 3 + 2 * 2 + (2 * 3 if recompute else 0)
    assert int(got["exchanges"]) == int(got["micro_batches"]) * 2 * per_layer


def test_expert_dispatch_is_exact_without_a_process_group():
    """The hook point: a dispatcher that keeps everything local reproduces the local path exactly."""
    from blockdiff.model.moe import Experts

    class Local:
        def dispatch(self, rows, counts):
            return rows, counts, None

        def combine(self, h, ctx):
            return h

    cfg = type("C", (), dict(num_experts=4, hidden_size=8, moe_intermediate_size=6,
                             hidden_activation="gelu_pytorch_tanh"))()
    ex = Experts(cfg)
    torch.nn.init.normal_(ex.gate_up_proj), torch.nn.init.normal_(ex.down_proj)
    x = torch.randn(5, 8)
    idx = torch.randint(4, (5, 2))
    w = torch.rand(5, 2)
    a = ex(x, w, idx)
    ex.dispatcher = Local()
    assert torch.equal(ex(x, w, idx), a)


def test_dense_work_is_queued_between_count_exchange_and_row_exchange():
    """Experts.forward(meanwhile=...): the dispatcher's count exchange starts first, the callable (the
    layer's dense MLP) runs next, and only then does the dispatch read the counts (with the ticket); the
    output is the plain local result."""
    from blockdiff.model.moe import Experts

    calls = []

    class Recording:
        def announce(self, counts):
            calls.append("announce")
            return ("ticket", counts.clone())

        def dispatch(self, rows, counts, ticket):
            calls.append("dispatch")
            assert ticket[0] == "ticket" and torch.equal(ticket[1], counts)
            return rows, counts, None

        def combine(self, h, ctx):
            calls.append("combine")
            return h

    cfg = type("C", (), dict(num_experts=4, hidden_size=8, moe_intermediate_size=6,
                             hidden_activation="gelu_pytorch_tanh"))()
    ex = Experts(cfg)
    torch.nn.init.normal_(ex.gate_up_proj), torch.nn.init.normal_(ex.down_proj)
    x, idx, w = torch.randn(5, 8), torch.randint(4, (5, 2)), torch.rand(5, 2)
    plain = ex(x, w, idx)
    ex.dispatcher = Recording()
    out, extra = ex(x, w, idx, meanwhile=lambda: calls.append("dense") or "dense-result")
    assert calls == ["announce", "dense", "dispatch", "combine"] and extra == "dense-result"
    assert torch.equal(out, plain)


def test_permutation_is_a_gather_both_ways():
    """The dispatcher's regrouping by local expert: values as plain indexing, gradient the inverse gather."""
    from blockdiff.parallel.experts import _Permute

    order = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    inverse = torch.argsort(order)
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.equal(_Permute.apply(x, order, inverse), x.detach()[order])
    assert torch.equal(_Permute.apply(_Permute.apply(x, order, inverse), inverse, order), x.detach())
    assert torch.autograd.gradcheck(lambda a: _Permute.apply(a, order, inverse), (x,))


@pytest.mark.dist
def test_save_on_4_ranks_resume_on_2(data, tmp_path):
    from blockdiff.config.schema import demo_config_path, load_config
    from blockdiff.train.loop import train

    base = ["--data.train_path", data, *TINY, "--checkpoint.every_steps", "2"]
    ref_dir = train(load_config(demo_config_path(), [*base, "--train.output_dir", str(tmp_path / "ref"),
                                                     "--train.max_steps", "4"]))
    run = tmp_path / "run"
    torchrun(4, "train", tmp_path / "a", *base, "--train.output_dir", str(run), "--train.max_steps", "2",
             "--parallel.ep", "4")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    meta = json.loads((run / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["world_size"] == 4 and meta["format"].endswith("dcp-v1")
    torchrun(2, "train", tmp_path / "b", *base, "--train.output_dir", str(run), "--train.max_steps", "4",
             "--parallel.ep", "2", "--checkpoint.export_final", "true")
    ref, got = logged_losses(ref_dir), logged_losses(run)
    assert sorted(got) == [1, 2, 3, 4]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-4), (s, got[s], ref[s])
    # the HF export of the sharded run loads back and equals the gathered weights of the final checkpoint
    from blockdiff.model.hf import io as hf_io

    exported = hf_io.load_pretrained(str(run / "export"), dtype=torch.float32)
    single = load_file(str(ref_dir / "checkpoints" / "step_00000004" / "model.safetensors"))
    sd = exported.state_dict()
    for k, v in single.items():
        torch.testing.assert_close(sd[k], v, rtol=1e-3, atol=1e-4)


@pytest.mark.dist
def test_two_nodes_on_loopback(data, tmp_path):
    port = free_port()
    out = tmp_path / "nodes"
    args = [WORKER, "train", str(out), "--data.train_path", data, "--train.output_dir", str(tmp_path / "run"),
            *TINY, "--train.max_steps", "2", "--parallel.ep", "2"]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={r}",
                               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=blockdiff-test", *args], cwd=ROOT, env=torchrun_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = ""
    try:
        for p in procs:
            logs += p.communicate(timeout=TIMEOUT)[0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    check_ranks_done(out, 2, logs)
    assert sorted(logged_losses(tmp_path / "run")) == [1, 2]


def test_impossible_layouts_are_refused(data, tmp_path):
    from blockdiff.config.schema import demo_config_path, load_config
    from blockdiff.parallel.distributed import DistInfo
    from blockdiff.errors import ConfigError
    from blockdiff.parallel.parallelize import parallelize
    from blockdiff.train.loading import build_model

    cfg = load_config(demo_config_path(), ["--data.train_path", data, "--train.output_dir", str(tmp_path),
                                           "--model.num_layers", "1", "--parallel.ep", "3"])
    model = build_model(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="does not divide the model's 8 experts"):
        parallelize(model, cfg, DistInfo(0, 3, 0, torch.device("cpu")))


@pytest.mark.dist
@pytest.mark.parametrize("routing", ["model", "balanced"])
def test_scaling_benchmark_smoke_reports_expert_load(tmp_path, routing):
    """benchmarks/scaling.py throughput (the device benchmark) on 2 CPU processes with its expert-load record."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "benchmarks" / "scaling.py"), "throughput", "--tiny", "--ep", "2", "--steps", "3",
           "--warmup", "1", "--expert-load", "--routing", routing, "--workdir", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, env=torchrun_env(), capture_output=True, text=True, timeout=TIMEOUT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith('{"world_size"')]
    assert lines, p.stdout[-3000:] + p.stderr[-3000:]
    got = json.loads(lines[0])
    assert got["world_size"] == 2 and got["ep"] == 2 and len(got["losses"]) == 3
    assert all(torch.isfinite(torch.tensor(got["losses"])))
    load = got["expert_load"]
    # every MoE call of 3 steps x 2 layers, forward and recomputation: encoder, decoder pass 1 and 2
    assert load["calls"] >= 3 * 2 * 3 and load["rows_per_call_mean"] > 0
    assert 1.0 <= load["max_over_mean_median"] <= load["max_over_mean_worst"] <= 2.0  # 2 ranks: max/mean <= 2
    assert got["routing"] == routing
    if routing == "balanced":  # uniformly random experts: ~180 rows per call split close to evenly
        assert load["max_over_mean_median"] < 1.25
