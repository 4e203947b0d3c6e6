"""Sampler: pure pieces equal transformers' on fixed inputs; generate() is cache-exact,
batch-invariant, multi-block, and behaves like transformers' generate on a tiny checkpoint."""

import math

import pytest
import torch
from transformers.models.diffusion_gemma import generation_diffusion_gemma as ref

from blockdiff.infer import prompting, sampling, vocab
from blockdiff.errors import ConfigError
from blockdiff.infer.sampling import generate
from blockdiff.infer.settings import SamplerSettings
from blockdiff.infer.vocab import entropy_bound_accept, should_stop, temperature_at, token_entropy
from helpers import load_blockdiff, make_hf_checkpoint, peaked_tiny_model

C = 8


def fixed_logits(B=3, L=C, V=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # mixed sharpness: some rows/positions confident, some flat, so the bound cuts mid-canvas
    scale = torch.tensor([0.3, 3.0, 12.0])[torch.randint(0, 3, (B, L), generator=g)]
    return torch.randn(B, L, V, generator=g) * scale[..., None]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls: extra threads only add contention (10-100x slower on a busy 2-core box).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_model():
    # float64: cached vs re-encoded prefixes (and padded vs unpadded batches) differ by fp32 reduction
    # order (~1e-6), which the cold test temperature amplifies enough to flip a rare near-tie sample.
    return peaked_tiny_model().double()


# ---- settings -------------------------------------------------------------------------------


def test_defaults_equal_reference_defaults():
    d = ref.DiffusionGemmaGenerationConfig._get_default_generation_params()
    s = SamplerSettings()
    assert (s.max_new_tokens, s.max_denoising_steps, s.t_min, s.t_max) == (
        d["max_new_tokens"], d["max_denoising_steps"], d["t_min"], d["t_max"])
    assert s.entropy_bound == d["sampler_config"].entropy_bound
    assert (s.stability_threshold, s.confidence_threshold) == (d["stability_threshold"], d["confidence_threshold"])
    assert s.eos_token_ids == (1, 106, 50)


def test_from_generation_config_reads_transformers_file(tmp_path):
    cfg = ref.DiffusionGemmaGenerationConfig(
        max_new_tokens=64, max_denoising_steps=12, sampler_config=ref.EntropyBoundSamplerConfig(entropy_bound=0.25),
        t_min=0.3, t_max=0.9, stability_threshold=2, confidence_threshold=0.01, eos_token_id=[1, 7])
    cfg.save_pretrained(tmp_path)
    s = SamplerSettings.from_generation_config(tmp_path)
    assert (s.max_new_tokens, s.max_denoising_steps, s.entropy_bound, s.t_min, s.t_max) == (64, 12, 0.25, 0.3, 0.9)
    assert (s.stability_threshold, s.confidence_threshold, s.eos_token_ids) == (2, 0.01, (1, 7))
    s2 = SamplerSettings.from_generation_config(tmp_path, max_denoising_steps=5, seed=3, t_min=None)
    assert (s2.max_denoising_steps, s2.seed, s2.t_min) == (5, 3, 0.3)
    assert SamplerSettings.from_generation_config(cfg).entropy_bound == 0.25  # object form
    # a file full of nulls (what transformers writes for a bare model) keeps the defaults
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "generation_config.json").write_text('{"t_min": null, "sampler_config": null}')
    assert SamplerSettings.from_generation_config(tmp_path / "g") == SamplerSettings()
    (tmp_path / "bare").mkdir()  # no generation_config.json at all: defaults
    assert SamplerSettings.from_generation_config(tmp_path / "bare") == SamplerSettings()
    with pytest.raises(ConfigError):
        SamplerSettings.from_generation_config({}, nonsense=1)
    with pytest.raises(ConfigError):
        SamplerSettings(t_min=0.9, t_max=0.8)


# ---- pure pieces vs the reference ---------------------------------------------------------


@pytest.mark.parametrize("n,t_max,t_min", [(48, 0.8, 0.4), (5, 1.0, 0.1), (1, 0.7, 0.2)])
def test_temperature_schedule_matches_reference(n, t_max, t_min):
    proc = ref.LinearTemperatureScheduleLogitsProcessor(t_min=t_min, t_max=t_max, max_denoising_steps=n)
    x = torch.ones(1, 1, 1)
    # the reference loops cur_step = N..1 (generation_diffusion_gemma.py, `reversed(range(1, N + 1))`)
    for step, cur_step in enumerate(reversed(range(1, n + 1))):
        want = 1.0 / proc(None, x, cur_step=cur_step).item()
        assert temperature_at(step, n, t_max, t_min) == pytest.approx(want, rel=1e-6)
    assert temperature_at(0, n, t_max, t_min) == pytest.approx(t_max)


@pytest.mark.parametrize("bound", [0.1, 0.5, 3.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_bound_accept_matches_reference(bound, seed):
    logits = fixed_logits(seed=seed)
    B, L, V = logits.shape
    sampler = ref.EntropyBoundSampler(ref.EntropyBoundSamplerConfig(entropy_bound=bound), L, V, 4)
    current = torch.zeros(B, L, dtype=torch.long)
    denoised = torch.ones(B, L, dtype=torch.long)
    accepted = sampler.accept_canvas(current, denoised, logits, cur_step=1)
    ours = entropy_bound_accept(logits, bound)
    assert torch.equal(ours, sampler.accepted_token_mask)
    assert torch.equal(ours, accepted.bool())
    assert torch.equal(entropy_bound_accept(token_entropy(logits), bound), ours)  # entropy form
    assert ours.any(dim=-1).all()  # the lowest-entropy token is always accepted
    torch.testing.assert_close(token_entropy(logits), torch.distributions.Categorical(logits=logits).entropy())


@pytest.mark.parametrize("S", [0, 1, 2])
def test_stopping_matches_reference(S):
    B, L, V = 3, C, 16
    g = torch.Generator().manual_seed(S)
    crit = ref.StableAndConfidentStoppingCriteria(stability_threshold=S, confidence_threshold=0.05)
    history = vocab.new_stability_history(S, B, L, "cpu")
    base = torch.randint(0, V, (B, L), generator=g)
    for step in range(6):
        argmax = base.clone()
        if step % 3 == 1:
            argmax[0, 0] = (argmax[0, 0] + 1) % V  # row 0 becomes unstable now and then
        sharp = torch.full((B,), 40.0)
        sharp[2] = 0.5 if step < 4 else 40.0  # row 2 unconfident until step 4
        logits = torch.randn(B, L, V, generator=g) + sharp[:, None, None] * torch.nn.functional.one_hot(argmax, V)
        want = crit(argmax, logits)
        got, history = should_stop(history, argmax, token_entropy(logits), 0.05)
        assert torch.equal(got, want), step


def test_sample_categorical_is_a_categorical_sampler():
    logits = torch.tensor([[[0.0, 1.0, -math.inf, 2.0]]]).expand(1, 20000, 4).contiguous()
    u = torch.rand(1, 20000, generator=torch.Generator().manual_seed(0))
    draws = vocab.sample_categorical(logits, u)
    freq = torch.bincount(draws.flatten(), minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0, 0], -1), atol=0.015, rtol=0)
    assert freq[2] == 0
    edge = vocab.sample_categorical(logits[:, :2], torch.tensor([[0.0, 1.0 - 1e-9]]))
    assert edge.tolist() == [[0, 3]]


@pytest.mark.parametrize("V,chunk", [(1000, 64), (4096, 512), (7, 512)])
def test_sample_categorical_equals_the_full_inverse_cdf(V, chunk):
    """The two-level walk (chunk sums, then one chunk) picks the token a float64 full-vocabulary
    inverse CDF picks, including rows with -inf logits and a vocabulary that is not a multiple of the chunk."""
    g = torch.Generator().manual_seed(V)
    logits = 3 * torch.randn(2, 64, V, generator=g)
    logits[0, 0, : V // 2] = -math.inf
    logits[1, :, -3:] = -math.inf  # the last (padded) chunk partly impossible
    u = torch.rand(2, 64, generator=g)
    cdf = torch.cumsum(torch.softmax(logits.double(), -1), -1)
    want = torch.searchsorted(cdf, (u.double() * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    assert torch.equal(vocab.sample_categorical(logits, u, chunk=chunk), want.clamp(max=V - 1))
    top = torch.tensor([[[0.0, 1.0, 2.0, 3.0] + [-math.inf] * 4]])  # last chunk all impossible
    assert vocab.sample_categorical(top, torch.tensor([[1.0 - 1e-9]]), chunk=4).item() == 3


# ---- generate -------------------------------------------------------------------------------

PROMPTS = [[2, 11, 12, 13, 14, 15, 16], [2, 20, 21], [2, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39]]


def gen_settings(**kw):
    # Cold and permissive (accept every token) so the random model converges: on this model rows 1
    # and 2 meet the stop rule within 8 steps while row 0 does not (per-row stopping is exercised).
    base = dict(max_new_tokens=24, max_denoising_steps=8, eos_token_ids=(), seed=5,
                entropy_bound=1e3, t_max=0.05, t_min=0.01)
    base.update(kw)
    return SamplerSettings(**base)


@pytest.mark.slow
def test_generate_multiblock_cache_equals_reencode(tiny_model):
    events = []
    s = gen_settings()
    cached = generate(tiny_model, PROMPTS, s, progress=events.append)
    full = generate(tiny_model, PROMPTS, s, reencode=True)
    assert [len(o) for o in cached] == [24, 24, 24]
    assert cached == full
    assert [e["block"] for e in events] == [0, 1, 2]
    assert all(1 <= e["steps"] <= 8 for e in events)
    assert all(0 <= t < tiny_model.config.vocab_size for o in cached for t in o)
    assert generate(tiny_model, PROMPTS, s) == cached  # deterministic in the seed
    assert generate(tiny_model, PROMPTS, gen_settings(seed=6)) != cached


@pytest.mark.slow
def test_generate_batch_equals_alone(tiny_model):
    s = gen_settings(max_new_tokens=16)
    batched = generate(tiny_model, PROMPTS, s)
    steps_alone = []
    for i, p in enumerate(PROMPTS):
        events = []
        assert generate(tiny_model, [p], s, row_seeds=[s.seed + i], progress=events.append) == [batched[i]]
        steps_alone.append([e["steps"] for e in events])
    # some row stopped early alone (so in the batch it was frozen while others went on)
    assert any(st < s.max_denoising_steps for row in steps_alone for st in row), steps_alone
    # reordering the batch with the same per-row seeds gives the same rows
    order = [2, 0, 1]
    shuffled = generate(tiny_model, [PROMPTS[i] for i in order], s, row_seeds=[s.seed + i for i in order])
    assert shuffled == [batched[i] for i in order]


@pytest.mark.slow
def test_generate_eos_cut_and_row_dropping(tiny_model):
    s = gen_settings()
    free = generate(tiny_model, PROMPTS, s)
    eos = free[1][10]  # a token row 1 produces in its second block
    with_eos = generate(tiny_model, PROMPTS, gen_settings(eos_token_ids=(eos,)))
    for row_free, row_eos in zip(free, with_eos):
        # later blocks are unchanged by other rows stopping (per-row, per-block random streams)
        assert row_eos == vocab.cut_at_eos(row_free, (eos,))
    assert len(with_eos[1]) <= 10
    kept = generate(tiny_model, PROMPTS, gen_settings(eos_token_ids=(eos,)), keep_stop=True)  # RL scores the stop
    for row_free, row_kept in zip(free, kept):
        assert row_kept == vocab.cut_at_eos(row_free, (eos,), keep_stop=True)
    assert kept[1] == with_eos[1] + [eos]
    # max_new_tokens not a multiple of the canvas: truncated
    assert [len(o) for o in generate(tiny_model, PROMPTS[:1], gen_settings(max_new_tokens=13))] == [13]


def test_generate_text_uses_chat_template(monkeypatch):
    from blockdiff.data import load_tiny_tokenizer
    from blockdiff.data.chat import render_generation_prompt

    tok = load_tiny_tokenizer()
    model = peaked_tiny_model(vocab=len(tok))
    conv = [{"role": "user", "content": "Tom has 3 apples."}]
    seen = []
    real = sampling.generate

    def spy(model, prompts, settings, **kw):
        seen.extend(prompts)
        return real(model, prompts, settings, **kw)

    monkeypatch.setattr(sampling, "generate", spy)
    eos = prompting.eos_ids_for_tokenizer(tok)
    assert eos == (1, 106, 50) == tuple(tok.convert_tokens_to_ids(["<eos>", "<turn|>", "<|tool_response>"]))
    out = prompting.generate_text(model, tok, [conv, conv + [{"role": "assistant", "content": "x"}]],
                                 gen_settings(max_new_tokens=8, eos_token_ids=eos))
    prompt = render_generation_prompt(tok, conv)
    assert seen == [prompt, prompt] and all(isinstance(o, str) for o in out)


def test_one_step_block_equals_transformers(tmp_path):
    """One denoising step from the same start canvas: our block == transformers' generate block
    (the output is the argmax of the tempered logits, no randomness involved)."""
    ckpt, hf = make_hf_checkpoint(tmp_path, canvas=C)
    model = load_blockdiff(ckpt)
    prompt = torch.tensor([[2, 9, 8, 7, 6, 5]])
    start = torch.randint(0, 128, (1, C), generator=torch.Generator().manual_seed(1))
    want = hf.generate(prompt, decoder_input_ids=start, max_new_tokens=C, max_denoising_steps=1,
                       eos_token_id=None).sequences[:, prompt.shape[1]:]

    class FixedStart(sampling._RowRandom):
        def tokens(self, length, vocab):
            return start

    _, cache = model.encode(prompt)
    with torch.inference_mode():
        got, steps = sampling.denoise_block(model, cache, FixedStart([0], 0, torch.device("cpu")),
                                            SamplerSettings(max_denoising_steps=1), C)
    assert steps == 1 and torch.equal(got, want)


def test_behaves_like_transformers_generate(tmp_path):
    ckpt, hf = make_hf_checkpoint(tmp_path, canvas=C)
    model = load_blockdiff(ckpt)
    prompt = [2, 9, 8, 7, 6, 5]
    kw = dict(max_new_tokens=2 * C, max_denoising_steps=3, eos_token_id=None)
    torch.manual_seed(0)
    theirs = hf.generate(torch.tensor([prompt]), **kw).sequences[0, len(prompt):].tolist()
    ours = generate(model, [prompt], SamplerSettings.from_generation_config(
        ckpt, max_new_tokens=2 * C, max_denoising_steps=3, eos_token_ids=()))[0]
    assert len(theirs) == len(ours) == 2 * C  # both run whole canvases to max_new_tokens
    # with an EOS both cut/pad after it at a canvas-multiple boundary of generated blocks
    eos = ours[3]
    ours_eos = generate(model, [prompt], SamplerSettings(max_new_tokens=2 * C, max_denoising_steps=3,
                                                         eos_token_ids=(eos,)))[0]
    assert len(ours_eos) <= 3 and eos not in ours_eos


def test_cuda_only_switches_do_not_change_cpu_sampling(tiny_model):
    s = gen_settings(max_new_tokens=16)
    ref = generate(tiny_model, PROMPTS, s)
    off = generate(tiny_model, PROMPTS, gen_settings(max_new_tokens=16, cuda_graphs=False, compile=False))
    assert off == ref


@pytest.mark.slow
def test_compiled_layers_are_installed_for_one_generate_call_only(tiny_model, monkeypatch):
    """CUDA sampling compiles the layers for the duration of generate; here torch.compile is an identity
    wrapper that counts calls, so the wiring (every layer through the compiled function, same tokens,
    forwards restored, layers with their own instance forward left alone) is checked on the CPU."""
    from blockdiff.compiled import CompiledOrEager

    calls = []

    def counting_compile(fn, **kw):
        def run(*args):
            calls.append(args[0])
            return fn(*args)
        return run

    monkeypatch.setattr(torch, "compile", counting_compile)
    monkeypatch.setattr(sampling, "_compiled_layer", CompiledOrEager(sampling._run_layer, dynamic=None))
    s = gen_settings(max_new_tokens=16, cuda_graphs=False, compile=False)
    ref = generate(tiny_model, PROMPTS, s)
    with sampling._layers_compiled(tiny_model, True):
        assert all("forward" in vars(layer) for layer in tiny_model.layers)
        got = generate(tiny_model, PROMPTS, s)
    assert got == ref
    assert {id(layer) for layer in calls} == {id(layer) for layer in tiny_model.layers}
    assert not any("forward" in vars(layer) for layer in tiny_model.layers)
    own = tiny_model.layers[0].forward
    tiny_model.layers[0].forward = own  # an instance-level forward (as activation checkpointing installs)
    try:
        calls.clear()
        with sampling._layers_compiled(tiny_model, True):
            generate(tiny_model, PROMPTS, s)
        assert id(tiny_model.layers[0]) not in {id(layer) for layer in calls} and calls
        assert tiny_model.layers[0].forward is own
    finally:
        del tiny_model.layers[0].forward
