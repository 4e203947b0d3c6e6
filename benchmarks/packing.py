"""Training-step throughput with packing off vs on, on GSM8K-like conversation lengths.

    python benchmarks/packing.py                         # CUDA: real layer shapes, 2 layers, bf16
    python benchmarks/packing.py --micro-batch 8,16 --steps 10 --output packing.json
    python benchmarks/packing.py --tiny --steps 2        # CPU smoke run (tiny model, scaled lengths)
    python benchmarks/packing.py --efficiency-only       # the packing-efficiency table only, no model
    python benchmarks/packing.py --turns 2               # multi-turn SFT: 2 supervised assistant turns each

Data: random tokens with GSM8K-like lengths (``blockdiff.data.synthetic.gsm8k_like_lengths``: question
~40-200 tokens, answer ~50-300, plus the chat template), turned into canvas examples exactly as training
does (``build_example``: the response EOS-filled to whole canvas blocks). ``--tiny`` scales the lengths
by canvas_length / 256. Micro-batch i holds conversations [i*mb, (i+1)*mb) in BOTH modes: off = one
conversation per row (``collate``), on = ``collate_packed`` (``data.packing.pack_rows``); the real
(non-pad) tokens per step are the same, so real tokens/s compares the two directly. On CUDA rows are
rounded up to 128 columns as the trainer does.

The step is ``blockdiff.train.bench.recipe_step`` (encoder + AR loss, decoder pass 1 without grad, pass 2 with
self-conditioning, backward, clip, AdamW; bf16 working weights on CUDA, fp32 on CPU) on a random-init
model. Each step takes the next micro-batch, so shapes vary as in training; the first ``--warmup``
steps of each mode (compilation of new shapes included) are not timed.

Output: one JSON line per efficiency row (``kind: efficiency``) and per timed run (``kind: step``);
``--output`` writes them all as a JSON list. Only torch, transformers, yaml and safetensors are needed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import blockdiff  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from blockdiff.train.bench import recipe_step  # noqa: E402
from blockdiff.data.canvas import build_multiturn_example, collate, collate_packed  # noqa: E402
from blockdiff.data.packing import next_fit, pack_rows, plan_cost  # noqa: E402
from blockdiff.data.synthetic import GSM8K_LIKE, gsm8k_like_lengths, length_examples  # noqa: E402
from blockdiff.model.config import REAL_SHAPES, hf_config_dict  # noqa: E402
from blockdiff.objective.loss import ObjectiveSettings, freeze_router  # noqa: E402

TINY_SHAPES = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                   sliding_window=64, num_experts=8, top_k_experts=2, moe_intermediate_size=32, canvas_length=32,
                   max_position_embeddings=4096)


def efficiency_rows(lengths, blocks, mb: int, seq_length: int, canvas: int, pad, label: str) -> list[dict]:
    """Real / padded tokens (clean rows and decoder canvas) of micro-batches of ``mb`` conversations,
    unpacked vs greedy next-fit vs ``pack_rows``."""
    plans = {"unpacked": lambda l, b: [[i] for i in range(len(l))], "next_fit": lambda l, b: next_fit(l, seq_length),
             "pack_rows": lambda l, b: pack_rows(l, seq_length, pad, b, canvas)}
    n = len(lengths) // mb * mb
    real, real_canvas = sum(lengths[:n]), sum(blocks[:n]) * canvas
    out = []
    for name, plan in plans.items():
        padded = padded_canvas = rows = 0
        for s in range(0, n, mb):
            lb, bb = lengths[s:s + mb], blocks[s:s + mb]
            r = plan(lb, bb)
            cost = plan_cost(r, lb, bb, pad)
            padded, padded_canvas, rows = padded + cost[0], padded_canvas + cost[1] * canvas, rows + len(r)
        out.append({"kind": "efficiency", "lengths": label, "micro_batch": mb, "plan": name,
                    "seq_length": seq_length, "pad_to_multiple": pad, "micro_batches": n // mb,
                    "packing_efficiency": round(real / padded, 4),
                    "canvas_efficiency": round(real_canvas / padded_canvas, 4),
                    "rows_per_micro_batch": round(rows / (n // mb), 3)})
    return out


def build_model(args, device):
    from blockdiff.model.hf.io import from_config

    shapes = TINY_SHAPES if args.tiny else REAL_SHAPES
    model = from_config(hf_config_dict(**{**shapes, "num_hidden_layers": args.layers}), dtype=torch.float32,
                        device=device, attn_backend=args.attn, seed=0)
    freeze_router(model)
    if args.activation_checkpointing:
        from blockdiff.parallel.parallelize import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    model.train()
    return model


def multiturn_examples(lengths, turns: int, canvas: int, seq_length: int, vocab: int, seed: int) -> list:
    """Conversations of ``turns`` consecutive (question, answer) length pairs, random tokens, every answer
    supervised (``build_multiturn_example``: each assistant turn its own canvas segment)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(len(lengths) // turns):
        ids, sup = [], []
        for p, r in lengths[c * turns:(c + 1) * turns]:
            ids += torch.randint(3, vocab, (p + r,), generator=g).tolist()
            sup += [False] * p + [True] * r
        ex = build_multiturn_example(ids, sup, canvas_length=canvas, seq_length=seq_length, eos_id=1, sample_id=c)
        if ex is not None:
            out.append(ex)
    return out


def time_mode(model, params, opt, batches, args, device, packing: str, mb: int) -> dict:
    settings = ObjectiveSettings()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        batch = batches[i % len(batches)]
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = recipe_step(model, batch, params, opt, settings, i)
        losses.append(float(loss))  # synchronises
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    timed = [batches[i % len(batches)] for i in range(args.warmup, args.warmup + args.steps)]
    real = sum(b.real_tokens() for b in timed)
    # decoder canvas: real = supervised tokens; padded = rows x the most blocks in a row x canvas_length
    canvas = [(int(b.supervised_mask().sum()),
               b.input_ids.shape[0] * int(b.segment_table()[..., 2].sum(-1).max()) * b.canvas_length) for b in timed]
    row = {"kind": "step", "packing": packing, "micro_batch": mb, "steps": args.steps,
           "step_s": sum(times) / len(times), "step_s_median": statistics.median(times),
           "real_tokens_per_step": real / len(timed), "real_tokens_per_s": real / sum(times),
           "conversations_per_s": sum(len(b.sample_ids) for b in timed) / sum(times),
           "packing_efficiency": round(real / sum(b.padded_tokens() for b in timed), 4),
           "canvas_efficiency": round(sum(c[0] for c in canvas) / sum(c[1] for c in canvas), 4),
           "rows_per_step": sum(b.input_ids.shape[0] for b in timed) / len(timed),
           "canvas_segments_per_step": sum(int((b.segment_table()[..., 2] > 0).sum()) for b in timed) / len(timed),
           "width_mean": sum(b.input_ids.shape[1] for b in timed) / len(timed),
           "losses_finite": all(map(math.isfinite, losses)), "last_loss": losses[-1]}
    if cuda:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model and lengths scaled to its 32-token canvas (CPU)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--micro-batch", default="8", help="comma list: conversations per micro-batch (default 8)")
    p.add_argument("--seq-length", type=int, default=None, help="row capacity (default 1024; --tiny: 128)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode")
    p.add_argument("--modes", default="off,on")
    p.add_argument("--turns", type=int, default=1, help="assistant turns per conversation (> 1: multi-turn SFT)")
    p.add_argument("--attn", default="auto")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--efficiency-only", action="store_true", help="print the efficiency table, time nothing")
    p.add_argument("--efficiency-samples", type=int, default=4096, help="conversations for the efficiency table")
    p.add_argument("--pad-to-multiple", type=int, default=None,
                   help="round row widths up to this, 0: never (default: 128 on CUDA as the trainer does, 0 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads on CPU (default 1)")
    p.add_argument("--output", default=None, help="also write every JSON line here, as one JSON list")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not (args.tiny or args.efficiency_only):
        raise SystemExit("benchmarks/packing.py needs a CUDA GPU at real shapes; --tiny runs a CPU smoke test")
    if not cuda:
        # a smoke run: one thread (OpenMP threads on a busy small machine can slow it down 50x)
        torch.set_num_threads(args.cpu_threads)
    canvas = (TINY_SHAPES if args.tiny else REAL_SHAPES)["canvas_length"]
    seq_length = args.seq_length or (128 if args.tiny else 1024)
    scale = canvas / 256
    pad = args.pad_to_multiple if args.pad_to_multiple is not None else (128 if cuda else 0)
    pad = pad or None  # the trainer rounds row widths up to 128 on GPU, not on CPU
    vocab = (TINY_SHAPES if args.tiny else REAL_SHAPES)["vocab_size"]
    meta = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "layers": args.layers, "tiny": args.tiny, "canvas": canvas,
            "seq_length": seq_length, "gsm8k_like": GSM8K_LIKE, "length_scale": scale, "turns": args.turns}
    results = []

    def emit(row):
        row = {**row, **meta}
        print(json.dumps(row), flush=True)
        results.append(row)

    mbs = [int(x) for x in args.micro_batch.split(",")]
    exs = length_examples(gsm8k_like_lengths(args.efficiency_samples, args.seed, scale), canvas_length=canvas,
                          seq_length=seq_length, vocab_size=vocab, seed=args.seed)
    L, NB = [len(e.input_ids) for e in exs], [e.num_blocks for e in exs]
    # equal lengths: the median question + one canvas block, and 0.3 x seq_length (next-fit's bad case)
    equal = sorted({round(GSM8K_LIKE["question"][0] * scale) + GSM8K_LIKE["template_prompt"] + canvas,
                    max(canvas + 1, round(0.3 * seq_length))})
    for mb in mbs:
        for row in efficiency_rows(L, NB, mb, seq_length, canvas, pad, "gsm8k_like"):
            emit(row)
        for eq in equal:
            for row in efficiency_rows([eq] * (64 * mb), [1] * (64 * mb), mb, seq_length, canvas, pad, f"equal_{eq}"):
                emit(row)

    if not args.efficiency_only:
        torch.manual_seed(args.seed)
        model = build_model(args, device)
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.95, 0.99), weight_decay=1e-4, fused=cuda)
        for mb in mbs:
            n_batches = args.warmup + args.steps
            if args.turns > 1:  # multi-turn SFT (data.mask_history: false): every assistant turn supervised
                convs = multiturn_examples(gsm8k_like_lengths(n_batches * mb * args.turns, args.seed + 1, scale),
                                           args.turns, canvas, seq_length, vocab, args.seed + 1)
            else:
                convs = length_examples(gsm8k_like_lengths(n_batches * mb, args.seed + 1, scale), canvas_length=canvas,
                                        seq_length=seq_length, vocab_size=vocab, seed=args.seed + 1)
            groups = [convs[i * mb:(i + 1) * mb] for i in range(len(convs) // mb)]
            for mode in args.modes.split(","):
                if mode == "off":
                    batches = [collate(g, canvas, pad_to_multiple=pad) for g in groups]
                elif mode == "on":
                    batches = [collate_packed(g, canvas, seq_length, pad_to_multiple=pad)[0] for g in groups]
                else:
                    raise SystemExit(f"--modes: unknown {mode!r} (off, on)")
                batches = [b.to(device) for b in batches]
                try:
                    emit(time_mode(model, params, opt, batches, args, device, mode, mb))
                except torch.cuda.OutOfMemoryError as e:
                    emit({"kind": "step", "packing": mode, "micro_batch": mb, "error": f"OOM: {str(e)[:300]}"})
                    torch.cuda.empty_cache()
        off = {r["micro_batch"]: r for r in results if r.get("packing") == "off" and "step_s" in r}
        for r in results:
            if r.get("packing") == "on" and "step_s" in r and r["micro_batch"] in off:
                print(f"micro-batch {r['micro_batch']}: real tokens/s {off[r['micro_batch']]['real_tokens_per_s']:.0f} "
                      f"(off) -> {r['real_tokens_per_s']:.0f} (on): "
                      f"{r['real_tokens_per_s'] / off[r['micro_batch']]['real_tokens_per_s']:.2f}x", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
