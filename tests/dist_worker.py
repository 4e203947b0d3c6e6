"""Launched by tests/test_parallel.py under torchrun (or called in-process for the 1-rank reference).

    python tests/dist_worker.py grads  OUT_FILE  [--section.field value ...]
    python tests/dist_worker.py train  DONE_FILE [--section.field value ...]
    python tests/dist_worker.py script DONE_FILE SCRIPT.py [its arguments ...]
    python tests/dist_worker.py evals  OUT_FILE SPEC.json [--section.field value ...]

``grads``: one training step's forward/backward on the global batch (no optimizer step); rank 0 writes
the summed losses, the global grad norm, every FULL gradient (gathered, experts in their global
layout), its number of ``all_to_all_single`` calls and FSDP all-gathers in the step and
of micro-batches to OUT_FILE (safetensors). ``train``: ``blockdiff.train.train`` on the config. ``script``: runs
SCRIPT.py as ``__main__`` (e.g. ``examples/dllm_sft/finetune.py -c ...``); a non-zero ``sys.exit`` leaves
no ``.done`` file. ``evals``: ``periodic_evals`` (below); rank 0 writes its JSON result to OUT_FILE.

With ``--lora.enabled true`` (and optionally ``--lora.experts true``) ``grads`` applies LoRA as training
does, then sets every ``lora_B`` (and expert ``*_B``) to seeded random values: with the zero init of B
the gradient of every A would be exactly zero and the comparison would prove nothing. The output then
also holds ``frozen_with_grad``: the number of frozen parameters that received a gradient (must be 0).

Either way each rank writes ``<file>.rank<R>.done`` after a clean finish and leaves with os._exit(0), so
a gloo teardown abort cannot turn a good run into a failure (the test checks the files).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def step_grads(overrides: list[str]) -> dict[str, torch.Tensor] | None:
    from blockdiff.config import apply_world_size, demo_config_path, load_config
    from blockdiff.data.canvas import SFTDataset
    from blockdiff.distributed import all_reduce_, init_distributed
    from blockdiff.objective import ObjectiveSettings, compute_loss, freeze_router
    from blockdiff.parallel import clip_grad_norm_, gather_grads, parallelize
    from blockdiff.train import build_model, global_token_counts, load_tokenizer, rank_micro_batches

    cfg = load_config(demo_config_path(), overrides)
    dist = init_distributed()
    apply_world_size(cfg, dist.world_size)
    torch.manual_seed(cfg.train.seed)
    tok = load_tokenizer(cfg)
    model = build_model(cfg, dist.device)
    ds = SFTDataset(cfg.data.train_path, tok, canvas_length=cfg.data.canvas_length, seq_length=cfg.data.seq_length,
                    prompt_policy=cfg.data.prompt_too_long, split=cfg.data.split, eos_id=model.config.eos_token_id,
                    mask_history=cfg.data.mask_history)
    if cfg.lora.enabled:
        from blockdiff.lora import apply_lora

        apply_lora(model, cfg.lora)
        from helpers import randomize_lora_b

        randomize_lora_b(model, cfg.train.seed + 1, std=0.05)  # identical on every rank
    if cfg.objective.freeze_router:
        freeze_router(model)
    model = parallelize(model, cfg, dist)
    settings = ObjectiveSettings.from_config(cfg.objective)
    micro = rank_micro_batches(0, cfg, ds, dist, model.config.vocab_size, settings)
    n_diff, n_ar = global_token_counts(micro, settings, dist)
    sums = torch.zeros(3, dtype=torch.float64, device=dist.device)
    # collectives of this rank in the step: all_to_all_single (expert-parallel exchanges) and
    # all_gather_into_tensor / all_gather_single (FSDP parameter gathers; the name depends on the torch version)
    calls = {"all_to_all_single": 0, "all_gather_into_tensor": 0, "all_gather_single": 0}
    originals = {name: getattr(torch.distributed, name) for name in calls if hasattr(torch.distributed, name)}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in originals:
        setattr(torch.distributed, name, counting(name))
    try:
        for batch, noise in micro:
            out = compute_loss(model, batch, noise, settings, n_diff, n_ar)
            out["loss"].backward()
            sums += torch.stack([out["loss"].detach(), out["diffusion_loss"], out["ar_loss"]]).double()
    finally:
        for name, fn in originals.items():
            setattr(torch.distributed, name, fn)
    all_reduce_(sums, dist)
    params = [p for p in model.parameters() if p.requires_grad]
    if dist.world_size > 1 and not hasattr(model, "_blockdiff_parallel"):
        for p in params:
            all_reduce_(p.grad, dist)
    norm = clip_grad_norm_(params, float("inf"))
    frozen_with_grad = torch.tensor([float(sum(p.grad is not None for p in model.parameters() if not p.requires_grad))],
                                    device=dist.device)  # NCCL reduces device tensors only
    all_reduce_(frozen_with_grad, dist)
    frozen_with_grad = frozen_with_grad.cpu()
    grads = gather_grads(model, dist)
    if dist.rank != 0:
        return None
    extra = {"frozen_with_grad": frozen_with_grad} if cfg.lora.enabled else {}
    return {"sums": sums.cpu(), "grad_norm": norm.detach().reshape(1).double().cpu(), **extra,
            "exchanges": torch.tensor([calls["all_to_all_single"]]),
            "gathers": torch.tensor([calls["all_gather_into_tensor"] + calls["all_gather_single"]]), "micro_batches": torch.tensor([len(micro)]),
            **{f"grad.{k}": v for k, v in grads.items()}}


def periodic_evals(overrides: list[str], spec: dict) -> dict | None:
    """The run's periodic evaluation on a freshly built (sharded) model: ``PeriodicEval.maybe_run`` at steps 2
    and 4 with unchanged weights (the global RNG reseeded in between), then ``generate_across_ranks`` for each
    of ``spec["cases"]`` ({prompts, seeds, settings}), counting each rank's expert-parallel exchanges and FSDP
    all-gathers. With ``spec["train"]`` it then trains the config for 2 steps with evaluation every step.
    Returns (rank 0) {"evals", "outputs", "collectives": per case, per rank}."""
    from blockdiff.config import apply_world_size, demo_config_path, load_config
    from blockdiff.data.canvas import SFTDataset
    from blockdiff.distributed import init_distributed
    from blockdiff.objective import freeze_router
    from blockdiff.parallel import parallelize
    from blockdiff.periodic_eval import PeriodicEval, generate_across_ranks, split_held_out
    from blockdiff.sampling import SamplerSettings
    from blockdiff.train import build_model, load_tokenizer, train

    cfg = load_config(demo_config_path(), overrides)
    dist = init_distributed()
    apply_world_size(cfg, dist.world_size)
    torch.manual_seed(cfg.train.seed)
    tok = load_tokenizer(cfg)
    model = build_model(cfg, dist.device)
    ds = SFTDataset(cfg.data.train_path, tok, canvas_length=cfg.data.canvas_length, seq_length=cfg.data.seq_length,
                    eos_id=model.config.eos_token_id)
    freeze_router(model)
    model = parallelize(model, cfg, dist)
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
    names = ("all_to_all_single", "all_gather_into_tensor", "all_gather_single")
    originals = {n: getattr(torch.distributed, n) for n in names if hasattr(torch.distributed, n)}
    for case in spec.get("cases", []):
        calls = dict.fromkeys(originals, 0)

        def counting(name):
            def call(*args, **kwargs):
                calls[name] += 1
                return originals[name](*args, **kwargs)
            return call

        for n in originals:
            setattr(torch.distributed, n, counting(n))
        try:
            outputs.append(generate_across_ranks(model, case["prompts"], SamplerSettings(**case["settings"]),
                                                 row_seeds=case["seeds"], dist=dist))
        finally:
            for n, fn in originals.items():
                setattr(torch.distributed, n, fn)
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
    elif mode == "train":
        from blockdiff.config import demo_config_path, load_config
        from blockdiff.train import train

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
