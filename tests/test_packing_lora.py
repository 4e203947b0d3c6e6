"""Packing + LoRA: a packed micro-batch of multi-turn conversations gives the loss and the adapter
gradients of the same conversations run one by one (per-token normalisation by the global counts), and
a LoRA + packing + multi-turn run goes through the training loop end to end.

Tolerances (fp32 on CPU, only the summation order differs): losses atol/rtol 1e-5; every adapter
gradient tensor max|diff| <= 2e-4 * max|g| + 1e-6 (measured up to 6e-5 * max|g| with the reweighted loss,
whose 1/t weights amplify the rounding; a float64 model agrees to 2e-7, the rest being the fp32 logits)."""

import json

import pytest
import torch

from helpers import C, V, random_example, randomize_lora_b, tiny_model

from blockdiff.data.canvas import collate, collate_packed
from blockdiff.lora import apply_lora
from blockdiff.objective.loss import ObjectiveSettings, compute_loss, count_scored, draw_noise

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["all_supervised", "reweighted"])
def test_lora_packed_equals_conversations_unpacked(loss_type):
    model = tiny_model().train()
    apply_lora(model, {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ALL, "self_conditioning": True,
                       "experts": True})
    randomize_lora_b(model, seed=5, std=0.05)  # zero-init B would make every A gradient 0
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n or ".adapter." in n for n in adapters)

    exs = [random_example(4, [1, 2], sample_id=20, seed=11), random_example(3, [1], sample_id=21, seed=12),
           random_example(6, [2], sample_id=22, seed=13), random_example(5, [1, 1], sample_id=23, seed=14),
           random_example(2, [1], sample_id=24, seed=15)]
    stream = torch.tensor([500, 501, 502, 503, 504])
    settings = ObjectiveSettings(loss_type=loss_type, eps=0.2, self_conditioning_prob=0.5, ar_loss_weight=0.7)
    kw = dict(seed=9, vocab_size=V, eps=0.2, sc_prob=0.5)

    packed, order = collate_packed(exs, C, seq_length=40)
    assert packed.input_ids.shape[0] < len(exs) and packed.segment_table().shape[1] > 2  # packed, multi-turn
    n_packed = draw_noise(packed, stream[order], **kw)
    alone = [(collate([e], C), stream[i:i + 1]) for i, e in enumerate(exs)]
    alone = [(b, draw_noise(b, s, **kw)) for b, s in alone]
    counts = count_scored(packed, n_packed, settings)  # the global counts: every conversation's tokens
    assert counts == tuple(sum(c) for c in zip(*(count_scored(b, n, settings) for b, n in alone)))

    out = compute_loss(model, packed, n_packed, settings, *counts)
    grads = torch.autograd.grad(out["loss"], list(adapters.values()))
    ref = {k: torch.zeros(()) for k in ("loss", "diffusion_loss", "ar_loss")}
    ref_grads = [torch.zeros_like(p) for p in adapters.values()]
    for b, n in alone:  # each conversation on its own, normalised by the same global counts
        o = compute_loss(model, b, n, settings, *counts)
        for k in ref:
            ref[k] = ref[k] + o[k].detach()
        for acc, g in zip(ref_grads, torch.autograd.grad(o["loss"], list(adapters.values()))):
            acc += g
    for k in ref:
        torch.testing.assert_close(out[k].detach(), ref[k], atol=1e-5, rtol=1e-5)
    for name, g, r in zip(adapters, grads, ref_grads):
        scale, diff = float(r.abs().max()), float((g - r).abs().max())
        assert diff <= 2e-4 * scale + 1e-6, f"{name}: max|diff| {diff:.3g} vs max|g| {scale:.3g}"
    assert sum(float(g.abs().sum()) > 0 for g in grads) == len(grads)  # every adapter is exercised
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: nothing accumulated


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:PEFT cannot express")  # expert adapters: blockdiff's own file
def test_lora_packing_multiturn_train_run(tmp_path):
    """blockdiff.train.loop with LoRA + packing + every assistant turn supervised: runs, logs the packing
    efficiency, the first step's loss equals the unpacked LoRA run's, and the adapter is exported."""
    from blockdiff.config.schema import demo_config_path, load_config
    from blockdiff.data.synthetic import generate_multiturn
    from blockdiff.train.metrics import read_metrics
    from blockdiff.train.loop import train

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_multiturn(24, seed=3)))
    rows = {}
    for packing in ("true", "false"):
        cfg = load_config(demo_config_path(), [
            "--data.train_path", str(data), "--train.output_dir", str(tmp_path / packing), "--model.num_layers", "2",
            "--data.seq_length", "256", "--data.packing", packing, "--data.mask_history", "false",
            "--lora.enabled", "true", "--lora.rank", "4", "--lora.experts", "true",
            "--train.max_steps", "3" if packing == "true" else "1", "--train.global_batch_size", "8",
            "--train.micro_batch_size", "4", "--train.log_every", "1", "--logging.progress", "false",
            "--logging.tensorboard", "false", "--checkpoint.every_steps", "0",
            "--checkpoint.export_final", packing])
        run = train(cfg)
        rows[packing] = [r for r in read_metrics(run) if "loss" in r]
    on, off = rows["true"], rows["false"]
    assert [r["step"] for r in on] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in on)
    assert on[0]["loss"] == pytest.approx(off[0]["loss"], rel=1e-5)
    assert on[0]["packing_efficiency"] >= off[0]["packing_efficiency"]
    assert on[0]["packing_efficiency"] > off[0]["packing_efficiency"]  # multi-turn lengths vary: packing helps
    export = tmp_path / "true" / "export"
    assert (export / "adapter" / "adapter_config.json").is_file() and (export / "config.json").is_file()
