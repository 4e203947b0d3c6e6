"""Small building blocks: RMSNorm, the gated GELU MLP, rotary tables."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blockdiff.model.config import ModelConfig, RopeSpec


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu_pytorch_tanh": gelu_tanh, "gelu": F.gelu, "silu": F.silu}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"model config: hidden_activation {name!r} not supported ({sorted(ACTIVATIONS)})") from None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls on ``x`` run in: CUDA autocast's (bf16 in training), else x's."""
    return torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; the weight multiplies directly (no 1 + w). ``with_scale=False``
    is the scale-free variant used for v, the router input and the self-conditioning output."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            h = h * self.weight.float()
        return h.to(x.dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): the dense MLP and the self-conditioning block."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def inverse_frequencies(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (fp32, like the reference).

    "default": exponents over the rotated dims. "proportional": only the first
    partial_rotary_factor share of the head_dim // 2 frequency pairs rotate, with exponents
    normalised by the FULL head_dim; the other pairs get frequency 0 (identity rotation), so the
    table still spans the whole head.
    """
    if spec.kind == "proportional":
        n_rot = int(spec.partial_rotary_factor * head_dim // 2)
        exps = torch.arange(0, 2 * n_rot, 2, dtype=torch.float) / head_dim
        rotated = 1.0 / (spec.theta**exps)
        return torch.cat([rotated, torch.zeros(head_dim // 2 - n_rot)])
    dim = int(head_dim * spec.partial_rotary_factor)
    return 1.0 / (spec.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


class Rotary(nn.Module):
    """fp32 cos/sin tables per layer type, computed from explicit position ids.

    Tables stay fp32 whatever the model dtype; the rotation itself runs in fp32 (see apply_rotary).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layer_types = sorted(set(config.layer_types))
        for t in self.layer_types:
            head_dim = config.head_dims[config.layer_types.index(t)]
            inv = inverse_frequencies(config.rope[t], head_dim)
            self.register_buffer(f"inv_freq_{t}", inv, persistent=False)

    def forward(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """positions [B, L] -> {layer_type: (cos, sin)} each [B, L, head_dim] fp32."""
        out = {}
        pos = positions.float()
        for t in self.layer_types:
            inv = getattr(self, f"inv_freq_{t}").float()
            freqs = pos[..., None] * inv
            emb = torch.cat([freqs, freqs], dim=-1)
            out[t] = (emb.cos(), emb.sin())
        return out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D]; cos/sin [B, L, D] fp32. Rotates half-split pairs (i, i + D/2) in fp32."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).to(x.dtype)
