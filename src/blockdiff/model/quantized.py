"""Weight-only quantized storage of a frozen base (plain torch: no torchao, no bitsandbytes).

Formats (``FORMATS``), for a weight ``W [..., rows, in]`` (a Linear's [out, in], the experts' [E, out, in]):

- ``int8``: per-row absmax scale ``s = max|row| / 127`` (fp32), ``q = round(W / s)`` in int8;
  ``|W - q s| <= s / 2``.
- ``fp8``: float8 e4m3 (``torch.float8_e4m3fn``) with a per-row scale ``s = max|row| / 448``; 3 mantissa
  bits: relative error <= 2^-4 for normal values, absolute <= 2^-10 s in the subnormal range.
- ``nf4``: 4-bit NormalFloat codes (QLoRA's 16 quantiles of N(0, 1) scaled to [-1, 1]) per group of
  ``NF4_GROUP`` = 64 consecutive elements of a row, with the group's absmax as fp32 scale; two codes per
  byte (element 2j in the low nibble, 2j+1 in the high one). Error <= absmax * (largest code gap) / 2.

``QuantizedWeight`` holds ``qweight`` + ``scale`` as buffers (frozen: no gradient, no optimizer state; not
in the state dict: they are derived from the checkpoint, re-quantized on every load). ``dequantize(dtype)``
rebuilds the weight in ``dtype`` chunk by chunk (at most ``CHUNK_ELEMENTS`` fp32 temporaries).
``QuantizedLinear`` is the frozen Linear over one; its forward and backward each dequantize the weight and
free it (``_DequantLinear``): autograd never saves the bf16 weight, so under activation checkpointing or
without it only the quantized bytes stay resident.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from blockdiff.model.layers import compute_dtype

FORMATS = ("int8", "nf4", "fp8")
NF4_GROUP = 64
FP8_MAX = 448.0  # largest finite float8 e4m3fn
CHUNK_ELEMENTS = 1 << 23  # elements per (de)quantization chunk: bounds the fp32 / index temporaries
# QLoRA's NormalFloat-4 code book (the bitsandbytes "nf4" values), ascending
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
NF4_MAX_HALF_GAP = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:])) / 2
_TINY = torch.finfo(torch.float32).tiny


def storage_layout(shape, fmt: str) -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...]]:
    """(qweight shape, qweight dtype, scale shape) of a ``shape`` weight stored as ``fmt``."""
    *lead, cols = shape
    if fmt == "int8":
        return tuple(shape), torch.int8, (*lead, 1)
    if fmt == "fp8":
        return tuple(shape), torch.float8_e4m3fn, (*lead, 1)
    if fmt == "nf4":
        if cols % NF4_GROUP:
            raise ValueError(f"nf4 needs the input dimension to be a multiple of {NF4_GROUP}, got shape {list(shape)}")
        return (*lead, cols // 2), torch.uint8, (*lead, cols // NF4_GROUP)
    raise ValueError(f"unknown base quantization {fmt!r} (choose from {list(FORMATS)})")


def storage_bytes(shape, fmt: str) -> int:
    """Bytes ``QuantizedWeight`` allocates for a ``shape`` weight in ``fmt``."""
    qshape, qdtype, sshape = storage_layout(shape, fmt)
    return math.prod(qshape) * torch.empty((), dtype=qdtype).element_size() + 4 * math.prod(sshape)


def quantize(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scale) of ``w`` (any float dtype; computed in fp32 on w's device)."""
    w = w.float()
    if fmt in ("int8", "fp8"):
        top = 127.0 if fmt == "int8" else FP8_MAX
        scale = w.abs().amax(-1, keepdim=True) / top  # 0 for an all-zero row: q = 0 reproduces it exactly
        x = (w / scale.clamp_min(_TINY)).clamp_(-top, top)
        return (x.round_().to(torch.int8) if fmt == "int8" else x.to(torch.float8_e4m3fn)), scale
    storage_layout(w.shape, fmt)  # checks the format and the group divisibility
    groups = w.unflatten(-1, (-1, NF4_GROUP))
    scale = groups.abs().amax(-1)
    x = groups / scale.clamp_min(_TINY)[..., None]
    code = torch.tensor(NF4_CODE, device=w.device)
    idx = torch.bucketize(x, (code[1:] + code[:-1]) / 2).to(torch.uint8).flatten(-2)  # nearest code
    return idx[..., 0::2] | (idx[..., 1::2] << 4), scale


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """The weight ``qweight`` / ``scale`` stand for, in ``dtype`` (fp32 arithmetic)."""
    if fmt in ("int8", "fp8"):
        return (qweight.float() * scale).to(dtype)
    code = torch.tensor(NF4_CODE, device=qweight.device)
    idx = torch.stack([qweight & 0xF, qweight >> 4], dim=-1).flatten(-2).long()
    values = code[idx].unflatten(-1, (-1, NF4_GROUP)) * scale[..., None]
    return values.flatten(-2).to(dtype)


class QuantizedWeight(nn.Module):
    """A frozen weight of logical shape ``shape`` stored as ``fmt`` (see the module docstring). Dim 0 may be
    sliced from outside (expert parallelism keeps an EP rank's experts): ``shape`` follows the buffers."""

    def __init__(self, shape, fmt: str, device=None):
        super().__init__()
        qshape, qdtype, sshape = storage_layout(shape, fmt)
        self.fmt, self.cols = fmt, shape[-1]
        self.register_buffer("qweight", torch.empty(qshape, dtype=qdtype, device=device), persistent=False)
        self.register_buffer("scale", torch.empty(sshape, dtype=torch.float32, device=device), persistent=False)

    @classmethod
    @torch.no_grad()
    def from_tensor(cls, w: torch.Tensor, fmt: str) -> "QuantizedWeight":
        q = cls(tuple(w.shape), fmt, device=w.device)
        if w.device.type != "meta":
            q.load_rows_(0, w)
        return q

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.qweight.shape[:-1], self.cols)

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scale.nbytes

    @torch.no_grad()
    def load_rows_(self, start: int, w: torch.Tensor) -> None:
        """Quantize ``w`` (rows [start, start + len(w)) of dim 0, any device) into the buffers, in chunks."""
        for lo, hi in _chunks(w):
            q, s = quantize(w[lo:hi].to(self.qweight.device), self.fmt)
            self.qweight[start + lo:start + hi].copy_(q)
            self.scale[start + lo:start + hi].copy_(s)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=dtype, device=self.qweight.device)
        for lo, hi in _chunks(out):
            out[lo:hi] = dequantize(self.qweight[lo:hi], self.scale[lo:hi], self.fmt, dtype)
        return out

    def _apply(self, fn, recurse=True):
        # ``model.to(dtype)`` would cast the fp32 scales and the fp8 codes: only devices move
        for name, t in self._buffers.items():
            moved = fn(t)
            self._buffers[name] = moved if moved.dtype == t.dtype else t.to(device=moved.device)
        return self

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, fmt={self.fmt}"


def _chunks(t: torch.Tensor):
    """[lo, hi) ranges of dim 0 of about ``CHUNK_ELEMENTS`` elements each."""
    n = t.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, t[:1].numel()))
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


class _DequantLinear(torch.autograd.Function):
    """x @ W^T with W dequantized in forward and again in backward (never saved for backward)."""

    @staticmethod
    def forward(ctx, x, weight: QuantizedWeight):
        dtype = compute_dtype(x)
        ctx.weight, ctx.dtype, ctx.x_dtype = weight, dtype, x.dtype
        return F.linear(x.to(dtype), weight.dequantize(dtype))

    @staticmethod
    def backward(ctx, grad):
        return (grad.to(ctx.dtype) @ ctx.weight.dequantize(ctx.dtype)).to(ctx.x_dtype), None


class QuantizedLinear(nn.Module):
    """A frozen bias-free Linear whose weight is a ``QuantizedWeight`` (name: ``<linear>.weight``)."""

    def __init__(self, weight: QuantizedWeight):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str) -> "QuantizedLinear":
        if linear.bias is not None:
            raise ValueError("quantized Linear layers have no bias (DiffusionGemma's have none)")
        return cls(QuantizedWeight.from_tensor(linear.weight.detach(), fmt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantLinear.apply(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.weight.fmt}"
