"""Sampling speed: blockdiff's sampler vs transformers' ``generate`` on the same weights, side by side.

Real layer shapes, reduced depth, bf16, random weights (so every block runs all denoising steps),
128-token prompts; EOS set to an id random weights practically never argmax to, so both run the full
length. Prints one JSON line per (implementation, attention backend, variant, batch, new tokens); the
"graphs" variant also reports whether its tokens equal the "eager" run's (same kernels, same seeds).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from blockdiff.model.config import REAL_SHAPES, ModelConfig, hf_config_dict
    from blockdiff.model.diffusion_gemma import DiffusionGemma
    from blockdiff.model.hf.names import from_hf
    from blockdiff.infer.sampling import generate
    from blockdiff.infer.settings import SamplerSettings

    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--cases", default="1x256,8x256,8x512", help="BATCHxNEW_TOKENS list")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--backends", default="sdpa")
    p.add_argument("--variants", default="eager,graphs,compile+graphs",
                   help="blockdiff runs: eager, graphs (CUDA graphs), compile (torch.compile of the vocab math), "
                        "compile+graphs")
    p.add_argument("--profile", action="store_true", help="also print a torch-profiler table of one eager run")
    p.add_argument("--skip-transformers", action="store_true")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    cfg = DiffusionGemmaConfig(**hf_config_dict(**{**REAL_SHAPES, "num_hidden_layers": args.layers}))
    with torch.device(dev):
        hf = DiffusionGemmaForBlockDiffusion._from_config(cfg, dtype=torch.bfloat16,
                                                         experts_implementation="grouped_mm").eval()
    ours = DiffusionGemma(ModelConfig.from_hf(cfg)).to(dev, torch.bfloat16).eval()
    ours.load_state_dict({from_hf(k): v for k, v in hf.state_dict().items() if from_hf(k) is not None})
    ours.rotary.__init__(ours.config)
    ours.rotary.to(dev)
    eos = cfg.text_config.vocab_size - 1
    results = []
    for case in args.cases.split(","):
        B, N = (int(x) for x in case.split("x"))
        prompts = torch.randint(3, 200000, (B, args.prompt), device=dev)
        runs = [] if args.skip_transformers else [("transformers", None, None)]
        runs += [("blockdiff", b, v) for b in args.backends.split(",") for v in args.variants.split(",")]
        outputs = {}
        for name, backend, variant in runs:
            if name == "transformers":
                def call():
                    return hf.generate(input_ids=prompts, max_new_tokens=N, eos_token_id=eos)
            else:
                settings = SamplerSettings(max_new_tokens=N, eos_token_ids=[eos], seed=0, attn_backend=backend,
                                           cuda_graphs="graphs" in variant, compile="compile" in variant)

                def call():
                    return generate(ours, prompts.tolist(), settings, device=dev)
            with torch.inference_mode():
                call()  # warm-up: compilation, allocator
                torch.cuda.synchronize()
                t = time.perf_counter()
                out = call()
                torch.cuda.synchronize()
                dt = time.perf_counter() - t
            if name == "blockdiff":
                outputs[(backend, variant)] = out
            r = {"impl": name, "backend": backend, "variant": variant, "batch": B, "new_tokens": N, "seconds": dt,
                 "new_tokens_per_s": B * N / dt, "layers": args.layers, "device": torch.cuda.get_device_name(dev),
                 "date": time.strftime("%Y-%m-%d")}
            if variant == "graphs" and (backend, "eager") in outputs:  # same seeds and kernels: same tokens
                r["tokens_equal_eager"] = out == outputs[(backend, "eager")]
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        settings = SamplerSettings(max_new_tokens=256, eos_token_ids=[eos], seed=0, cuda_graphs=False, compile=True)
        prompts = torch.randint(3, 200000, (8, args.prompt), device=dev).tolist()
        with torch.inference_mode():
            generate(ours, prompts, settings, device=dev)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                generate(ours, prompts, settings, device=dev)
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    return results


if __name__ == "__main__":
    main()
