"""PEFT-format adapters: save (both tied transformers trees), load back with base checks, and the merged
tensors of an export (adapters folded in one tensor at a time, ``merged_items``)."""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from blockdiff.lora.adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DECODER_LAYERS, ENCODER_LAYERS, EXPERT_FILE,
                                     ExpertLora, LoraError, LoraLinear, PEFT_PREFIX, _cfg, _set_module, expert_adapters,
                                     lora_modules, merge_lora_, merged_weight)
from blockdiff.model.hf import names as hf_names
from blockdiff.model.hf.io import load_pretrained
from blockdiff.model.hf.save import own_state

__all__ = ["peft_adapter_payload", "write_peft_adapter", "save_peft_adapter", "merged_items", "read_peft_adapter",
           "load_peft_adapter", "load_model_with_adapter", "load_adapter"]

# ---------------------------------------------------------------------------------------- PEFT format


def _hf_module_paths(our_path: str) -> list[str]:
    """transformers module path(s) of one of our modules: layers appear in BOTH the decoder and the
    encoder tree; the self-conditioning block only in the decoder."""
    dec = hf_names.to_hf(our_path + ".weight").removesuffix(".weight")
    if dec.startswith(DECODER_LAYERS):
        return [dec, ENCODER_LAYERS + dec[len(DECODER_LAYERS):]]
    return [dec]


def _our_module_path(hf_path: str) -> tuple[str, bool]:
    """(our module path, is the encoder copy) of a transformers module path."""
    encoder = hf_path.startswith(ENCODER_LAYERS)
    if encoder:
        hf_path = DECODER_LAYERS + hf_path[len(ENCODER_LAYERS):]
    ours = hf_names.from_hf(hf_path + ".weight")
    if ours is None:
        raise LoraError(f"adapter for a different base: module {hf_path} is not part of the DiffusionGemma text "
                        "model")
    return ours.removesuffix(".weight"), encoder


def _target_regex(paths: list[str]) -> str:
    """A PEFT ``target_modules`` regex (fullmatch) naming exactly the adapted modules of both trees."""
    layer_kinds, sc = set(), set()
    for p in paths:
        parts = p.split(".")
        if parts[0] == "layers":
            layer_kinds.add((parts[2], parts[3]))
        else:
            sc.add(parts[-1])
    alts = []
    by_parent: dict[str, list[str]] = {}
    for parent, leaf in sorted(layer_kinds):
        by_parent.setdefault(parent, []).append(leaf)
    if by_parent:
        inner = "|".join(f"{re.escape(par)}\\.(?:{'|'.join(leaves)})" for par, leaves in by_parent.items())
        alts.append(f"model\\.(?:decoder|encoder\\.language_model)\\.layers\\.\\d+\\.(?:{inner})")
    if sc:
        alts.append(f"model\\.decoder\\.self_conditioning\\.(?:{'|'.join(sorted(sc))})")
    return "|".join(f"(?:{a})" for a in alts)


def _settings(model) -> dict:
    s = getattr(model, "lora_settings", None)
    if s is None:
        mods = list(lora_modules(model).values()) + list(expert_adapters(model).values())
        if not mods:
            raise LoraError("the model has no LoRA adapters to save")
        s = {"rank": mods[0].rank, "alpha": mods[0].scaling * mods[0].rank, "dropout": 0.0}
    return s


def _base_name(model) -> str | None:
    src = getattr(model, "hf_source", None)
    return src["dir"] if src else None


def peft_adapter_payload(model: nn.Module, base_model_name_or_path: str | None = None, lora_cfg=None,
                         fetch=None) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter_config dict, PEFT tensors, expert tensors) as CPU fp32 copies (small: adapters only).
    ``fetch(state name, dtype)``: the full tensor (a gather under FSDP; default: the model's own)."""
    if fetch is None:
        fetch = own_state(model)[0]
    s = dict(_settings(model))
    if lora_cfg is not None:
        s.update(rank=int(_cfg(lora_cfg, "rank", s["rank"])), alpha=float(_cfg(lora_cfg, "alpha", s["alpha"])),
                 dropout=float(_cfg(lora_cfg, "dropout", s["dropout"])))
    mods = lora_modules(model)
    tensors = {}
    for path in mods:
        A, B = (fetch(f"{path}.lora_{f}").detach().float().cpu() for f in "AB")
        for hf_path in _hf_module_paths(path):
            # one copy per tree (safetensors refuses shared storage)
            tensors[f"{PEFT_PREFIX}{hf_path}.lora_A.weight"] = A.clone()
            tensors[f"{PEFT_PREFIX}{hf_path}.lora_B.weight"] = B.clone()
    experts = {}
    for path in expert_adapters(model):
        for name in ExpertLora.NAMES:
            for leaf in (ExpertLora._a(name), ExpertLora._b(name)):
                experts[f"{path}.adapter.{leaf}"] = fetch(f"{path}.adapter.{leaf}").detach().float().cpu().clone()
    base = base_model_name_or_path if base_model_name_or_path is not None else _base_name(model)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None if base is None else os.fspath(base),
        "r": s["rank"],
        "lora_alpha": s["alpha"],
        "lora_dropout": s["dropout"],
        "target_modules": _target_regex(list(mods)) if mods else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return config, tensors, experts


def write_peft_adapter(out_dir, config: dict, tensors: dict, experts: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if experts:
        warnings.warn("PEFT cannot express blockdiff's per-expert LoRA on the 3-D expert tensors: expert adapters "
                      f"are written to {EXPERT_FILE} (read by blockdiff.lora.load_peft_adapter only); a plain "
                      "peft/transformers consumer ignores them. Use `blockdiff export RUN --merge` for a "
                      "checkpoint with every adapter folded in.", stacklevel=3)
        # r and alpha live in adapter_config.json: a header with one metadata key is the same bytes on every
        # write (safetensors orders metadata keys arbitrarily)
        save_file(experts, os.fspath(out_dir / EXPERT_FILE), metadata={"format": "pt"})
    if config["target_modules"] is None:  # experts only: nothing PEFT can load
        config = {**config, "target_modules": []}
    save_file(tensors, os.fspath(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def save_peft_adapter(model: nn.Module, out_dir, base_model_name_or_path: str | None = None, lora_cfg=None) -> Path:
    """Write a PEFT LoRA adapter directory (see the module docstring)."""
    config, tensors, experts = peft_adapter_payload(model, base_model_name_or_path, lora_cfg)
    return write_peft_adapter(out_dir, config, tensors, experts)


def merged_items(model: nn.Module, fetch, shape_of) -> list:
    """``hf_save.text_entries`` items of a LoRA model with every adapter folded in: the names, order and
    values ``merge_lora_`` then ``state_dict`` give, without changing the model. ``fetch(state name, dtype)``
    gives a full tensor (a gather under FSDP), ``shape_of(state name)`` its global shape."""
    linear, experts = lora_modules(model), expert_adapters(model)
    adapter_names = {f"{p}.lora_{f}" for p in linear for f in "AB"}
    adapter_names |= {f"{p}.adapter.{leaf(n)}" for p in experts for n in ExpertLora.NAMES
                      for leaf in (ExpertLora._a, ExpertLora._b)}
    buffers = {n for n, _ in model.named_buffers()}

    def merged(name, a_name, b_name, scaling):
        return lambda dtype: merged_weight(fetch(name), fetch(a_name), fetch(b_name), scaling).to(dtype)

    items = []
    for name in model.state_dict():
        if name in adapter_names:
            continue
        owner, _, leaf = name.rpartition(".")
        path = owner.removesuffix(".base")
        if owner.endswith(".base") and path in linear and leaf == "weight":
            produce = merged(name, f"{path}.lora_A", f"{path}.lora_B", linear[path].scaling)
            items.append((f"{path}.weight", shape_of(name), True, produce))
        elif owner in experts and leaf in ExpertLora.NAMES:
            a = experts[owner]
            produce = merged(name, f"{owner}.adapter.{a._a(leaf)}", f"{owner}.adapter.{a._b(leaf)}", a.scaling)
            items.append((name, shape_of(name), True, produce))
        else:
            items.append((name, shape_of(name), name not in buffers, lambda dtype, n=name: fetch(n, dtype)))
    return items


# ---------------------------------------------------------------------------------------- loading


def _same_base(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return True  # nothing to compare (random-init base): shapes decide
    if a == b:
        return True
    pa, pb = Path(os.path.expanduser(a)), Path(os.path.expanduser(b))
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    # hub id vs its local snapshot dir (.../models--org--name/snapshots/<rev>)
    for hub, path in ((a, b), (b, a)):
        if re.fullmatch(r"[\w.-]+/[\w.-]+", hub) and f"models--{hub.replace('/', '--')}" in path:
            return True
    return False


def read_peft_adapter(adapter_dir) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise LoraError("not a PEFT adapter directory (no adapter_config.json)", file=cfg_file) from None
    except json.JSONDecodeError as e:
        raise LoraError(f"not valid JSON: {e}", file=cfg_file) from None
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"peft_type {config.get('peft_type')!r}: only LORA adapters are supported", file=cfg_file,
                        field="peft_type")
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise LoraError(f"{flag}: true is not supported", file=cfg_file, field=flag)
    if config.get("bias", "none") != "none":
        raise LoraError("LoRA bias is not supported", file=cfg_file, field="bias")
    w_file = adapter_dir / ADAPTER_WEIGHTS
    if not w_file.is_file():
        raise LoraError(f"no {ADAPTER_WEIGHTS} (only safetensors adapters are read)", file=w_file)
    try:
        tensors = load_file(os.fspath(w_file))
        experts = load_file(os.fspath(adapter_dir / EXPERT_FILE)) if (adapter_dir / EXPERT_FILE).is_file() else {}
    except Exception as e:
        raise LoraError(f"corrupted or unreadable adapter tensors: {e}", file=adapter_dir) from None
    return config, tensors, experts


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


@torch.no_grad()
def load_peft_adapter(model: nn.Module, adapter_dir, base_model_name_or_path: str | None = None,
                      check_base: bool = True) -> nn.Module:
    """Read a PEFT LoRA adapter (as written by ``save_peft_adapter``, or by PEFT for this model family)
    into a blockdiff model, adding the adapter modules it needs. Raises LoraError ("adapter for a
    different base") when the adapter's base or tensor shapes do not match the model."""
    config, tensors, experts = read_peft_adapter(adapter_dir)
    cfg_file = Path(adapter_dir) / ADAPTER_CONFIG
    expected = base_model_name_or_path if base_model_name_or_path is not None else _base_name(model)
    if check_base and not _same_base(config.get("base_model_name_or_path"), expected):
        raise LoraError(f"adapter for a different base: it was trained on {config.get('base_model_name_or_path')!r}, "
                        f"the model was loaded from {expected!r} (pass check_base=False to override)",
                        file=cfg_file, field="base_model_name_or_path")
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    dropout = float(config.get("lora_dropout", 0.0))

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key)
        if not m:
            raise LoraError(f"unexpected tensor {key} in a LoRA adapter", file=adapter_dir, field=key)
        ours, encoder = _our_module_path(m.group(1))
        slot = factors.setdefault(ours, {})
        k = m.group(2) + ("_enc" if encoder else "")
        slot[k] = t
    existing = lora_modules(model)
    for ours, f in factors.items():
        if "A" not in f or "B" not in f:  # encoder copy only: use it
            f.setdefault("A", f.get("A_enc"))
            f.setdefault("B", f.get("B_enc"))
        if f["A"] is None or f["B"] is None:
            raise LoraError(f"adapter of {ours} lacks lora_A or lora_B", file=adapter_dir)
        for s in ("A", "B"):
            if f"{s}_enc" in f and not torch.equal(f[f"{s}_enc"], f[s]):
                raise LoraError(f"the encoder and decoder adapters of {ours} differ: blockdiff runs both passes "
                                "with one shared stack and cannot represent that", file=adapter_dir)
        try:
            target = model.get_submodule(ours)
        except AttributeError:
            raise LoraError(f"adapter for a different base: the model has no module {ours}", file=adapter_dir) from None
        if not isinstance(target, (nn.Linear, LoraLinear)):
            raise LoraError(f"adapter for a different base: {ours} is not a Linear layer", file=adapter_dir)
        out_f, in_f = target.out_features, target.in_features
        if f["A"].shape[1] != in_f or f["B"].shape[0] != out_f or f["A"].shape[0] != f["B"].shape[1]:
            raise LoraError(f"adapter for a different base: {ours} has lora_A {list(f['A'].shape)} / lora_B "
                            f"{list(f['B'].shape)}, the model's layer is [{out_f}, {in_f}]", file=adapter_dir)
        rank = f["A"].shape[0]
        if isinstance(target, LoraLinear) and target.rank == rank:
            mod = existing[ours]
            mod.scaling = scaling
        else:
            base = target.base if isinstance(target, LoraLinear) else target
            base.weight.requires_grad_(False)
            mod = LoraLinear(base, rank, alpha, dropout, scaling=scaling)
            _set_module(model, ours, mod)
        mod.lora_A.copy_(f["A"])
        mod.lora_B.copy_(f["B"])
    _load_expert_adapters(model, experts, adapter_dir, alpha, dropout)
    model.lora_settings = {"rank": r, "alpha": alpha, "dropout": dropout}
    return model


def _load_expert_adapters(model, experts: dict[str, torch.Tensor], adapter_dir, alpha, dropout) -> None:
    by_path: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in experts.items():
        path, _, leaf = key.rpartition(".adapter.")
        if not path:
            raise LoraError(f"unexpected tensor {key} in {EXPERT_FILE}", file=adapter_dir, field=key)
        by_path.setdefault(path, {})[leaf] = t
    for path, tens in by_path.items():
        try:
            ex = model.get_submodule(path)
        except AttributeError:
            raise LoraError(f"adapter for a different base: the model has no module {path}", file=adapter_dir) from None
        rank = tens["gate_up_A"].shape[1]
        adapter = ex.adapter if isinstance(ex.adapter, ExpertLora) else ExpertLora(ex, rank, alpha, dropout)
        adapter.scaling = alpha / rank
        for name, t in tens.items():
            own = getattr(adapter, name, None)
            if own is None or own.shape != t.shape:
                raise LoraError(f"adapter for a different base: {path}.adapter.{name} has shape {list(t.shape)}, "
                                f"the model expects {None if own is None else list(own.shape)}", file=adapter_dir)
            own.copy_(t)
        ex.adapter = adapter


def load_model_with_adapter(model_dir, adapter_dir, dtype: torch.dtype = torch.float32, device="cpu",
                            merge: bool = True, **load_kw) -> nn.Module:
    """Base checkpoint + adapter -> a blockdiff DiffusionGemma for generate/eval (eval mode). With
    ``merge`` (default) the adapters are folded in (fp32 sums, stored in ``dtype``): plain model, no
    inference overhead."""
    model = load_pretrained(model_dir, dtype=dtype, device=device, **load_kw)
    load_peft_adapter(model, adapter_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    if merge:
        merge_lora_(model)
    else:
        model.to(device)
    return model.eval()


def load_adapter(model: nn.Module, adapter_dir, merge: bool = True) -> nn.Module:
    """``load_peft_adapter`` then (by default) ``merge_lora_``: what generate/eval call on a loaded base."""
    load_peft_adapter(model, adapter_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    return merge_lora_(model) if merge else model
