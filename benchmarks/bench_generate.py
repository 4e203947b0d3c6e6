"""Sampling speed: blockdiff's sampler vs transformers' ``generate`` on the same weights, side by side.

Real layer shapes, reduced depth, bf16, random weights (so every block runs all denoising steps),
128-token prompts; EOS set to an id random weights practically never argmax to, so both run the full
length. Prints one JSON line per (implementation, batch, new tokens).
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
    from blockdiff.model.hf_names import from_hf
    from blockdiff.sampling import SamplerSettings, generate

    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--cases", default="1x256,8x256,8x512", help="BATCHxNEW_TOKENS list")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--backends", default="sdpa,flex")
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
        runs = [] if args.skip_transformers else [("transformers", None)]
        runs += [("blockdiff", b) for b in args.backends.split(",")]
        for name, backend in runs:
            if name == "transformers":
                def call():
                    return hf.generate(input_ids=prompts, max_new_tokens=N, eos_token_id=eos)
            else:
                ours.attn_backend = backend
                settings = SamplerSettings(max_new_tokens=N, eos_token_ids=[eos], seed=0)

                def call():
                    return generate(ours, prompts.tolist(), settings, device=dev)
            with torch.inference_mode():
                call()  # warm-up: compilation, allocator
                torch.cuda.synchronize()
                t = time.perf_counter()
                call()
                torch.cuda.synchronize()
                dt = time.perf_counter() - t
            r = {"impl": name, "backend": backend, "batch": B, "new_tokens": N, "seconds": dt,
                 "new_tokens_per_s": B * N / dt, "layers": args.layers, "device": torch.cuda.get_device_name(dev),
                 "date": time.strftime("%Y-%m-%d")}
            results.append(r)
            print(json.dumps(r), flush=True)
    return results


if __name__ == "__main__":
    main()
