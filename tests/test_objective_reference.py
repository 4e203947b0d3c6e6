"""The recipe's loss and the gradient of EVERY parameter (the tied embedding included) equal a plain
autograd implementation on transformers' own DiffusionGemmaForBlockDiffusion (the specification),
loaded from the same checkpoint, with self-conditioning off, on, and mixed per example.

The oracle, per example: the encoder over the clean sequence gives the next-token CE; the scored block
is transformers' forward over ``prefix = prompt + clean blocks before it`` and the block's noisy canvas
(the block-causal training mask gives each block exactly this context, see
test_model_training_forward.py), once without gradients for ``self_conditioning_logits`` and once with
them (and the example's coin as ``self_conditioning_mask``). Written out plainly: no chunking, no fusion,
no index tricks. The inputs hold the pad id (in prompts, responses and the noise), so the embedding's
``padding_idx`` matters.

Tolerance (fp32, relative error of each gradient tensor's norm): 1e-5 for the tied embedding, 5e-5 for the
rest; measured: at most 6.5e-6 for the embedding and 2.1e-5 elsewhere (small norm / scale gradients of the
randomised model), against 0.16 for the embedding when the soft-embedding matmul gets no gradient."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from blockdiff.model.hf.names import to_hf
from blockdiff.objective.loss import ObjectiveSettings, compute_loss, count_scored, draw_noise
from helpers import C, V, batch_of, load_blockdiff, make_hf_checkpoint

PAD = 0
PROMPTS, BLOCKS = [5, 7, 3, 6], [2, 1, 3, 2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ckpt, _ = make_hf_checkpoint(tmp_path_factory.mktemp("ref"), seed=4, vocab=V, canvas=C)
    ref = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(ckpt, dtype=torch.float32).eval()
    dec = ref.model.decoder
    assert ref.lm_head.weight is dec.embed_tokens.weight is ref.model.encoder.get_input_embeddings().weight
    assert dec.embed_tokens.padding_idx == PAD
    return ckpt, ref


def reference_loss(hf, batch, noise, self_conditioning: bool, reduction: str) -> torch.Tensor:
    cap = hf.config.text_config.final_logit_softcapping

    def logits(hidden):
        return cap * torch.tanh(hf.lm_head(hidden).float() / cap)

    ar_sums, ar_counts, diffusion, scored = [], [], 0.0, 0
    for b, (p, n) in enumerate(zip(PROMPTS, BLOCKS)):
        x = batch.input_ids[b : b + 1, : p + n * C]
        enc = hf.model.encoder(input_ids=x).last_hidden_state
        ar_sums.append(F.cross_entropy(logits(enc[0, :-1]), x[0, 1:], reduction="sum"))
        ar_counts.append(x.shape[1] - 1)
        k = int(noise.block[b])
        prefix, canvas = x[:, : p + k * C], noise.noisy[b : b + 1, k * C : (k + 1) * C]
        sc = {}
        if self_conditioning:
            with torch.no_grad():  # pass 1
                sc["self_conditioning_logits"] = hf(input_ids=prefix, decoder_input_ids=canvas).logits
            sc["self_conditioning_mask"] = noise.self_condition[b : b + 1]
        out = hf(input_ids=prefix, decoder_input_ids=canvas, **sc).logits[0]
        diffusion = diffusion + F.cross_entropy(out, noise.clean[b, k * C : (k + 1) * C], reduction="sum")
        scored += C
    if reduction == "token":
        ar = sum(ar_sums) / sum(ar_counts)
    else:  # per-example mean, then the mean over the examples
        ar = sum(s / c for s, c in zip(ar_sums, ar_counts)) / len(ar_sums)
    return diffusion / scored + ar


def noisy_batch_with_pads(sc_prob: float):
    batch = batch_of(PROMPTS, BLOCKS, seed=2)
    ids = batch.input_ids
    ids[0, 1] = ids[1, 7 + 2] = ids[2, 3 + 5] = ids[3, 2] = PAD  # prompts and responses (never first: a zero row)
    for seed in range(100):  # mixed coins, and some scored block after the first
        noise = draw_noise(batch, torch.arange(4) + 10, seed=seed, vocab_size=V, eps=0.5, sc_prob=sc_prob)
        coins = set(noise.self_condition.tolist())
        if (noise.block > 0).any() and (sc_prob != 0.5 or coins == {True, False}):
            break
    noise.noisy[0, 2] = noise.noisy[2, 9] = PAD  # a pad token in the noisy canvas of scored blocks too
    noise.block[0], noise.block[2] = 0, 2
    return batch, noise


@pytest.mark.slow
@pytest.mark.parametrize("sc_prob,reduction", [(0.0, "token"), (1.0, "token"), (0.5, "token"), (0.5, "example")],
                         ids=["sc-off", "sc-on", "sc-mixed", "sc-mixed-example"])
def test_recipe_gradients_equal_transformers(models, sc_prob, reduction):
    ckpt, ref = models
    ours = load_blockdiff(ckpt)
    batch, noise = noisy_batch_with_pads(sc_prob)
    # chunks smaller than the canvas: the chunked soft-embedding and CE paths really chunk
    settings = ObjectiveSettings(self_conditioning_prob=sc_prob, eps=0.5, ar_loss_reduction=reduction, chunk_tokens=5)
    out = compute_loss(ours, batch, noise, settings, *count_scored(batch, noise, settings))
    out["loss"].backward()

    ref.zero_grad(set_to_none=True)
    expected = reference_loss(ref, batch, noise, sc_prob > 0, reduction)
    expected.backward()

    torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=0)
    names = [n for n, _ in ours.named_parameters()]
    assert "embed_tokens.weight" in names and len(names) > 100
    for name, p in ours.named_parameters():
        r = ref.get_parameter(to_hf(name)).grad
        assert p.grad is not None and r is not None, name
        if not r.any():  # the self-conditioning MLP's input weights without any self-conditioned example
            assert not p.grad.any(), name
            continue
        err = float((p.grad - r).norm() / r.norm())
        assert err <= (1e-5 if name == "embed_tokens.weight" else 5e-5), f"{name}: relative gradient error {err:.2e}"
