"""``blockdiff bench``: time the full recipe training step on one GPU, blockdiff vs transformers.

The step (both implementations do the same work): encoder over all clean tokens with the AR loss,
decoder pass 1 without grad, decoder pass 2 with self-conditioning, backward, fp32-master AdamW step
(torch's fused AdamW as in training; the ``+master_adamw`` variants: MasterAdamW, which also writes the bf16
working weights) with bf16 compute, frozen router, grad clip. blockdiff's step is the trainer's own
``train.step.train_step``. The model is random-init at the real layer shapes with a configurable depth. tokens/s counts
B * (prompt + response) clean sequence tokens per step (the facts file's convention). MFU = model FLOP/s
(``blockdiff.train.flops``) / the card's dense bf16 peak, which is measured in the same run with an 8192^3
matmul and also reported against the 989 TFLOP/s datasheet.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import time

import torch
import torch.nn.functional as F

from blockdiff.data.canvas import CanvasBatch
from blockdiff.train.flops import StepShape, step_flops
from blockdiff.train.master_adamw import MasterAdamW
from blockdiff.model.config import REAL_SHAPES, ModelConfig, hf_config_dict
from blockdiff.model.hf.io import from_config
from blockdiff.objective.loss import ObjectiveSettings, draw_noise, freeze_router
from blockdiff.parallel.distributed import DistInfo
from blockdiff.parallel.parallelize import apply_activation_checkpointing, apply_compile
from blockdiff.train.step import train_step

DATASHEET_BF16 = 989e12


def make_batch(B, P, R, C, vocab, device, seed=0) -> CanvasBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, P + R), generator=g)
    return CanvasBatch(ids, torch.ones(B, P + R, dtype=torch.bool), torch.full((B,), P), torch.full((B,), R // C),
                       torch.arange(B), block_size=C).to(device)


def measured_peak(device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t)


# blockdiff variants: "blockdiff" is the training default (torch's fused AdamW over fp32 grads, the weights cast
# to bf16 once per step: precision.working_weights); "+master_adamw": persistent bf16 working weights written by
# MasterAdamW (optimizer.master_update, master_adamw.py); ":compile" adds torch.compile per layer
BLOCKDIFF_VARIANTS = {"blockdiff": {}, "blockdiff+master_adamw": {"master_adamw": True},
                      "blockdiff:compile": {"compile": True},
                      "blockdiff:compile+master_adamw": {"compile": True, "master_adamw": True}}
ONE_PROCESS = DistInfo(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def blockdiff_step_fn(hf_cfg, batch, args, device, compile=False, master_adamw=False):
    model = from_config(hf_cfg, dtype=torch.float32, device=device, attn_backend=args.attn)
    freeze_router(model)
    if args.activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if master_adamw:
        opt = MasterAdamW(model, params, lr=1e-5, betas=(0.95, 0.99), weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.95, 0.99), weight_decay=1e-4, fused=True)
    settings = ObjectiveSettings()
    state = {"i": 0}

    def step():
        state["i"] += 1
        return recipe_step(model, batch, params, opt, settings, state["i"] - 1)

    return model, step


def recipe_step(model, batch, params, opt, settings: ObjectiveSettings, step: int) -> torch.Tensor:
    """One full recipe step on one device: the trainer's ``train_step`` (bf16 compute on a GPU, clip 1.0,
    AdamW) over one micro-batch whose noise is keyed by ``step``. Returns the loss (on the device)."""
    B = len(batch.sample_ids)  # one noise stream per conversation (a packed row holds several)
    noise = draw_noise(batch, torch.arange(B) + step * B, seed=0, vocab_size=model.config.vocab_size,
                       eps=settings.eps, sc_prob=settings.self_conditioning_prob)
    dist = dataclasses.replace(ONE_PROCESS, device=batch.input_ids.device)
    outcome = train_step(model, opt, params, [(batch, noise)], settings, dist, dtype_name="bfloat16", grad_clip=1.0)
    return outcome.sums[0]


def transformers_step_fn(hf_cfg, batch, args, device):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.cache_utils import DynamicCache

    cfg = DiffusionGemmaConfig(**hf_cfg)
    with torch.device(device):
        model = DiffusionGemmaForBlockDiffusion._from_config(cfg, experts_implementation="grouped_mm",
                                                             attn_implementation="sdpa")
    model.train()
    for n, p in model.named_parameters():
        if ".router." in n or "vision" in n or "embed_vision" in n:
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.95, 0.99), weight_decay=1e-4, fused=True)
    B, C, V = batch.batch_size, batch.canvas_length, cfg.text_config.vocab_size
    P = int(batch.prompt_lengths[0])
    cap = cfg.text_config.final_logit_softcapping

    def step():
        ids = batch.input_ids
        clean = ids[:, P:P + C]
        noisy = torch.where(torch.rand(clean.shape, device=device) < 0.5, torch.randint_like(clean, V), clean)
        coin = torch.rand(B, device=device) < 0.5
        with torch.autocast("cuda", dtype=torch.bfloat16):
            cache = DynamicCache(config=cfg.text_config)
            h = model.model.encoder(input_ids=ids, past_key_values=cache).last_hidden_state
            logits = model.lm_head(h[:, :-1]).float()
            ar = F.cross_entropy((cap * torch.tanh(logits / cap)).flatten(0, 1), ids[:, 1:].flatten())
            with torch.no_grad():
                l1 = model(past_key_values=cache, decoder_input_ids=noisy).logits
            l2 = model(past_key_values=cache, decoder_input_ids=noisy, self_conditioning_logits=l1,
                       self_conditioning_mask=coin).logits
            loss = ar + F.cross_entropy(l2.flatten(0, 1), clean.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step


def time_impl(name, build, hf_cfg, batch, args, device) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model, step = build(hf_cfg, batch, args, device)
    losses = []
    for _ in range(args.warmup):
        losses.append(float(step()))
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        last = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / args.steps
    losses.append(float(last))
    out = {"impl": name, "step_s": dt, "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
           "losses": losses}
    del model, step
    torch._dynamo.reset()  # compiled layers keep their model alive through dynamo's caches
    gc.collect()  # the step closure holds model + optimizer in reference cycles
    torch.cuda.empty_cache()
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="blockdiff bench")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--shapes", default="768+256,256+256", help="comma list of PROMPT+RESPONSE")
    p.add_argument("--impl", default="blockdiff,transformers")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attn", default="auto")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("blockdiff bench needs a CUDA GPU")
    device = torch.device("cuda")
    hf_cfg = hf_config_dict(**{**REAL_SHAPES, "num_hidden_layers": args.layers})
    mcfg = ModelConfig.from_hf(__import__("transformers").DiffusionGemmaConfig(**hf_cfg))
    peak = measured_peak(device)
    results = []
    for shape in args.shapes.split(","):
        P, R = (int(x) for x in shape.split("+"))
        batch = make_batch(args.batch, P, R, mcfg.canvas_length, mcfg.vocab_size, device)
        flops = step_flops(mcfg, StepShape(args.batch, P, R, mcfg.canvas_length))["total"]
        rows = {}
        # compiled variants last: an eager flex_attention run after a compiled one measured 1.44 s instead of
        # 0.35 s (flex ran unfused; H200, torch 2.11, cause not investigated)
        for name in sorted(args.impl.split(","), key=lambda n: ":compile" in n):
            if name in BLOCKDIFF_VARIANTS:
                build = functools.partial(blockdiff_step_fn, **BLOCKDIFF_VARIANTS[name])
            elif name == "transformers":
                build = transformers_step_fn
            else:
                raise SystemExit(f"--impl: unknown {name!r} (choose from {[*BLOCKDIFF_VARIANTS, 'transformers']})")
            try:
                r = time_impl(name, build, hf_cfg, batch, args, device)
            except Exception as e:  # report and go on (OOM of the baseline included)
                r = {"impl": name, "error": f"{type(e).__name__}: {str(e)[:500]}"}
                torch.cuda.empty_cache()
            if "step_s" in r:
                r.update(tokens_per_s=args.batch * (P + R) / r["step_s"], tflops=flops / r["step_s"] / 1e12,
                         mfu_datasheet=flops / r["step_s"] / DATASHEET_BF16, mfu_measured_peak=flops / r["step_s"] / peak)
            r.update(shape=f"{args.batch}x({P}+{R})", layers=args.layers, step_tflop=flops / 1e12,
                     device=torch.cuda.get_device_name(device), measured_peak_tflops=peak / 1e12,
                     torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
            rows[name] = r
            print(json.dumps(r), flush=True)
            results.append(r)
        if "blockdiff" in rows and "transformers" in rows and "step_s" in rows["blockdiff"] and "step_s" in rows["transformers"]:
            speedup = rows["transformers"]["step_s"] / rows["blockdiff"]["step_s"]
            print(f"{shape}: blockdiff {rows['blockdiff']['step_s']:.3f}s vs transformers "
                  f"{rows['transformers']['step_s']:.3f}s -> {speedup:.2f}x", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
