"""Launched by tests/test_parallel.py under torchrun (or called in-process for the 1-rank reference).

    python tests/dist_worker.py grads  OUT_FILE  [--section.field value ...]
    python tests/dist_worker.py train  DONE_FILE [--section.field value ...]
    python tests/dist_worker.py script DONE_FILE SCRIPT.py [its arguments ...]
    python tests/dist_worker.py export OUT_DIR SOURCE_CHECKPOINT
    python tests/dist_worker.py state  OUT_FILE  [--section.field value ...]
    python tests/dist_worker.py load   OUT_PREFIX LAYOUTS_JSON
    python tests/dist_worker.py evals  OUT_FILE SPEC.json [--section.field value ...]

``grads``: one training step's forward/backward on the global batch (no optimizer step); rank 0 writes
the summed losses, the global grad norm, every FULL gradient (gathered, experts in their global
layout), its number of ``all_to_all_single`` calls and FSDP all-gathers in the step and
of micro-batches to OUT_FILE (safetensors). ``train``: ``blockdiff.train.loop.train`` on the config. ``script``: runs
SCRIPT.py as ``__main__`` (e.g. ``examples/dllm_sft/finetune.py -c ...``); a non-zero ``sys.exit`` leaves
no ``.done`` file. ``export``: loads SOURCE_CHECKPOINT, parallelizes it (ep = world size) and writes the
transformers export of each ``EXPORT_CASES`` model to OUT_DIR/<case> with ``EXPORT_SHARD``-byte shards;
rank 0 writes the writer's stats to OUT_DIR/stats.json (``export_models``; called in-process for the
1-process reference); on several ranks it then checks that a failure on rank 0 is raised on every rank
(``export_failures``). ``evals``: ``periodic_evals`` (below); rank 0 writes its JSON result to OUT_FILE.

With ``--lora.enabled true`` (and optionally ``--lora.experts true``) ``grads`` applies LoRA as training
does, then sets every ``lora_B`` (and expert ``*_B``) to seeded random values: with the zero init of B
the gradient of every A would be exactly zero and the comparison would prove nothing. The output then
also holds ``frozen_with_grad``: the number of frozen parameters that received a gradient (must be 0).

``state``: one full training step (forward/backward, clipping, fused AdamW step) of the model as
training builds it; each rank writes ``OUT_FILE.rank<R>.json`` with what it holds: local parameter
elements and shapes, and the bytes of the distinct storages behind its parameters, gradients and AdamW
states (the memory plan's exact figures are tested against these).
``load``: for each layout of LAYOUTS_JSON (a list of override lists, e.g. ``[["--parallel.ep", "2"]]``, on top
of a config whose ``model.name_or_path`` is a checkpoint) ``loading.build_training_model`` under
``LiveBytes``; rank 0 writes every FULL tensor (gathered) to ``OUT_PREFIX.<i>.safetensors``, every rank its
load figures to ``OUT_PREFIX.<i>.rank<R>.json``.

Either way each rank writes ``<file>.rank<R>.done`` after a clean finish and leaves with os._exit(0), so
a gloo teardown abort cannot turn a good run into a failure (the test checks the files).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


COLLECTIVES = ("all_to_all_single", "all_gather_into_tensor", "all_gather_single")


@contextlib.contextmanager
def counting_collectives():
    """Counts this rank's calls of ``COLLECTIVES`` (expert-parallel exchanges; FSDP parameter gathers, whose
    name depends on the torch version) inside the context; yields the {name: count} dict."""
    calls = dict.fromkeys(COLLECTIVES, 0)
    originals = {name: getattr(torch.distributed, name) for name in COLLECTIVES if hasattr(torch.distributed, name)}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in originals:
        setattr(torch.distributed, name, counting(name))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(torch.distributed, name, fn)


def _step_model(cfg, dist, randomize_lora: bool):
    """The demo config's tokenizer, training set and model as training builds them, before loading: the
    model built in fp32 on this rank, LoRA applied (with seeded B: the zero init of B would make every A's
    gradient exactly zero and the comparison prove nothing), router frozen, parallelized."""
    from blockdiff.data.canvas import SFTDataset
    from blockdiff.lora import apply_lora
    from blockdiff.objective.loss import freeze_router
    from blockdiff.parallel.parallelize import parallelize
    from blockdiff.train.loading import build_model
    from blockdiff.train.setup import load_tokenizer
    from helpers import randomize_lora_b

    torch.manual_seed(cfg.train.seed)
    tok = load_tokenizer(cfg)
    model = build_model(cfg, dist.device)
    ds = SFTDataset.from_config(cfg.data, tok, model.config.eos_token_id)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora)  # CPU: the frozen base stays fp32, as training keeps it
        if randomize_lora:
            randomize_lora_b(model, cfg.train.seed + 1, std=0.05)  # identical on every rank
    if cfg.objective.freeze_router:
        freeze_router(model)
    return parallelize(model, cfg, dist), ds


def step_grads(overrides: list[str]) -> dict[str, torch.Tensor] | None:
    from blockdiff.config.schema import apply_world_size, demo_config_path, load_config
    from blockdiff.objective.loss import ObjectiveSettings
    from blockdiff.parallel.distributed import all_reduce_, init_distributed
    from blockdiff.train.step import host_micro_batches, train_step
    from helpers import gather_grads

    cfg = load_config(demo_config_path(), overrides)
    dist = init_distributed()
    apply_world_size(cfg, dist.world_size)
    model, ds = _step_model(cfg, dist, randomize_lora=True)
    settings = ObjectiveSettings.from_config(cfg.objective)
    micro = host_micro_batches(0, cfg, ds, dist, model.config.vocab_size, settings)
    params = [p for p in model.parameters() if p.requires_grad]
    with counting_collectives() as calls:  # this rank's collectives in the step
        # the training step without its update: the gradients stay in p.grad
        outcome = train_step(model, None, params, micro, settings, dist, dtype_name=cfg.model.dtype,
                             grad_clip=cfg.optimizer.grad_clip, first=True)
    frozen_with_grad = torch.tensor([float(sum(p.grad is not None for p in model.parameters() if not p.requires_grad))],
                                    device=dist.device)  # NCCL reduces device tensors only
    all_reduce_(frozen_with_grad, dist)
    frozen_with_grad = frozen_with_grad.cpu()
    grads = gather_grads(model, dist)
    if dist.rank != 0:
        return None
    extra = {"frozen_with_grad": frozen_with_grad} if cfg.lora.enabled else {}
    return {"sums": outcome.sums.cpu(), "grad_norm": outcome.grad_norm.detach().reshape(1).double().cpu(), **extra,
            "exchanges": torch.tensor([calls["all_to_all_single"]]),
            "gathers": torch.tensor([calls["all_gather_into_tensor"] + calls["all_gather_single"]]), "micro_batches": torch.tensor([len(micro)]),
            **{f"grad.{k}": v for k, v in grads.items()}}


EXPORT_SHARD = 48 * 1024  # small: the tiny checkpoint spans many shards
LORA = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]}
EXPORT_CASES = {"full": None, "lora": LORA, "lora_experts": {**LORA, "experts": True}}


def export_case_model(source: str, case: str, cfg, dist):
    """The model of an export case: the source checkpoint (fp32 masters), LoRA with seeded A and B."""
    from blockdiff.lora import apply_lora
    from blockdiff.model.hf import io as hf_io
    from blockdiff.parallel.parallelize import parallelize

    model = hf_io.load_pretrained(source, dtype=torch.float32, attn_backend="sdpa")
    if EXPORT_CASES[case] is not None:
        from helpers import randomize_lora_b

        torch.manual_seed(0)  # the A init
        apply_lora(model, EXPORT_CASES[case])
        randomize_lora_b(model, 1, std=0.05)
    return parallelize(model, cfg, dist)


def export_models(out: Path, source: str) -> None:
    import json

    from blockdiff.config.schema import apply_world_size, demo_config_path, load_config
    from blockdiff.parallel.distributed import init_distributed
    from blockdiff.checkpoint.live_export import export_model

    dist = init_distributed()
    cfg = load_config(demo_config_path(), ["--train.output_dir", str(out), "--data.train_path", "unused",
                                           "--train.micro_batch_size", "1", "--parallel.ep", str(dist.world_size)])
    apply_world_size(cfg, dist.world_size)
    stats = {}
    for case, lora in EXPORT_CASES.items():
        model = export_case_model(source, case, cfg, dist)
        stats[case] = export_model(model, out / case, dist, max_shard_size=EXPORT_SHARD, lora_cfg=lora)
    if dist.rank == 0:
        (out / "stats.json").write_text(json.dumps(stats))
    if dist.world_size > 1:
        export_failures(out, model, dist)


def export_failures(out: Path, model, dist) -> None:
    """Every rank must raise (not hang) when rank 0 cannot write: a refused path, then a full disk on
    rank 0's second shard. Each rank writes what it raised to OUT_DIR/failure.<kind>.rank<R>."""
    from blockdiff.errors import CheckpointError
    from blockdiff.model.hf import save as hf_save
    from blockdiff.checkpoint.live_export import export_model

    if dist.rank == 0:
        (out / "a-file").write_text("keep")
        real, calls = hf_save.save_file, []

        def disk_full_on_second_shard(tensors, path, metadata=None):
            calls.append(path)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
            real(tensors, path, metadata=metadata)

    torch.distributed.barrier()
    for kind, target in (("refused", out / "a-file"), ("disk_full", out / "full")):
        if kind == "disk_full" and dist.rank == 0:
            hf_save.save_file = disk_full_on_second_shard
        try:
            export_model(model, target, dist, max_shard_size=EXPORT_SHARD, lora_cfg=EXPORT_CASES["lora_experts"])
            raised = "nothing"
        except CheckpointError as e:
            raised = str(e)
        (out / f"failure.{kind}.rank{dist.rank}").write_text(raised)
    if dist.rank == 0:
        hf_save.save_file = real
def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (DTensors: their local shards)."""
    from torch.distributed.tensor import DTensor

    seen = {}
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        seen[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(seen.values())


def step_state(overrides: list[str]) -> dict:
    from torch.distributed.tensor import DTensor

    from blockdiff.config.schema import apply_world_size, demo_config_path, load_config
    from blockdiff.objective.loss import ObjectiveSettings
    from blockdiff.parallel.distributed import init_distributed
    from blockdiff.train.master_adamw import build_optimizer
    from blockdiff.train.step import host_micro_batches, train_step

    cfg = load_config(demo_config_path(), overrides)
    dist = init_distributed()
    apply_world_size(cfg, dist.world_size)
    model, ds = _step_model(cfg, dist, randomize_lora=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, params, cfg.optimizer, dist.device, cfg.model.dtype)  # as training does
    settings = ObjectiveSettings.from_config(cfg.objective)
    micro = host_micro_batches(0, cfg, ds, dist, model.config.vocab_size, settings)
    # the step's update frees the grads (zero_grad): their bytes are read inside it, right before the update
    grad_bytes = {}
    real_step = optimizer.step

    def step_recording_grads(*args, **kwargs):
        grad_bytes["grads"] = _storage_bytes(p.grad for p in model.parameters() if p.grad is not None)
        grad_bytes["frozen_with_grad"] = sum(p.grad is not None for p in model.parameters() if not p.requires_grad)
        return real_step(*args, **kwargs)

    optimizer.step = step_recording_grads
    train_step(model, optimizer, params, micro, settings, dist, dtype_name=cfg.model.dtype,
               grad_clip=cfg.optimizer.grad_clip, first=True)
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    named = dict(model.named_parameters())
    return {
        "params": sum(local(p).numel() for p in named.values()),
        "shapes": {n: list(local(p).shape) for n, p in named.items()},
        "weights": _storage_bytes(named.values()),
        "grads": grad_bytes["grads"],
        "optimizer": _storage_bytes(v for s in optimizer.state.values() for v in s.values()
                                    if isinstance(v, torch.Tensor)),
        "frozen_with_grad": grad_bytes["frozen_with_grad"],
    }


class LiveBytes(TorchDispatchMode):
    """Peak bytes alive during a model build: storages created by torch ops (allocations; views and in-place
    ops create none) that are not yet freed, plus the checkpoint rows ``Checkpoint.read`` returned that are
    still referenced. safetensors returns a view of the memory-mapped file (``set_`` onto a storage made
    outside torch's ops, not an allocation) whose only resident pages are the rows read: those count as the
    rows' bytes."""

    def __init__(self):
        super().__init__()
        self.alive: dict[int, tuple] = {}
        self.reads, self.peak, self.read_total = 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        def storages(tree):
            for t in tree_flatten(tree)[0]:
                if isinstance(t, torch.Tensor) and not t.is_meta:
                    yield (t._local_tensor if isinstance(t, DTensor) else t).untyped_storage()

        inputs = {s.data_ptr() for s in storages((args, kwargs))}
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.set_:  # points a tensor at an existing storage
            return out
        for s in storages(out):
            if s.data_ptr() and s.data_ptr() not in inputs and s.data_ptr() not in self.alive:
                self.alive[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        self.sample()
        return out

    def sample(self) -> None:
        self.alive = {k: v for k, v in self.alive.items() if not v[0].expired()}
        self.peak = max(self.peak, self.reads + sum(n for _, n in self.alive.values()))

    def read_hook(self, read):
        import weakref

        def counted(ckpt, *args, **kwargs):
            t = read(ckpt, *args, **kwargs)
            n = t.numel() * t.element_size()
            self.reads += n
            self.read_total += n
            weakref.finalize(t, self._release, n)
            self.sample()
            return t
        return counted

    def _release(self, n: int) -> None:
        self.reads -= n


def load_layouts(out: str, layouts: list[list[str]]) -> None:
    import json

    from safetensors.torch import save_file

    from blockdiff.config.schema import demo_config_path, load_config
    from blockdiff.parallel.distributed import init_distributed
    from blockdiff.train.loading import build_training_model
    from blockdiff.model.hf.load import Checkpoint
    from blockdiff.parallel.parallelize import full_tensor

    dist = init_distributed()
    for i, overrides in enumerate(layouts):
        cfg = load_config(demo_config_path(), overrides)
        cfg.model.from_config = None
        torch.manual_seed(cfg.train.seed)
        mem, read = LiveBytes(), Checkpoint.read
        Checkpoint.read = mem.read_hook(read)
        try:
            with mem:
                model = build_training_model(cfg, dist)
        finally:
            Checkpoint.read = read
        storages = {}  # this rank's parameter and buffer storage (FSDP2's padded shards)
        for t in [*model.parameters(), *model.buffers()]:
            local = t.to_local() if hasattr(t, "to_local") else t
            storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
        logged = getattr(model, "_blockdiff_load", None)
        full = {n: full_tensor(model, n, t).detach().contiguous() for n, t in model.state_dict().items()}
        if dist.rank == 0:
            trainable = {n: torch.tensor([float(p.requires_grad)]) for n, p in model.named_parameters()}
            save_file({**full, **{f"requires_grad.{n}": v for n, v in trainable.items()}}, f"{out}.{i}.safetensors")
        figures = {"peak": mem.peak, "resident": sum(storages.values()), "read": mem.read_total,
                   "logged": None if logged is None else vars(logged)}
        Path(f"{out}.{i}.rank{dist.rank}.json").write_text(json.dumps(figures))
        del model, full


def periodic_evals(overrides: list[str], spec: dict) -> dict | None:
    """The run's periodic evaluation on a freshly built (sharded) model: ``PeriodicEval.maybe_run`` at steps 2
    and 4 with unchanged weights (the global RNG reseeded in between), then ``generate_across_ranks`` for each
    of ``spec["cases"]`` ({prompts, seeds, settings}), counting each rank's expert-parallel exchanges and FSDP
    all-gathers. With ``spec["train"]`` it then trains the config for 2 steps with evaluation every step.
    Returns (rank 0) {"evals", "outputs", "collectives": per case, per rank}."""
    from blockdiff.config.schema import apply_world_size, demo_config_path, load_config
    from blockdiff.parallel.distributed import init_distributed
    from blockdiff.train.periodic_eval import PeriodicEval, generate_across_ranks, split_held_out
    from blockdiff.infer.settings import SamplerSettings
    from blockdiff.train.setup import load_tokenizer
    from blockdiff.train.loop import train

    cfg = load_config(demo_config_path(), overrides)
    dist = init_distributed()
    apply_world_size(cfg, dist.world_size)
    model, ds = _step_model(cfg, dist, randomize_lora=False)
    tok = load_tokenizer(cfg)
    _, held = split_held_out(cfg, ds, tok, model.config.eos_token_id)
    evals = PeriodicEval(cfg, model, tok, dist, held)

    class Recorder:
        def __init__(self):
            self.rows = []

        def log(self, step, row):
            self.rows.append({"step": step, **row})

    rec = Recorder()
    if spec.get("evals", True):
        evals.maybe_run(2, rec)
        torch.manual_seed(1234)  # the fixed noise must not read the global generator
        evals.maybe_run(4, rec)
    outputs, collectives = [], []
    for case in spec.get("cases", []):
        with counting_collectives() as calls:
            outputs.append(generate_across_ranks(model, case["prompts"], SamplerSettings(**case["settings"]),
                                                 row_seeds=case["seeds"], dist=dist))
        per_rank = [calls]
        if dist.world_size > 1:
            per_rank = [None] * dist.world_size
            torch.distributed.all_gather_object(per_rank, calls)
        collectives.append(per_rank)
    if spec.get("train"):
        train(load_config(demo_config_path(), [*overrides, "--train.max_steps", "2", "--eval.loss_every", "1",
                                               "--eval.accuracy_every", "2", "--checkpoint.every_steps", "1"]))
    return {"evals": rec.rows, "outputs": outputs, "collectives": collectives} if dist.rank == 0 else None


def main(argv: list[str]) -> None:
    mode, out, overrides = argv[0], Path(argv[1]), argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    if mode == "grads":
        result = step_grads(overrides)
        if result is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in result.items()}, str(out))
    elif mode == "state":
        import json

        Path(f"{out}.rank{rank}.json").write_text(json.dumps(step_state(overrides)))
    elif mode == "train":
        from blockdiff.config.schema import demo_config_path, load_config
        from blockdiff.train.loop import train

        train(load_config(demo_config_path(), overrides))
    elif mode == "evals":
        import json

        result = periodic_evals(overrides[1:], json.loads(Path(overrides[0]).read_text()))
        if result is not None:
            out.write_text(json.dumps(result))
    elif mode == "script":  # run a script file as __main__ with the rest as its argv (the example entry points)
        import runpy

        sys.argv = [overrides[0], *overrides[1:]]
        try:
            runpy.run_path(overrides[0], run_name="__main__")
        except SystemExit as e:
            if e.code not in (0, None):
                raise  # no .done file: the test reports the failure
    elif mode == "export":
        export_models(out, overrides[0])
    elif mode == "load":
        import json

        load_layouts(str(out), json.loads(overrides[0]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    Path(f"{out}.rank{rank}.done").write_text("ok\n")


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
