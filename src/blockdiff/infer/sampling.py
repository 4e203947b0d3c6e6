"""Block-diffusion sampling for DiffusionGemma (semantics of transformers' ``DiffusionGemmaGenerationMixin``).

Per block: a canvas of uniform-random tokens is denoised for up to ``max_denoising_steps`` steps.
Each step runs the decoder on the canvas (self-conditioned on the previous step's logits),
divides the logits by a linearly decaying temperature, samples a denoised canvas, accepts the
lowest-entropy tokens within an entropy bound, re-noises the rest and checks the per-row
"stable and confident" stop. The block's output is the argmax of the last logits (as the
reference does); it is appended to the encoder K/V cache (only the new block is encoded) and the
next block starts, until every row has produced an EOS or ``max_new_tokens`` is reached.

Randomness is per row and per block: row ``b`` draws from a generator seeded with
``(row_seed[b], block)``. So a row's tokens do not depend on which other rows share its batch
(nor on how many steps they took), which makes batched eval equal to one-by-one eval.

The settings are ``blockdiff.infer.settings``; the per-token math (temperature, entropy, accept, sample,
stop) is ``blockdiff.infer.vocab``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from blockdiff.compiled import CompiledOrEager
from blockdiff.infer.lockstep import LOCAL_ROWS
from blockdiff.infer.settings import SamplerSettings
from blockdiff.infer.vocab import (cut_at_eos, entropy_bound_accept, new_stability_history, sample_categorical,
                                   should_stop, temperature_at, token_entropy)


class _RowRandom:
    """One generator per row, reseeded per block so rows never share or shift random streams."""

    def __init__(self, row_seeds: list[int], block: int, device: torch.device):
        self.gens = []
        for s in row_seeds:
            g = torch.Generator(device=device)
            # Large odd multiplier keeps (seed, block) pairs apart; mask to a valid 63-bit seed.
            g.manual_seed((int(s) * 1_000_003 + block * 7_919 + 1) & ((1 << 63) - 1))
            self.gens.append(g)
        self.device = device

    def block_draws(self, steps: int, length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every random number a block may use, drawn up front: (initial canvas [B, C], per-step
        uniforms [S, B, C], per-step re-noise tokens [S, B, C]). Each row's generator is read in the
        order the steps consume it (canvas, then uniforms and tokens per step), so a row's stream
        does not depend on how many steps run; nothing is drawn inside the step (CUDA graphs)."""
        canvas, uniforms, renoise = [], [], []
        for g in self.gens:
            canvas.append(torch.randint(0, vocab, (length,), generator=g, device=self.device))
            u, t = [], []
            for _ in range(steps):
                u.append(torch.rand(length, generator=g, device=self.device))
                t.append(torch.randint(0, vocab, (length,), generator=g, device=self.device))
            uniforms.append(torch.stack(u))
            renoise.append(torch.stack(t))
        return torch.stack(canvas), torch.stack(uniforms, 1), torch.stack(renoise, 1)


def _left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for b, p in enumerate(prompts):
        if p:
            ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[b, width - len(p):] = True
    return ids.to(device), valid.to(device)


def _select_rows(cache, rows: torch.Tensor):
    kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in cache.kv]
    return type(cache)(kv, cache.positions.index_select(0, rows), cache.valid.index_select(0, rows))


@dataclass
class _BlockState:
    """Everything a denoising step reads and writes, as tensors updated in place: the same buffers serve
    the eager steps and the captured CUDA graph's replays."""

    canvas: torch.Tensor  # [B, C] current noisy canvas
    argmax: torch.Tensor  # [B, C] argmax of the last logits (the block's output)
    finished: torch.Tensor  # [B] sticky per-row stop flag
    history: torch.Tensor  # [S, B, C] argmax history for the stability test
    step: torch.Tensor  # [1] long: index of the next step
    temperatures: torch.Tensor  # [steps] fp32
    uniforms: torch.Tensor  # [steps, B, C]
    renoise: torch.Tensor  # [steps, B, C]
    soft: torch.Tensor | None = None  # [B, C, H] self-conditioning input of the next step; None at step 0


def _vocab_step(model, hidden: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor, entropy_bound: float):
    """Everything over the 262k vocabulary in one function, so that compile fuses its passes: lm head
    with softcap, temperature, the sample, entropies, acceptance, argmax, and the next step's
    self-conditioning embeddings. The reference feeds the logits back in the embedding dtype (bf16
    models round there) and embeds them at the next step; embedding them here keeps [B, C, H] between
    steps instead of [B, C, V] and lets the softmax share the passes over these logits."""
    logits = model.lm_logits(hidden) / temperature
    denoised = sample_categorical(logits, uniforms)
    entropy = token_entropy(logits)
    accept = entropy_bound_accept(entropy, entropy_bound, is_entropy=True)
    soft = model.soft_embeddings(logits.to(model.embed_tokens.weight.dtype))
    return denoised, entropy, accept, logits.argmax(dim=-1), soft


_compiled_vocab_step = CompiledOrEager(_vocab_step)


def _run_layer(layer, *args):
    return type(layer).forward(layer, *args)


# dynamic=None: the prefix length (prompt, growing cache) and the batch (finished rows dropped) go
# dynamic after their first change instead of recompiling for every value
_compiled_layer = CompiledOrEager(_run_layer, dynamic=None)


@contextlib.contextmanager
def _layers_compiled(model, enabled: bool):
    """Each transformer layer through ``torch.compile`` for the duration of one ``generate`` call (fuses
    the norm, rotary, routing and residual elementwise chains, which eager runs as ~50 small kernels
    per layer). Layers that already have an instance-level forward (compiled or checkpointed by
    ``blockdiff.parallel.parallelize``) are left alone."""
    layers = [layer for layer in model.layers if "forward" not in vars(layer)] if enabled else []
    if layers:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for layer in layers:
        layer.forward = functools.partial(_compiled_layer, True, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _denoise_step(model, cache, st: _BlockState, settings: SamplerSettings, compile: bool = False) -> None:
    """One denoising step, in place on ``st``; no host sync (capturable as a CUDA graph)."""
    hidden = model.decode(st.canvas, cache, soft_embeds=st.soft)
    denoised, entropy, accept, argmax, soft = _compiled_vocab_step(
        compile, model, hidden, st.temperatures.index_select(0, st.step), st.uniforms.index_select(0, st.step)[0],
        settings.entropy_bound)
    # accept from the denoiser, re-noise every other position uniformly
    new_canvas = torch.where(accept, denoised, st.renoise.index_select(0, st.step)[0])
    # Rows that already stopped keep their argmax (their output) and canvas, as the reference does;
    # where() instead of a host-side branch. Their stop flag and logits no longer matter (finished is
    # sticky, rows are independent), so those are not frozen.
    done = st.finished[:, None]
    new_argmax = torch.where(done, st.argmax, argmax)
    new_canvas = torch.where(done, st.canvas, new_canvas)
    stop, history = should_stop(st.history, new_argmax, entropy, settings.confidence_threshold)
    st.finished |= stop
    st.canvas.copy_(new_canvas)
    st.argmax.copy_(new_argmax)
    st.history.copy_(history)
    if st.soft is None:
        st.soft = soft
    else:
        st.soft.copy_(soft)
    st.step += 1


def _capturable(model) -> bool:
    """Whether a denoising step can be captured as a CUDA graph: only the bf16 grouped-GEMM expert path keeps
    its group sizes on the device (the per-expert fallback, e.g. fp32 weights without autocast, reads them)."""
    dtype = (torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda")
             else next(model.parameters()).dtype)
    return dtype == torch.bfloat16


def denoise_block(model, cache, rng: _RowRandom, settings: SamplerSettings, canvas_length: int,
                  policy=LOCAL_ROWS) -> tuple[torch.Tensor, int]:
    """Denoise one block for every row of ``cache``. Returns (argmax block [B, C], steps run).

    On CUDA with ``settings.cuda_graphs`` the self-conditioned step is captured once per block as a
    CUDA graph and replayed (one launch per step instead of hundreds) after two eager steps: step 0 has
    no self-conditioning input, step 1 is the warm-up (and compile) the capture needs.
    The only host sync per step is the all-rows-stopped check (``policy.block_done``, blockdiff.infer.lockstep)."""
    n_steps = settings.max_denoising_steps
    B = cache.positions.shape[0]
    device = cache.positions.device
    canvas, uniforms, renoise = rng.block_draws(n_steps, canvas_length, model.config.vocab_size)
    temps = torch.tensor([temperature_at(i, n_steps, settings.t_max, settings.t_min) for i in range(n_steps)],
                         dtype=torch.float32, device=device)
    st = _BlockState(canvas=canvas, argmax=canvas.clone(), finished=torch.zeros(B, dtype=torch.bool, device=device),
                     history=new_stability_history(settings.stability_threshold, B, canvas_length, device),
                     step=torch.zeros(1, dtype=torch.long, device=device), temperatures=temps,
                     uniforms=uniforms, renoise=renoise)
    use_graph = settings.cuda_graphs and device.type == "cuda" and n_steps > 2 and _capturable(model)
    compile = settings.compile and device.type == "cuda"
    step = functools.partial(_denoise_step, model, cache, st, settings, compile)
    graph = None
    steps = 0
    while steps < n_steps:
        if graph is not None:
            graph.replay()
        elif use_graph and steps == 2:  # capture the self-conditioned step (steps 0-1 ran eagerly)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            graph.replay()
        elif use_graph and steps == 1:  # warm-up on a side stream, as CUDA-graph capture requires
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream(device).wait_stream(side)
        else:
            step()
        steps += 1
        if policy.block_done(st.finished):  # the one host sync per step: stop once every row is done
            break
    return st.argmax, steps


@torch.inference_mode()
def generate(model, prompt_ids_list: list[list[int]], settings: SamplerSettings | None = None,
             device=None, progress: Callable[[dict], None] | None = None, row_seeds: list[int] | None = None,
             reencode: bool = False, lockstep=LOCAL_ROWS, keep_stop: bool = False) -> list[list[int]]:
    """Sample a reply for each prompt; returns the new tokens of each row, cut before the first EOS
    and at ``max_new_tokens``.

    ``row_seeds`` (default ``seed + i``) fixes each row's random stream; a row with the same seed gives
    the same tokens alone or in any batch. ``reencode=True`` (debug) re-encodes the whole prefix every
    block instead of appending the block to the K/V cache. ``progress`` gets a dict per finished block.
    ``lockstep``: how the stop decisions are taken (``blockdiff.infer.lockstep``: alone, or with the other ranks).
    ``keep_stop``: each row keeps the EOS it stopped at as its last token (RL scores the stop)."""
    settings = settings or SamplerSettings()
    if not prompt_ids_list:
        return []
    if any(len(p) == 0 for p in prompt_ids_list):
        raise ValueError("every prompt needs at least one token")
    device = torch.device(device) if device is not None else model.embed_tokens.weight.device
    B = len(prompt_ids_list)
    row_seeds = list(row_seeds) if row_seeds is not None else [settings.seed + i for i in range(B)]
    if len(row_seeds) != B:
        raise ValueError(f"row_seeds has {len(row_seeds)} entries for {B} prompts")
    C = settings.canvas_length or model.config.canvas_length
    n_blocks = math.ceil(settings.max_new_tokens / C)

    saved_backend, model.attn_backend = model.attn_backend, settings.attn_backend
    try:
        with _layers_compiled(model, settings.compile and device.type == "cuda"):
            return _generate(model, prompt_ids_list, settings, device, progress, row_seeds, reencode, C, n_blocks,
                             lockstep, keep_stop)
    finally:
        model.attn_backend = saved_backend


def _generate(model, prompt_ids_list, settings, device, progress, row_seeds, reencode, C, n_blocks, policy,
              keep_stop=False):
    B, eos = len(prompt_ids_list), torch.tensor(settings.eos_token_ids or [-1], dtype=torch.long, device=device)
    prompt_ids, prompt_valid = _left_pad(prompt_ids_list, device)
    _, cache = model.encode(prompt_ids, valid=prompt_valid)
    active = torch.arange(B, device=device)  # original row index of each cache row
    blocks_of_row: list[list[torch.Tensor]] = [[] for _ in range(B)]

    for block in range(n_blocks):
        rng = _RowRandom([row_seeds[i] for i in active.tolist()], block, device)
        out, steps = denoise_block(model, cache, rng, settings, C, policy)
        active_list = active.tolist()
        for j, row in enumerate(active_list):
            blocks_of_row[row].append(out[j])
        if progress is not None:
            progress({"block": block, "steps": steps, "active": len(active_list)})
        if block == n_blocks - 1:
            break
        alive = ~torch.isin(out, eos).any(dim=-1) if settings.eos_token_ids else torch.ones_like(active, dtype=torch.bool)
        keep = policy.rows_to_keep(alive)  # rows with an EOS in this block are done: later blocks run live rows
        if keep.numel() == 0:
            break
        if reencode:
            rows = active[keep].tolist()
            prefix, valid = _left_pad([prompt_ids_list[r] for r in rows], device)
            gen = torch.stack([torch.cat(blocks_of_row[r]) for r in rows])
            _, cache = model.encode(torch.cat([prefix, gen], 1),
                                    valid=torch.cat([valid, torch.ones_like(gen, dtype=torch.bool)], 1))
        else:
            if keep.numel() < active.numel():
                cache, out = _select_rows(cache, keep), out.index_select(0, keep)
            _, cache = model.encode(out, past=cache)
        active = active[keep]

    results = []
    for row in range(B):
        tokens = torch.cat(blocks_of_row[row]).tolist()[: settings.max_new_tokens]
        results.append(cut_at_eos(tokens, settings.eos_token_ids, keep_stop))
    return results
