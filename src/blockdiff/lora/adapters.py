"""LoRA modules: adapters on linear layers and on the experts' 3-D tensors, apply, merge, state."""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from blockdiff.errors import CheckpointError, ConfigError
from blockdiff.model.moe import grouped_linear

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "EXPERT_FILE", "PEFT_PREFIX", "DECODER_LAYERS", "ENCODER_LAYERS",
           "ATTN_TARGETS", "MLP_TARGETS", "LoraError", "LoraLinear", "ExpertLora", "apply_lora", "cast_frozen_base_",
           "init_lora_A_", "adapter_param_names", "base_param_name", "initial_adapter_values", "has_lora",
           "lora_modules", "expert_adapters", "merged_weight", "merge_lora_", "trainable_state_dict",
           "checkpoint_state"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPERT_FILE = "blockdiff_expert_adapters.safetensors"
PEFT_PREFIX = "base_model.model."
DECODER_LAYERS = "model.decoder.layers."
ENCODER_LAYERS = "model.encoder.language_model.layers."
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


class LoraError(CheckpointError):
    """Adapter files that cannot be used with this model."""


# ---------------------------------------------------------------------------------------- modules


@torch.no_grad()
def init_lora_A_(A: torch.Tensor) -> torch.Tensor:
    """The A factors' init, in place: kaiming-uniform (a = sqrt(5)) of [r, in], or of each expert's [r, in]
    slice of [E, r, in], drawn from the default generator of A's device."""
    for a in A.unbind(0) if A.ndim == 3 else (A,):
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return A


class LoraLinear(nn.Module):
    """y = base(x) + (dropout(x) @ A^T @ B^T) * alpha / r, base frozen; A kaiming-uniform, B zeros."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, scaling: float | None = None):
        super().__init__()
        if base.bias is not None:
            raise ConfigError("LoRA on a Linear with bias is not supported (DiffusionGemma has none)")
        self.base = base
        base.weight.requires_grad_(False)
        self.rank = rank
        self.scaling = alpha / rank if scaling is None else scaling
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=torch.float32))
        if dev.type != "meta":
            init_lora_A_(self.lora_A)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # the frozen base weight (without the adapter)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        # Under autocast the two matmuls run in bf16; outside it in x's dtype. Masters stay fp32.
        h = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return out + h * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling}"


class ExpertLora(nn.Module):
    """Per-expert adapters of the 3-D expert tensors: for expert e and tensor W [E, out, in],
    delta_e = scaling * B[e] @ A[e] with A [E, r, in] (kaiming-uniform) and B [E, out, r] (zeros).

    Applied by ``Experts.forward`` through ``delta`` on the rows already grouped by expert, with the
    same ``grouped_linear`` as the base (so EP can shard A/B along dim 0 exactly like the experts)."""

    NAMES = ("gate_up_proj", "down_proj")

    def __init__(self, experts: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 scaling: float | None = None):
        super().__init__()
        self.rank = rank
        self.scaling = alpha / rank if scaling is None else scaling
        for name in self.NAMES:
            w = getattr(experts, name)
            E, out, inp = w.shape
            A = nn.Parameter(torch.empty(E, rank, inp, device=w.device, dtype=torch.float32))
            if w.device.type != "meta":
                init_lora_A_(A)
            setattr(self, self._a(name), A)
            setattr(self, self._b(name), nn.Parameter(torch.zeros(E, out, rank, device=w.device, dtype=torch.float32)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @staticmethod
    def _a(name: str) -> str:
        return name.removesuffix("_proj") + "_A"

    @staticmethod
    def _b(name: str) -> str:
        return name.removesuffix("_proj") + "_B"

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, self._a(name)), getattr(self, self._b(name))

    def delta(self, name: str, rows: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        A, B = self.factors(name)
        h = grouped_linear(self.dropout(rows), A, counts, offsets)
        return grouped_linear(h, B, counts, offsets) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling}"


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * B @ A in fp32: [out, in] for a Linear's factors, [E, out, in] for the experts'."""
    return (B.float() @ A.float()) * scaling


def merged_weight(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The base weight with its adapter folded in, summed in fp32 (the caller picks the stored dtype)."""
    return w.float() + lora_delta(A, B, scaling).to(w.device)


# ---------------------------------------------------------------------------------------- applying


def _cfg(lora_cfg, key, default=None):
    return getattr(lora_cfg, key, default) if not isinstance(lora_cfg, dict) else lora_cfg.get(key, default)


def _target_paths(model, targets, self_conditioning: bool) -> list[str]:
    """Module paths (our names) of the Linear layers to adapt."""
    targets = list(targets or [])
    unknown = [t for t in targets if t not in ATTN_TARGETS + MLP_TARGETS]
    if unknown:
        raise ConfigError(f"unknown LoRA target(s) {unknown}: choose from {list(ATTN_TARGETS + MLP_TARGETS)} "
                          "(experts: lora.experts; self-conditioning block: lora.self_conditioning)",
                          field="lora.targets")
    paths = []
    for i, layer in enumerate(model.layers):
        for parent, names in (("self_attn", ATTN_TARGETS), ("mlp", MLP_TARGETS)):
            for name in names:
                if name in targets and isinstance(getattr(getattr(layer, parent), name, None), (nn.Linear, LoraLinear)):
                    paths.append(f"layers.{i}.{parent}.{name}")
    if self_conditioning:
        sc_names = [n for n in MLP_TARGETS if n in targets] or list(MLP_TARGETS)
        paths += [f"self_conditioning.{n}" for n in sc_names]
    return paths


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def apply_lora(model: nn.Module, lora_cfg, base_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Freeze the model and add adapters as ``lora_cfg`` says (see the module docstring).

    ``base_dtype`` (e.g. torch.bfloat16 on GPU) casts the frozen base via ``cast_frozen_base_``;
    None keeps it as is (fp32 on CPU). Returns {"trainable": n, "total": n} parameter counts.
    """
    rank, alpha, dropout = int(_cfg(lora_cfg, "rank", 16)), float(_cfg(lora_cfg, "alpha", 32.0)), \
        float(_cfg(lora_cfg, "dropout", 0.0))
    if any(isinstance(m, (LoraLinear, ExpertLora)) for m in model.modules()):
        raise ConfigError("apply_lora: the model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    for path in _target_paths(model, _cfg(lora_cfg, "targets", list(ATTN_TARGETS + MLP_TARGETS)),
                              bool(_cfg(lora_cfg, "self_conditioning", False))):
        _set_module(model, path, LoraLinear(model.get_submodule(path), rank, alpha, dropout))
    if _cfg(lora_cfg, "experts", False):
        for layer in model.layers:
            layer.experts.adapter = ExpertLora(layer.experts, rank, alpha, dropout)
    model.lora_settings = {"rank": rank, "alpha": alpha, "dropout": dropout,
                           "targets": list(_cfg(lora_cfg, "targets", []) or []),
                           "self_conditioning": bool(_cfg(lora_cfg, "self_conditioning", False)),
                           "experts": bool(_cfg(lora_cfg, "experts", False))}
    if base_dtype is not None:
        cast_frozen_base_(model, base_dtype)
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters())}


@torch.no_grad()
def cast_frozen_base_(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store every frozen floating-point matrix (ndim >= 2: projections, experts, embedding) in
    ``dtype``; 1-D parameters (norm scales, router scales) and trainable adapters are left alone.
    Returns the number of bytes saved."""
    saved = 0
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.requires_grad or p.ndim < 2 or not p.is_floating_point() or p.dtype == dtype:
                continue
            saved += p.numel() * (p.element_size() - torch.empty((), dtype=dtype).element_size())
            module._parameters[name] = nn.Parameter(p.data.to(dtype), requires_grad=False)
    return saved


def adapter_param_names(model: nn.Module) -> set[str]:
    """Names of the adapters' own parameters (the A and B factors; not the frozen bases)."""
    return {f"{path}.{name}" for path, m in model.named_modules() if isinstance(m, (LoraLinear, ExpertLora))
            for name, _ in m.named_parameters(recurse=False)}


def base_param_name(name: str, model: nn.Module) -> str:
    """The plain model's name of a parameter: ``q_proj.base.weight`` -> ``q_proj.weight``."""
    path, _, leaf = name.rpartition(".")
    if path.endswith(".base") and isinstance(model.get_submodule(path.removesuffix(".base")), LoraLinear):
        return f"{path.removesuffix('.base')}.{leaf}"
    return name


@torch.no_grad()
def initial_adapter_values(model: nn.Module, device) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, initial value of the WHOLE tensor) of every adapter parameter, one at a time, drawn in the order
    ``apply_lora`` draws them on a real device (every LoraLinear's A, then the expert adapters layer by
    layer). From the same generator state, the same values: a model built on ``meta`` (adapters left
    uninitialised) gets exactly the single-process init, on any world size, by slicing these."""
    for path, m in lora_modules(model).items():
        yield f"{path}.lora_A", init_lora_A_(torch.empty(m.rank, m.in_features, device=device))
        yield f"{path}.lora_B", torch.zeros(m.out_features, m.rank, device=device)
    for path, adapter in expert_adapters(model).items():
        E = model.get_submodule(path).num_experts  # the global count, also when this rank holds a slice
        for name in ExpertLora.NAMES:
            A, B = adapter.factors(name)
            yield f"{path}.adapter.{ExpertLora._a(name)}", init_lora_A_(torch.empty(E, *A.shape[1:], device=device))
            yield f"{path}.adapter.{ExpertLora._b(name)}", torch.zeros(E, *B.shape[1:], device=device)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, (LoraLinear, ExpertLora)) for m in model.modules())


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def expert_adapters(model: nn.Module) -> dict[str, ExpertLora]:
    """{path of the Experts module: its ExpertLora}."""
    return {n.removesuffix(".adapter"): m for n, m in model.named_modules() if isinstance(m, ExpertLora)}


@torch.no_grad()
def merge_lora_(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base (in place): LoraLinear -> plain nn.Linear with W + scaling*B@A
    (summed in fp32, stored in W's dtype); expert tensors += scaling*B_e@A_e; adapters removed."""
    for path, m in lora_modules(model).items():
        base = m.base
        base.weight.copy_(merged_weight(base.weight, m.lora_A, m.lora_B, m.scaling).to(base.weight.dtype))
        _set_module(model, path, base)
    for path, adapter in expert_adapters(model).items():
        experts = model.get_submodule(path)
        for name in ExpertLora.NAMES:
            w = getattr(experts, name)
            w.copy_(merged_weight(w, *adapter.factors(name), adapter.scaling).to(w.dtype))
        experts.adapter = None
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


# ---------------------------------------------------------------------------------------- training checkpoints


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of the parameters that train (the adapters of a LoRA model)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """What a training checkpoint stores: for a LoRA model only the adapters (meta says so), else
    the full state dict."""
    if has_lora(model):
        return trainable_state_dict(model), {"adapters_only": True}
    return model.state_dict(), {}
