"""Launched by tests/test_rl_parallel.py under torchrun (or called in-process for the 1-process reference).

    python tests/rl_dist_worker.py OUT_FILE [--section.field value ...]

Step 0 of ``blockdiff rl`` without its optimizer step: the rollout (all ranks sampling in lockstep), the
reference ELBOs, then the GRPO loss's forward and backward on this rank's share. Rank 0 writes the
completions, the global loss sums and every FULL gradient (gathered) to OUT_FILE (safetensors; the
completions as a JSON string in its metadata). Each rank writes ``OUT_FILE.rank<R>.done`` after a clean
finish and leaves with os._exit(0) (a gloo teardown abort must not turn a good run into a failure).
"""

from __future__ import annotations

import json
import os
import sys

import torch


def rl_step_grads(overrides: list[str]):
    from blockdiff.config.schema import apply_world_size, demo_config_path, load_config
    from blockdiff.objective.loss import ObjectiveSettings
    from blockdiff.parallel.distributed import init_distributed
    from blockdiff.rl.elbo import elbo_settings
    from blockdiff.rl.loop import reference_policy, sampler_settings
    from blockdiff.rl.rewards import build_rewards
    from blockdiff.rl.rollout import PromptSet, sample_rollout
    from blockdiff.rl.update import accumulate_gradients, fixed_elbos, host_batches
    from blockdiff.train.loading import build_training_model
    from blockdiff.train.setup import load_tokenizer
    from helpers import gather_grads

    cfg = load_config(demo_config_path(), overrides)
    dist = init_distributed()
    apply_world_size(cfg, dist.world_size)
    torch.manual_seed(cfg.train.seed)
    tok = load_tokenizer(cfg)
    prompts = PromptSet(cfg.data.train_path, tok, canvas_length=cfg.data.canvas_length, seq_length=cfg.data.seq_length)
    model = build_training_model(cfg, dist)
    reference = reference_policy(cfg, dist, model)
    params = [p for p in model.parameters() if p.requires_grad]
    settings = elbo_settings(ObjectiveSettings.from_config(cfg.objective))
    rl = cfg.rl
    rollout = sample_rollout(model, tok, prompts, 0, prompts_per_step=rl.prompts_per_step, group_size=rl.group_size,
                             seed=cfg.train.seed, sampler=sampler_settings(cfg, model, tok),
                             terms=build_rewards(rl.rewards), advantage=rl.advantage, adv_eps=rl.advantage_eps,
                             dist=dist)
    micro = host_batches(rollout, 0, cfg, model.config.vocab_size, model.config.eos_token_id, settings, dist)
    ref = fixed_elbos(reference, micro, settings, cfg, dist, reference=reference is model) if rl.kl_beta else None
    sums = accumulate_gradients(model, params, None, micro, rollout.advantages.to(dist.device), None, ref, settings,
                                cfg, dist, len(rollout.completions))
    grads = gather_grads(model, dist)
    if dist.rank != 0:
        return None
    return {"sums": sums.cpu(), "advantages": rollout.advantages.clone(), **{f"grad.{k}": v for k, v in grads.items()}}, \
        {"completions": json.dumps(rollout.completions)}


if __name__ == "__main__":
    from safetensors.torch import save_file

    out = sys.argv[1]
    got = rl_step_grads(sys.argv[2:])
    if got is not None:
        save_file(got[0], out, metadata=got[1])
    rank = int(os.environ.get("RANK", "0"))
    with open(f"{out}.rank{rank}.done", "w") as f:
        f.write("ok")
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
