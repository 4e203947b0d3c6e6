"""GPU correctness checks at real layer shapes (run on the device; prints one JSON line per check).

1. grouped GEMM experts (torch._grouped_mm, bf16) vs the per-expert loop: values and gradients.
2. flex_attention block masks vs dense-mask SDPA inside the model (sliding head_dim 256 and full
   head_dim 512 layers), training forward over several blocks, fp32 and bf16.
3. blockdiff vs transformers' DiffusionGemmaForBlockDiffusion logits at the real shapes (2 layers:
   one sliding, one full), bf16 and fp32.
4. pass 2's soft embeddings with the embedding's gradient (``blockdiff.objective.soft_embed``, bf16, vocabulary
   262144, hidden 2816) vs plain autograd: values and gradient against fp32, time and peak memory.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

from blockdiff.model.config import REAL_SHAPES, ModelConfig, hf_config_dict
from blockdiff.model.diffusion_gemma import canvas_layout
from blockdiff.model.moe import grouped_linear


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def check_grouped_mm(dev):
    g = torch.Generator(device=dev).manual_seed(0)
    E, H, I, N = 128, 2816, 704, 8192
    counts = torch.bincount(torch.randint(0, E - 3, (N,), device=dev, generator=g), minlength=E)  # 3 empty
    offs = torch.cumsum(counts, 0).to(torch.int32)
    x = torch.randn(N, H, device=dev, dtype=torch.bfloat16, generator=g, requires_grad=True)
    w = (torch.randn(E, 2 * I, H, device=dev, generator=g) * 0.02).requires_grad_()
    y = grouped_linear(x, w, counts, offs)
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    xs = torch.split(x.detach().float(), counts.tolist())
    ref = torch.cat([c @ w[e].detach().float().t() for e, c in enumerate(xs)])
    gys = torch.split(gy.float(), counts.tolist())
    ref_gx = torch.cat([c @ w[e].detach().float() for e, c in enumerate(gys)])
    ref_gw = torch.stack([gys[e].t() @ xs[e] for e in range(E)])
    t = time.perf_counter()
    for _ in range(20):
        grouped_linear(x.detach(), w.detach(), counts, offs)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / 20 * 1e3
    return {"check": "grouped_mm", "rel_y": rel(y, ref), "rel_gx": rel(gx, ref_gx), "rel_gw": rel(gw, ref_gw),
            "fwd_ms": ms, "fwd_tflops": 2 * N * H * 2 * I / ms / 1e9}


def decisive_router_(layers):
    """Random-init routers are near-uniform over 128 experts, so bf16 rounding flips top-k choices and
    the comparison turns chaotic; sharpen them so precision, not routing luck, is what is compared."""
    with torch.no_grad():
        for layer in layers:
            layer.router.proj.weight.mul_(100)


def check_flex_vs_sdpa(dev, dtype, layers: int = 2):
    """2 layers = one sliding (head_dim 256) and one full (head_dim 512) layer: both mask kinds, and fast
    enough for fp32 inside one device call (6 layers in fp32 did not finish in 150 s)."""
    from blockdiff.model.hf import io as hf_io

    hf_cfg = hf_config_dict(**{**REAL_SHAPES, "num_hidden_layers": layers})
    model = hf_io.from_config(hf_cfg, dtype=dtype, device=dev, attn_backend="sdpa").eval()
    decisive_router_(model.layers)
    B, P, nb, C = 2, 300, 3, 256
    ids = torch.randint(3, 1000, (B, P + nb * C), device=dev)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, P + 2 * C + 100:] = False  # padding in row 1
    canvas = torch.randint(3, 1000, (B, nb * C), device=dev)
    nblocks = torch.tensor([nb, nb], device=dev)
    out = {}
    with torch.no_grad():
        for backend in ("sdpa", "flex"):
            model.attn_backend = backend
            h, cache = model.encode(ids, valid)
            d = model.decode(canvas, cache, canvas_layout(torch.tensor([P, P], device=dev), nblocks, nb * C, C))
            out[backend] = (h, d)
    return {"check": f"flex_vs_sdpa_{layers}layers_{str(dtype).split('.')[-1]}", "rel_encoder": rel(out["flex"][0], out["sdpa"][0]),
            "rel_decoder": rel(out["flex"][1], out["sdpa"][1])}


def check_parity(dev, dtype):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from blockdiff.model.diffusion_gemma import DiffusionGemma
    from blockdiff.model.hf.names import from_hf

    cfg = DiffusionGemmaConfig(**hf_config_dict(**{**REAL_SHAPES, "num_hidden_layers": 2}))
    with torch.device(dev):
        hf = DiffusionGemmaForBlockDiffusion._from_config(cfg, dtype=dtype).eval()
    decisive_router_(hf.model.decoder.layers)
    ours = DiffusionGemma(ModelConfig.from_hf(cfg), attn_backend="flex").to(dev, dtype).eval()
    sd = {from_hf(k): v for k, v in hf.state_dict().items() if from_hf(k) is not None}
    ours.load_state_dict(sd, strict=True)
    ours.rotary.__init__(ours.config)
    ours.rotary.to(dev)
    prompt = torch.randint(3, 262144, (2, 1100), device=dev)  # longer than the 1024 sliding window
    canvas = torch.randint(3, 262144, (2, 256), device=dev)
    with torch.no_grad():
        ref = hf(input_ids=prompt, decoder_input_ids=canvas).logits
        got = ours.denoise_logits(prompt, canvas)
        sc = torch.randn_like(ref)
        ref_sc = hf(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
        got_sc = ours.denoise_logits(prompt, canvas, sc)
    return {"check": f"parity_transformers_{str(dtype).split('.')[-1]}", "max_abs": float((ref - got).abs().max()),
            "rel": rel(got, ref), "rel_sc": rel(got_sc, ref_sc),
            "argmax_agree": float((ref.argmax(-1) == got.argmax(-1)).float().mean())}


def check_soft_embeddings(dev, n: int = 8192, H: int = 2816, V: int = 262144):
    from blockdiff.objective.soft_embed import soft_embeddings

    g = torch.Generator(device=dev).manual_seed(0)
    cap, scale = 30.0, H ** 0.5
    h = torch.randn(n, H, device=dev, generator=g).to(torch.bfloat16)
    master = (torch.randn(V, H, device=dev, generator=g) * 0.02).requires_grad_()
    d_soft = torch.randn(n, H, device=dev, generator=g).to(torch.bfloat16)

    def plain(w):  # the reference's formula under autograd: keeps P [n, V] for backward
        z = F.linear(h, w.detach()).float()
        return (torch.softmax(cap * torch.tanh(z / cap), -1).to(w.dtype) @ w) * torch.tensor(scale, dtype=w.dtype,
                                                                                             device=dev)

    def step(fn):
        master.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(master.to(torch.bfloat16))
        out.backward(d_soft)
        return out.detach().float(), master.grad

    out = {"check": "soft_embeddings", "tokens": n}
    with torch.no_grad():
        z = cap * torch.tanh((h.float() @ master.t()) / cap)
        p = torch.softmax(z, -1)
        ref, ref_g = p @ master * scale, p.t() @ (d_soft.float() * scale)
        del z, p
    for name, fn in (("chunked", lambda w: soft_embeddings(h, w, cap, scale, chunk=1024)), ("plain", plain)):
        for _ in range(2):
            step(fn)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        for _ in range(5):
            got, got_g = step(fn)
        torch.cuda.synchronize()
        out.update({f"{name}_ms": (time.perf_counter() - t) / 5 * 1e3,
                    f"{name}_peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
                    f"{name}_rel": rel(got, ref), f"{name}_rel_grad": rel(got_g, ref_g)})
    return out


def main():
    dev = torch.device("cuda")
    checks = [lambda: check_grouped_mm(dev), lambda: check_flex_vs_sdpa(dev, torch.float32),
              lambda: check_flex_vs_sdpa(dev, torch.bfloat16),
              lambda: check_parity(dev, torch.bfloat16), lambda: check_parity(dev, torch.float32),
              lambda: check_soft_embeddings(dev)]
    for c in checks:
        try:
            r = c()
        except Exception as e:  # report and go on: one device call runs every check
            r = {"check": getattr(c, "__name__", "?"), "error": f"{type(e).__name__}: {e}"[:2000]}
        print(json.dumps(r), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
