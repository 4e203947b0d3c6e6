"""The frozen base of a LoRA run in a weight-only quantized format (``lora.base_quantization``).

``quantize_frozen_base_(model, fmt)`` replaces, in every layer, the attention projections (q/k/v/o), the
dense MLP (gate/up/down) and the experts' fused 3-D tensors with ``model.quantized`` containers; inside a
``LoraLinear`` only the frozen ``base`` is replaced, so the adapters (fp32 masters, bf16 compute) are
untouched. The tied embedding / LM head, the norms, the router and the self-conditioning block stay in the
base dtype (bf16 on GPU). On a ``meta`` model the containers are allocated empty (``to_empty`` then
``fill_quantized``, as ``blockdiff.train.loading`` does); on a real one the current values are quantized.

``fill_quantized(model, read, device)`` quantizes each checkpoint tensor as it is read, in row chunks, so the
bf16 copy of one chunk is the most that exists beside the quantized buffers.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from blockdiff.errors import ConfigError
from blockdiff.lora.adapters import ATTN_TARGETS, MLP_TARGETS, LoraLinear, base_param_name
from blockdiff.model.quantized import FORMATS, QuantizedLinear, QuantizedWeight

__all__ = ["BASE_QUANTIZATIONS", "quantize_frozen_base_", "quantized_weights", "has_quantized_base",
           "quantized_bytes", "fill_quantized"]

BASE_QUANTIZATIONS = ("none", *FORMATS)
EXPERT_TENSORS = ("gate_up_proj", "down_proj")
ROWS_PER_READ = 8  # dim-0 rows of an expert tensor read (and quantized) at a time: 8 experts


@torch.no_grad()
def quantize_frozen_base_(model: nn.Module, fmt: str) -> int:
    """Quantize the frozen base in place (see the module docstring); ``fmt`` "none" does nothing. Returns
    the number of tensors quantized."""
    if fmt == "none":
        return 0
    if fmt not in FORMATS:
        raise ConfigError(f"unknown base quantization {fmt!r}: choose from {list(BASE_QUANTIZATIONS)}",
                          field="lora.base_quantization")
    done = 0
    for layer in model.layers:
        for parent, names in ((layer.self_attn, ATTN_TARGETS), (layer.mlp, MLP_TARGETS)):
            for name in names:
                m = getattr(parent, name, None)
                holder, attr = (m, "base") if isinstance(m, LoraLinear) else (parent, name)
                linear = getattr(holder, attr, None)
                if isinstance(linear, nn.Linear):
                    _check_frozen(linear.weight, f"{name}")
                    setattr(holder, attr, _wrap(lambda: QuantizedLinear.from_linear(linear, fmt), name))
                    done += 1
        experts = layer.experts
        for name in EXPERT_TENSORS:
            w = getattr(experts, name)
            if isinstance(w, nn.Parameter):
                _check_frozen(w, f"experts.{name}")
                q = _wrap(lambda: QuantizedWeight.from_tensor(w.detach(), fmt), f"experts.{name}")
                delattr(experts, name)
                setattr(experts, name, q)
                done += 1
    return done


def _wrap(build, name):
    try:
        return build()
    except ValueError as e:  # e.g. nf4 on an input dimension that is not a multiple of the group
        raise ConfigError(f"{name}: {e}", field="lora.base_quantization") from None


def _check_frozen(p: torch.Tensor, name: str) -> None:
    if p.requires_grad:
        raise ConfigError(f"{name} trains, so it cannot be quantized (only a LoRA run's frozen base is)",
                          field="lora.base_quantization")


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """{plain model's parameter name (``layers.0.self_attn.q_proj.weight``): its QuantizedWeight}."""
    return {base_param_name(path, model): m for path, m in model.named_modules() if isinstance(m, QuantizedWeight)}


def has_quantized_base(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedWeight) for m in model.modules())


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the quantized buffers (this rank's expert slice under expert parallelism)."""
    return sum(m.nbytes for m in model.modules() if isinstance(m, QuantizedWeight))


@torch.no_grad()
def fill_quantized(model: nn.Module, read: Callable[[str, tuple[int, int]], torch.Tensor], device,
                   first_row: Callable[[str], int] = lambda name: 0) -> int:
    """Fill every (allocated) QuantizedWeight from ``read(plain name, (start, stop))`` (dim-0 rows of the
    WHOLE tensor, any dtype, on the CPU), quantizing on ``device`` chunk by chunk. ``first_row(name)``: the
    global row where this rank's rows start (expert parallelism). Returns the tensors filled."""
    for name, q in quantized_weights(model).items():
        n = q.shape[0]
        step = ROWS_PER_READ if q.qweight.ndim == 3 else n
        start = first_row(name)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            rows = read(name, (start + lo, start + hi)).to(device)
            q.load_rows_(lo, rows)
            del rows
    return len(quantized_weights(model))
