"""MasterAdamW's compiled update on CUDA against torch.optim.AdamW, and both timed: one JSON line.

Correctness on one tensor of every distinct trainable shape of the real model (random masters, moments
and step counts; fresh random bf16 gradients every step; lr changing; clipping active): the master,
exp_avg and exp_avg_sq against torch.optim.AdamW(fused=False) fed the same gradients cast to fp32 and
divided by the clip factor; the bf16 working copy, poisoned with NaN before each step, must equal the new
master cast; a step with non-finite gradients and ``found_inf`` set must leave every tensor bit for bit.

Timing (CUDA events, median) over all trainable tensors of ``--layers`` layers: the optimizer-side work
of one step on the MasterAdamW path (norm over bf16 grads + the fused update, 30 B/param) and on
the default path (cast to bf16 working weights, bf16 grads cast to fp32, norm, torch's fused AdamW;
44 B/param).

    python benchmarks/check_fused_update.py [--layers 6] [--iters 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics

import torch

from blockdiff.train import master_adamw
from blockdiff.train.master_adamw import MasterAdamW
from blockdiff.model.config import REAL_SHAPES, ModelConfig, hf_config_dict
from blockdiff.model.diffusion_gemma import DiffusionGemma
from blockdiff.objective.loss import freeze_router
from blockdiff.parallel.parallelize import clip_gradients

BETAS, EPS, WD = (0.95, 0.99), 1e-8, 0.1


def trainable_shapes(layers: int) -> list[tuple[int, ...]]:
    from transformers import DiffusionGemmaConfig

    cfg = ModelConfig.from_hf(DiffusionGemmaConfig(**hf_config_dict(**{**REAL_SHAPES, "num_hidden_layers": layers})))
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    freeze_router(model)
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


class Holder(torch.nn.Module):
    def __init__(self, tensors):
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(t) for t in tensors])


def rel(a, b, scale) -> float:
    return float((a - b).abs().max() / scale.abs().max().clamp_min(1e-30))


def check(shapes, dev, steps=3) -> dict:
    g = torch.Generator(device=dev).manual_seed(0)
    masters = [0.02 * torch.randn(s, device=dev, generator=g) for s in shapes]
    holder = Holder([m.clone() for m in masters])
    params = list(holder.ps)
    opt = MasterAdamW(holder, params, lr=1e-3, betas=BETAS, eps=EPS, weight_decay=WD)
    ref_params = [torch.nn.Parameter(m.clone()) for m in masters]
    ref = torch.optim.AdamW(ref_params, lr=1e-3, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False, fused=False)
    for p, q in zip(params, ref_params):  # a run in progress: random moments, step 7
        m, v = 1e-3 * torch.randn(p.shape, device=dev, generator=g), 1e-6 * torch.rand(p.shape, device=dev, generator=g)
        opt.state[p] = {"step": torch.tensor(7.0, device=dev), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
        ref.state[q] = {"step": torch.tensor(7.0), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    err = {"param_update": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    working_ok = True
    for i in range(steps):
        lr = 1e-3 * (1 - 0.2 * i)
        for grp in opt.param_groups + ref.param_groups:
            grp["lr"] = lr
        before = [p.detach().clone() for p in params]
        for p in params:
            opt.working.of(p).grad = (0.05 * torch.randn(p.shape, device=dev, generator=g)).bfloat16()
            opt.working.of(p).data.fill_(float("nan"))  # the copy is a pure output of the update
        clip_gradients(params, opt, 1.0)
        for p, q in zip(params, ref_params):
            q.grad = opt.working.of(p).grad.float() / opt.grad_scale
        opt.step()
        ref.step()
        for p, q, b in zip(params, ref_params, before):
            s, r = opt.state[p], ref.state[q]
            err["param_update"] = max(err["param_update"], rel(p.detach(), q.detach(), q.detach() - b))
            err["exp_avg"] = max(err["exp_avg"], rel(s["exp_avg"], r["exp_avg"], r["exp_avg"]))
            err["exp_avg_sq"] = max(err["exp_avg_sq"], rel(s["exp_avg_sq"], r["exp_avg_sq"], r["exp_avg_sq"]))
            working_ok &= torch.equal(opt.working.of(p), p.detach().bfloat16())
        opt.zero_grad()
        ref.zero_grad()
    # a non-finite step: found_inf set, NaN gradients -> nothing changes, bit for bit
    snap = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}, opt.working.of(p).clone())
            for p in params]
    for p in params:
        opt.working.of(p).grad = torch.full(p.shape, float("nan"), device=dev, dtype=torch.bfloat16)
    clip_gradients(params, opt, 1.0)
    opt.found_inf = torch.ones((), device=dev)
    opt.step()
    skip_ok = all(torch.equal(p, a) and torch.equal(opt.working.of(p), w)
                  and all(torch.equal(opt.state[p][k], st[k]) for k in st) for p, (a, st, w) in zip(params, snap))
    ok = working_ok and skip_ok and err["param_update"] < 1e-4 and max(err["exp_avg"], err["exp_avg_sq"]) < 1e-5
    return {"ok": ok, "max_rel_err": err, "working_equals_master_cast": working_ok, "skip_bit_identical": skip_ok,
            "compiled": dev.type == "cuda" and not master_adamw._update.failed}


def median_ms(fn, iters: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def time_new(shapes, dev, iters) -> float:
    holder = Holder([torch.randn(s, device=dev) for s in shapes])
    params = list(holder.ps)
    opt = MasterAdamW(holder, params, lr=1e-5, betas=BETAS, eps=EPS, weight_decay=WD)
    for p in params:
        opt.working.of(p).grad = torch.randn(p.shape, device=dev, dtype=torch.bfloat16)

    def run():
        clip_gradients(params, opt, 1.0)
        opt.step()
    ms = median_ms(run, iters)
    del holder, params, opt, run
    gc.collect()
    torch.cuda.empty_cache()
    return ms


def time_old(shapes, dev, iters) -> tuple[float, float]:
    params = [torch.nn.Parameter(torch.randn(s, device=dev)) for s in shapes]
    grads16 = [torch.randn(s, device=dev, dtype=torch.bfloat16) for s in shapes]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)

    def adamw():
        opt.step()

    def run():  # what the default path does per step besides the model: the casts both ways, norm, AdamW
        for p, g in zip(params, grads16):
            p.to(torch.bfloat16)
            p.grad = g.float()
        clip_gradients(params, opt, 1.0)
        opt.step()
    total = median_ms(run, iters)
    alone = median_ms(adamw, iters)
    del params, grads16, opt, run, adamw
    gc.collect()
    torch.cuda.empty_cache()
    return total, alone


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("check_fused_update.py needs a CUDA GPU")
    dev = torch.device("cuda")
    shapes = trainable_shapes(args.layers)
    out = check(sorted(set(shapes)), dev)
    n = sum(torch.Size(s).numel() for s in shapes)
    new_ms = time_new(shapes, dev, args.iters)
    old_ms, adamw_ms = time_old(shapes, dev, args.iters)
    out.update(layers=args.layers, tensors=len(shapes), params=n, new_ms=new_ms, old_ms=old_ms,
               torch_fused_adamw_ms=adamw_ms, new_bytes_per_param=30, old_bytes_per_param=44,
               new_tb_per_s=30 * n / new_ms / 1e9, old_tb_per_s=44 * n / old_ms / 1e9,
               device=torch.cuda.get_device_name(dev), torch=torch.__version__)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
