"""``blockdiff plan`` (the command line and its table) and the memory check ``train`` runs before loading.

    blockdiff plan -c CONFIG [--gpus N] [--gpu-memory GIB] [--json] [--section.field VALUE ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import subprocess
import sys

import torch
import torch.distributed as tdist

from blockdiff.config.schema import Config, apply_world_size, config_from_dict, load_config
from blockdiff.errors import BlockdiffError, ConfigError
from blockdiff.plan.estimate import Plan, make_plan
from blockdiff.plan.memory_model import GIB

log = logging.getLogger("blockdiff")
DEFAULT_GPU_MEMORY_GIB = 80.0


def default_gpus(cfg: Config) -> int:
    """The world size the config expects: ``parallel.dp`` when set, else one rank per expert group."""
    return cfg.parallel.dp if cfg.parallel.dp != -1 else max(cfg.parallel.ep, 1)


def _gib(b: int) -> str:
    return f"{b / GIB:8.2f}"


def render(plan: Plan, source: str) -> str:
    """The plan as a table: one line per figure, GiB, marked exact (read from the parallelized model) or
    estimate (the analytic model)."""
    s, st = plan.shape, plan.state
    trainable = "LoRA adapters" if plan.lora else "all trained parameters"
    experts = f", {st.shapes[next(n for n in st.shapes if n.endswith('experts.down_proj'))][0]} local experts" \
        if any(n.endswith("experts.down_proj") for n in st.shapes) else ""
    dtypes = " + ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(st.weights_by_dtype.items(), key=lambda kv: -kv[1]))
    act = sum(plan.activations.values())
    ac_on, ac_off = (act, plan.activations_other) if plan.checkpointing else (plan.activations_other, act)
    rows = [
        ("parameters held", f"{st.params:,}".rjust(16), "exact",
         f"text model {plan.total_params:,}{' + adapters' if plan.lora else ''}{experts}"),
        ("weights", _gib(st.weights), "exact", dtypes),
        ("gradients", _gib(st.grads), "exact", f"fp32, {trainable}"),
        ("optimizer states", _gib(st.optimizer), "exact", "AdamW exp_avg + exp_avg_sq (fp32) + step"),
        ("largest gathered unit", _gib(plan.gathered_unit[1]), "exact",
         f"{plan.gathered_unit[0]} all-gathered in {plan.compute_dtype}" if plan.gpus > 1 else "one process: none"),
        *([("frozen reference copy", _gib(plan.reference), "exact", "rl.kl_beta > 0: the starting weights")]
          if plan.reference else []),
        ("FSDP buffers in a step", _gib(sum(plan.fsdp_buffers.values())), "estimate",
         "gathered units, unsharded grads, reduce-scatter input"),
        ("activations", _gib(act), "estimate",
         f"checkpointing {'on' if plan.checkpointing else 'off'} (on {ac_on / GIB:.2f}, off {ac_off / GIB:.2f})"),
        ("cross-entropy chunk", _gib(plan.ce_chunk), "estimate", f"{s.ce_chunk} rows x vocabulary"),
        ("runtime + allocator", _gib(plan.overhead), "estimate", "CUDA context, communicators, fragmentation"),
        ("peak at load", _gib(plan.peak_load), "estimate", "local shards + one checkpoint tensor in flight"),
        ("peak during a step", _gib(plan.peak_step), "estimate", "state + activations + buffers + overhead"),
    ]
    head = [
        f"memory plan: {source}",
        f"  layout: {plan.gpus} GPU{'s' if plan.gpus > 1 else ''}, ep {plan.ep}, "
        f"{'LoRA' if plan.lora else 'full SFT'}, {plan.compute_dtype} compute",
        f"  micro-batch: {s.micro_batch} x ({s.seq} clean + {s.canvas} canvas tokens)"
        + (f", blockdiff rl: {s.micro_batch // plan.rl_draws} completions x {plan.rl_draws} ELBO draws"
           if plan.rl_draws else ""),
        f"  per GPU (rank {st.rank}, the largest state){'':18}GiB",
    ]
    body = [f"  {name:<24}{value:>16}  {kind:<8}  {note}" for name, value, kind, note in rows]
    verdict = (f"  fits {plan.gpu_memory / GIB:.1f} GiB: {'yes' if plan.fits else 'NO'}, "
               f"headroom {plan.headroom / GIB:.2f} GiB")
    return "\n".join(head + body + [verdict])


def summary(j: dict) -> str:
    """A plan (``Plan.as_json()``) in one line: logs and error messages."""
    return (f"{j['gpus']} GPU(s) of {j['gpu_memory_gib']:.1f} GiB: weights {j['weights_gib']:.2f} + grads "
            f"{j['grads_gib']:.2f} + optimizer {j['optimizer_gib']:.2f} GiB (exact), activations "
            f"~{j['activations_gib']:.2f}, FSDP buffers ~{j['fsdp_buffers_gib']:.2f}, peak at load "
            f"~{j['peak_load_gib']:.2f}, peak in a step ~{j['peak_step_gib']:.2f} GiB (estimates), "
            f"headroom {j['headroom_gib']:.2f} GiB")


# ---------------------------------------------------------------------------------------- command line


def _number(kind, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def cli_plan(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="blockdiff plan", description="per-GPU memory of a training run, "
                                "from config.json alone (no weights are read)")
    p.add_argument("-c", "--config", required=True, help="YAML config file (as for train)")
    p.add_argument("--gpus", type=_number(int, "a whole number of GPUs >= 1"), default=None,
                   help="world size (default: parallel.dp, else parallel.ep)")
    p.add_argument("--gpu-memory", type=_number(float, "GiB per GPU, a number > 0"),
                   default=DEFAULT_GPU_MEMORY_GIB, help=f"GiB per GPU (default {DEFAULT_GPU_MEMORY_GIB:g})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rl", action="store_true", help="plan a `blockdiff rl` run of the config")
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    plan = make_plan(cfg, args.gpus or default_gpus(cfg), args.gpu_memory, rl=args.rl)
    print(json.dumps(plan.as_json(), indent=1) if args.json else render(plan, args.config))
    if not plan.fits:
        raise ConfigError(f"does not fit: {summary(plan.as_json())}", file=args.config)
    return 0


# ---------------------------------------------------------------------------------------- before training


def check_before_training(cfg: Config, rl: bool = False) -> dict | None:
    """The plan (``Plan.as_json()``) of this launch (``rl``: of ``blockdiff rl``), world size from torchrun's
    environment, before any weight is read. On CUDA a run that cannot fit is refused with the numbers; on CPU
    the figures are only logged. ``train.skip_memory_check`` skips it.

    Several ranks are simulated in a child process: DTensor's caches compare device meshes without their
    rank, so a simulated rank's cached layouts would leak into this process's real meshes."""

    if cfg.train.skip_memory_check:
        return None
    if tdist.is_initialized():  # the simulation needs its own (fake) process group
        log.info("memory plan skipped: a process group is already initialised")
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    apply_world_size(copy.deepcopy(cfg), world)  # layout errors here, with the config's file and line
    cuda = torch.cuda.is_available()
    memory = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory if cuda else 0
    job = {"config": cfg.to_dict(), "gpus": world, "gpu_memory_gib": memory / GIB, "device": "cuda" if cuda else "cpu",
           "rl": rl}
    plan = _plan_job(job) if world == 1 else _plan_in_child(job)
    if not cuda:
        log.info("memory plan per process: weights %.3f + grads %.3f + optimizer %.3f GiB (exact), activations "
                 "~%.3f GiB, peak ~%.3f GiB", plan["weights_gib"], plan["grads_gib"], plan["optimizer_gib"],
                 plan["activations_gib"], plan["peak_step_gib"])
        return plan
    if not plan["fits"]:
        raise ConfigError(f"this run does not fit the GPUs: {summary(plan)}; see `blockdiff plan`, or set "
                          "train.skip_memory_check: true to launch anyway", field="train.skip_memory_check")
    log.info("memory plan: %s", summary(plan))
    return plan


def _plan_job(job: dict) -> dict:
    cfg = config_from_dict(job["config"], source="<memory plan>")
    return make_plan(cfg, job["gpus"], job["gpu_memory_gib"], job["device"], rl=job["rl"]).as_json()


def _plan_in_child(job: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, "-m", "blockdiff.plan.report"], input=json.dumps(job), env=env,
                       capture_output=True, text=True)
    lines = p.stdout.strip().splitlines()
    reply = json.loads(lines[-1]) if p.returncode == 0 and lines else {"error": p.stderr.strip()[-2000:]}
    if "error" in reply:
        raise ConfigError(f"memory plan failed: {reply['error']}")
    return reply


if __name__ == "__main__":  # the child of _plan_in_child: a job on stdin, the plan (or the error) on stdout
    try:
        print(json.dumps(_plan_job(json.loads(sys.stdin.read()))))
    except BlockdiffError as e:
        print(json.dumps({"error": str(e)}))
