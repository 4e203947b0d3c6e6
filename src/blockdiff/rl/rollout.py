"""Rollouts: prompts from chat JSONL, G completions each from the current policy, rewards and advantages.

A row of ``data.train_path`` is an SFT chat row: the prompt is the conversation up to its last assistant
turn (rendered as the generation prompt), the reference answer that turn's ``#### N`` (the eval's
``extract_answer``). At step s the P prompts are the step's slice of the seeded per-epoch order (as SFT
reads its rows) and completion g of the step's prompt p is sampled with the row seed
``rollout_seed(seed, s * P + p, g)``: a function of the global prompt index and the completion index
only, so rollouts are identical on any world size, batch split and after a resume. With several ranks the
completions are split over them (``periodic_eval.generate_across_ranks``: lockstep sampling of one sharded
model) and every rank receives all of them, so rewards and advantages need no further exchange.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from blockdiff.data.chat import render_generation_prompt, reply_end_ids
from blockdiff.errors import DataError
from blockdiff.infer.evaluate import question_and_gold
from blockdiff.infer.prompting import decode_reply
from blockdiff.infer.sampling import SamplerSettings
from blockdiff.rl.advantages import group_advantages, weigh_negatives
from blockdiff.rl.elbo import canvas_reply
from blockdiff.rl.rewards import RewardTerm, eval_exact, score
from blockdiff.train.step import step_sample_indices
from blockdiff.train.periodic_eval import generate_across_ranks

log = logging.getLogger("blockdiff")


@dataclass
class Prompt:
    ids: list[int]  # the rendered generation prompt
    question: str  # the last user message (what user rewards get as ``prompt``)
    reference: str | None  # the normalised reference answer


class PromptSet:
    """The prompts of an RL run; rows whose prompt leaves no room for one canvas block are skipped or refused
    (``data.prompt_too_long``), as SFT treats them."""

    def __init__(self, path, tokenizer, *, canvas_length: int, seq_length: int, prompt_policy: str = "skip",
                 split: str = "train"):
        from blockdiff.data.jsonl import load_dataset_rows

        self.prompts: list[Prompt] = []
        self.n_rows = self.n_skipped_prompt_too_long = 0
        for line, row in load_dataset_rows(path, split=split, with_lines=True):
            self.n_rows += 1
            try:
                context, question, gold = question_and_gold(row)
                ids = render_generation_prompt(tokenizer, context)
            except DataError as e:
                raise e.with_location(file=str(path), line=line) from None
            if len(ids) + canvas_length > seq_length:
                if prompt_policy == "fail":
                    raise DataError(f"prompt is {len(ids)} tokens; prompt + one canvas block ({canvas_length}) "
                                    f"exceeds seq_length {seq_length}", file=str(path), line=line, field="messages")
                self.n_skipped_prompt_too_long += 1
                continue
            self.prompts.append(Prompt(ids, question, gold))
        if not self.prompts:
            raise DataError(f"no usable prompts: {self.n_rows} rows read, {self.n_skipped_prompt_too_long} too long "
                            f"for seq_length {seq_length}", file=str(path))

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]

    def stats(self) -> dict[str, int]:
        return {"n_rows": self.n_rows, "n_kept": len(self.prompts),
                "n_skipped_prompt_too_long": self.n_skipped_prompt_too_long}


def rollout_seed(seed: int, global_prompt: int, completion: int, group_size: int) -> int:
    """The sampler's row seed of completion ``completion`` of the global prompt ``global_prompt`` (distinct for
    every pair; the sampler mixes it with the block index)."""
    return seed * 1_000_000_007 + global_prompt * group_size + completion


@dataclass
class Rollout:
    """One step's completions, prompt-major (completion g of the step's prompt p at p * G + g)."""

    prompts: list[Prompt]  # per completion
    completions: list[list[int]]  # the sampled tokens before the stop
    replies: list[list[int]]  # each completion as SFT's canvas holds a reply (``elbo.canvas_reply``): what RL scores
    texts: list[str]
    rewards: torch.Tensor  # [N] float32
    accuracy: torch.Tensor  # [N] gsm8k exact match
    parts: dict[str, list[float]]  # unweighted reward terms per completion
    advantages: torch.Tensor  # [N] float32
    seconds: float


def sample_rollout(model, tokenizer, prompts: PromptSet, step: int, *, prompts_per_step: int, group_size: int,
                   seed: int, sampler: SamplerSettings, terms: list[RewardTerm], advantage: str, adv_eps: float,
                   dist, negative_weight: float = 1.0, dtype_name: str = "float32") -> Rollout:
    """The completions, rewards and advantages of ``step`` (collective when several ranks: every rank calls it)."""
    P, G = prompts_per_step, group_size
    indices = step_sample_indices(step, P, len(prompts), seed)
    chosen = [prompts[i] for i in indices for _ in range(G)]
    seeds = [rollout_seed(seed, step * P + p, g, G) for p in range(P) for g in range(G)]
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        sampled = generate_across_ranks(model, [p.ids for p in chosen], sampler, device=dist.device,
                                        row_seeds=seeds, dist=dist, dtype_name=dtype_name, keep_stop=True)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    stops = set(sampler.eos_token_ids or ())
    end = reply_end_ids(tokenizer, stops)
    replies = [canvas_reply(c, end) for c in sampled]
    completions = [c[:-1] if c and c[-1] in stops else c for c in sampled]
    texts = [decode_reply(tokenizer, c) for c in completions]
    rewards, accuracy, parts = [], [], {t.name: [] for t in terms}
    for p, text in zip(chosen, texts):
        total, got = score(terms, p.question, text, p.reference)
        rewards.append(total)
        accuracy.append(eval_exact(p.question, text, p.reference))
        for name, v in got.items():
            parts[name].append(v)
    r = torch.tensor(rewards, dtype=torch.float32)
    return Rollout(chosen, completions, replies, texts, r, torch.tensor(accuracy), parts,
                   weigh_negatives(group_advantages(r, G, advantage, adv_eps), negative_weight), seconds)
