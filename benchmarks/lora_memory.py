"""LoRA memory/throughput of the real-shape DiffusionGemma on one GPU.

Random-init model from config at the real hidden/expert sizes (``REAL_SHAPES``, N layers), frozen
base in bf16, fp32 adapters (rank 16, alpha 32 on q/k/v/o + dense MLP by default), activation
checkpointing per layer, bf16 autocast, AdamW on the adapters, K steps of the real objective on a
synthetic batch of sequence 1024 with a 256-token response (one canvas block). Prints one JSON line.

    python benchmarks/lora_memory.py --layers 30 --steps 5 --micro-batch 1
    python benchmarks/lora_memory.py --layers 2 --steps 2        # quick smoke test
    python benchmarks/lora_memory.py --layers 30 --base-quantization nf4   # frozen base quantized (int8/nf4/fp8)

With ``--base-quantization`` the bf16 base is built, then quantized in place (``lora.quantize``) and the
bf16 copies freed before the peak counter is reset: ``peak_mem_gib`` is the quantized run's own peak.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--response", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--experts", action="store_true", help="also per-expert adapters")
    p.add_argument("--self-conditioning", action="store_true")
    p.add_argument("--no-ac", action="store_true", help="disable activation checkpointing")
    p.add_argument("--sc-prob", type=float, default=0.5)
    p.add_argument("--base-quantization", default="none", choices=["none", "int8", "nf4", "fp8"])
    args = p.parse_args()

    from blockdiff.data.canvas import CanvasBatch
    from blockdiff.lora import apply_lora
    from blockdiff.model.hf import io as hf_io
    from blockdiff.model.config import REAL_SHAPES, hf_config_dict
    from blockdiff.train.bench import recipe_step
    from blockdiff.objective.loss import ObjectiveSettings

    dev = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    # Built directly in bf16 on the GPU (never an fp32 copy of the 26B base), then adapters in fp32.
    model = hf_io.from_config(hf_config_dict(**REAL_SHAPES, num_hidden_layers=args.layers), dtype=torch.bfloat16,
                              device=dev, attn_backend="auto")
    lora_cfg = {"rank": args.rank, "alpha": args.alpha, "dropout": 0.0,
                "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "self_conditioning": args.self_conditioning, "experts": args.experts}
    counts = apply_lora(model, lora_cfg, base_dtype=torch.bfloat16)
    if args.base_quantization != "none":
        from blockdiff.lora.quantize import quantize_frozen_base_

        quantize_frozen_base_(model, args.base_quantization)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model.train()
    build_s = time.perf_counter() - t0
    if not args.no_ac:
        try:
            from blockdiff.parallel.parallelize import apply_activation_checkpointing
        except ImportError:
            from torch.utils.checkpoint import checkpoint

            def apply_activation_checkpointing(m):
                for layer in m.layers:
                    layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        apply_activation_checkpointing(model)

    params = [q for q in model.parameters() if q.requires_grad]
    assert all(q.dtype == torch.float32 for q in params)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.95, 0.99), weight_decay=1e-4)
    settings = ObjectiveSettings(self_conditioning_prob=args.sc_prob)
    C = model.config.canvas_length
    B, L, R = args.micro_batch, args.seq, args.response
    assert R % C == 0 and R < L
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    batch = CanvasBatch(torch.randint(3, V, (B, L), generator=g), torch.ones(B, L, dtype=torch.bool),
                        torch.full((B,), L - R), torch.full((B,), R // C), torch.arange(B), C).to(dev)
    weights_gib = torch.cuda.memory_allocated() / 2**30

    times = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = float(recipe_step(model, batch, params, opt, settings, step))
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)

    step_s = sum(times) / max(len(times), 1)
    print(json.dumps({
        "device": torch.cuda.get_device_name(), "layers": args.layers, "micro_batch": B, "seq": L, "response": R,
        "canvas": C, "rank": args.rank, "experts": args.experts, "activation_checkpointing": not args.no_ac,
        "base_quantization": args.base_quantization,
        "trainable_params": counts["trainable"], "total_params": counts["total"],
        "weights_gib": round(weights_gib, 2), "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "step_time_s": round(step_s, 3), "tokens_per_s": round(B * L / step_s, 1), "build_s": round(build_s, 1),
        "last_loss": loss, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
