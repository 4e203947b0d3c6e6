"""Checkpoints in NVIDIA ModelOpt's NVFP4 layout (``nvidia/diffusiongemma-26B-A4B-it-NVFP4``), read as plain
tensors: every NVFP4 weight is dequantized to fp32 as it is read (a LoRA run then re-quantizes it into its
``lora.base_quantization``, or keeps it in the base dtype).

The layout (ModelOpt's unified HF export; ``hf_quant_config.json`` ``{"quantization": {"quant_algo": "NVFP4",
"group_size": 16}}`` and/or ``config.json`` ``quantization_config`` with ``quant_method: "modelopt"``): a
quantized Linear ``X`` stores

- ``X.weight`` uint8 [out, in / 2]: two FP4 (e2m1) codes per byte, element 2j in the low nibble, 2j+1 in
  the high one; code bits ``s e e m`` -> sign * (0, 0.5, 1, 1.5, 2, 3, 4, 6)[eem];
- ``X.weight_scale`` float8 e4m3 [out, in / 16]: one scale per 16 consecutive elements of a row;
- ``X.weight_scale_2`` fp32 scalar (per tensor) and ``X.input_scale`` (activations; unused here):

  ``W[r, c] = e2m1(code[r, c]) * float(weight_scale[r, c // 16]) * weight_scale_2``.

The experts are stored per expert: ``...experts.N.{gate,up,down}_proj.*``; they are presented under the fused
names transformers uses (``experts.gate_up_proj`` [E, 2I, H] = each expert's gate rows then up rows,
``experts.down_proj`` [E, H, I]). Tensors without a ``weight_scale`` (norms, router, embedding, excluded
modules) are read as stored.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from blockdiff.errors import CheckpointError

QUANT_CONFIG = "hf_quant_config.json"
GROUP = 16
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
SUPPORTED = "unquantized (bf16 / fp16 / fp32) checkpoints, or NVIDIA ModelOpt NVFP4 (quant_method 'modelopt', " \
            "quant_algo 'NVFP4')"
_EXPERT = re.compile(r"^(?P<experts>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_COMPANIONS = ("weight_scale", "weight_scale_2", "input_scale")


def source_quantization(ckpt_dir: Path, raw_config: dict) -> str | None:
    """"nvfp4" for a ModelOpt NVFP4 checkpoint, None for an unquantized one; any other quantization is refused
    with one message naming what is supported."""
    qc = raw_config.get("quantization_config")
    hq = Path(ckpt_dir) / QUANT_CONFIG
    if qc is None and not hq.is_file():
        return None
    if qc is not None:
        method, algo, where = qc.get("quant_method"), qc.get("quant_algo"), ("config.json", "quantization_config")
    else:
        try:
            algo = json.loads(hq.read_text()).get("quantization", {}).get("quant_algo")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"unreadable quantization config: {e}", file=hq) from None
        method, where = "modelopt", (QUANT_CONFIG, "quantization.quant_algo")
    if method == "modelopt" and str(algo).upper() == "NVFP4":
        return "nvfp4"
    raise CheckpointError(f"quantization {method!r} / {algo!r} is not supported; blockdiff reads {SUPPORTED}",
                          file=Path(ckpt_dir) / where[0], field=where[1])


def dequantize_nvfp4(packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """fp32 [..., 2 * packed.shape[-1]] of one NVFP4 tensor (see the module docstring)."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).long()
    magnitude = torch.tensor(E2M1, device=packed.device)[codes & 0x7]
    values = torch.where(codes >= 8, -magnitude, magnitude)
    block = scale.float().repeat_interleave(GROUP, dim=-1)
    return values * block * scale_2.float()


class NVFP4Layout:
    """The tensors of an NVFP4 checkpoint by the names of the unquantized model: ``names`` = {name: file} (as
    ``weight_map``), ``read(name, rows, stored)`` with ``stored(checkpoint name, rows)`` reading one stored
    tensor (or its dim-0 rows)."""

    def __init__(self, weight_map: dict[str, str]):
        scaled = {n.removesuffix(".weight_scale") for n in weight_map if n.endswith(".weight_scale")}
        self.names: dict[str, str] = {}
        self.quantized: set[str] = set()  # unquantized-model names of NVFP4 weights
        self.experts: dict[str, int] = {}  # fused expert name -> number of experts
        for name, file in weight_map.items():
            m = _EXPERT.match(name)
            if m:
                fused = f"{m['experts']}.{'down_proj' if m['proj'] == 'down_proj' else 'gate_up_proj'}"
                self.names.setdefault(fused, file)
                self.experts[fused] = max(self.experts.get(fused, 0), int(m["e"]) + 1)
            elif any(name.endswith(f".{c}") for c in _COMPANIONS) and name.rsplit(".", 1)[0] in scaled:
                continue
            else:
                self.names[name] = file
                if name.endswith(".weight") and name.removesuffix(".weight") in scaled:
                    self.quantized.add(name)

    def derived(self, name: str) -> bool:
        return name in self.quantized or name in self.experts

    def read(self, name: str, rows: tuple[int, int] | None, stored) -> torch.Tensor:
        if name in self.experts:
            lo, hi = rows if rows is not None else (0, self.experts[name])
            base = name.rsplit(".", 1)[0]
            projs = ("down_proj",) if name.endswith("down_proj") else ("gate_proj", "up_proj")
            return torch.stack([torch.cat([self._linear(f"{base}.{e}.{p}", None, stored) for p in projs])
                                for e in range(lo, hi)])
        return self._linear(name.removesuffix(".weight"), rows, stored)

    @staticmethod
    def _linear(prefix: str, rows, stored) -> torch.Tensor:
        return dequantize_nvfp4(stored(f"{prefix}.weight", rows), stored(f"{prefix}.weight_scale", rows),
                                stored(f"{prefix}.weight_scale_2", None))
