"""Spread of the RL log-likelihood estimator (``blockdiff.rl.elbo``) over its noise draws, for two checkpoints.

    python examples/dllm_rl/elbo_variance.py --model A_DIR --other B_DIR --data prompts.jsonl [--draws 64]

For a few prompts, a completion sampled from A: the std over draws of one-draw ELBO estimates under A, and of
the log-ratio elbo_B - elbo_A with the draws shared (what ``blockdiff rl`` does) and independent. Prints JSON.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    from transformers import AutoTokenizer

    from blockdiff.config.schema import DataSection
    from blockdiff.data.jsonl import read_chat_jsonl
    from blockdiff.infer import prompting
    from blockdiff.infer.evaluate import question_and_gold, settings_for_checkpoint
    from blockdiff.infer.sampling import generate
    from blockdiff.data.chat import render_generation_prompt, reply_end_ids
    from blockdiff.model.diffusion_gemma import DiffusionGemma
    from blockdiff.objective.loss import ObjectiveSettings
    from blockdiff.rl.elbo import canvas_reply, completion_example, elbo, elbo_micro_batch, elbo_settings

    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--other", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--draws", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    a = DiffusionGemma.from_pretrained(args.model, attn_backend="sdpa").eval()
    b = DiffusionGemma.from_pretrained(args.other, attn_backend="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = read_chat_jsonl(args.data)[: args.prompts]
    prompts = [render_generation_prompt(tok, question_and_gold(r)[0]) for r in rows]
    sampler = prompting.settings_for_tokenizer(settings_for_checkpoint(args.model, tok, max_new_tokens=a.config.canvas_length), tok)
    end = reply_end_ids(tok, sampler.eos_token_ids)
    replies = [canvas_reply(c, end) for c in generate(a, prompts, sampler, keep_stop=True)]
    C = a.config.canvas_length
    data = DataSection(train_path="-", seq_length=4 * C, canvas_length=C)
    settings = elbo_settings(ObjectiveSettings())
    stats = {"single": [], "shared": [], "independent": [], "elbo": []}
    for i, (pr, reply) in enumerate(zip(prompts, replies)):
        ex = completion_example(pr, reply, canvas_length=C, seq_length=4 * C, eos_id=a.config.eos_token_id,
                                sample_id=i)

        def one_draw(model, first):
            streams = [[first + d] for d in range(args.draws)]
            batch, noise = elbo_micro_batch([ex] * args.draws, streams, settings, data, seed=0,
                                            vocab_size=a.config.vocab_size, device_type="cpu",
                                            scored_lengths=[len(reply)] * args.draws)
            with torch.no_grad():
                return elbo(model, batch, noise, settings, 1)

        ea, eb, eb_other = one_draw(a, 0), one_draw(b, 0), one_draw(b, 10_000)
        stats["elbo"].append(ea.mean().item())
        stats["single"].append(ea.std().item())
        stats["shared"].append((eb - ea).std().item())
        stats["independent"].append((eb_other - ea).std().item())
    mean = {k: sum(v) / len(v) for k, v in stats.items()}
    print(json.dumps({"prompts": len(prompts), "draws": args.draws, "mean_elbo_nats_per_token": mean["elbo"],
                      "std_one_draw_elbo": mean["single"], "std_log_ratio_shared_draws": mean["shared"],
                      "std_log_ratio_independent_draws": mean["independent"]}, indent=1))


if __name__ == "__main__":
    main()
