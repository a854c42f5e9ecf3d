"""MXFP4 expert weights as the published gpt-oss checkpoints store them, dequantized on read.

Layout (`quantization_config.quant_method: mxfp4`): a weight `X` of an experts module ([experts, in, out] once
loaded) is stored as `X_blocks` (uint8 [experts, out, in / 32, 16]: each byte two FP4 (E2M1) codes, the low
nibble first) and `X_scales` (uint8 [experts, out, in / 32]: one power-of-two exponent per 32 values, biased by
127). The value is FP4 x 2^(scale - 127); the rows come back transposed to [experts, in, out], the layout of the
unquantized `X`. This is transformers' `integrations/mxfp4.py` `convert_moe_packed_tensors` (checked against it
in tests/test_gpt_oss.py), computed here in float32: every dequantized value is exact in float32 and in the bf16
transformers produces by default.
"""

from __future__ import annotations

import torch

BLOCKS, SCALES = "_blocks", "_scales"
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def is_mxfp4(config: dict) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == "mxfp4"


def dequantized_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """[experts, out, groups, 16] blocks -> the [experts, in, out] weight they hold."""
    *lead, rows, groups, pairs = blocks_shape
    return (*lead, groups * pairs * 2, rows)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 weight of `blocks` [.., out, groups, 16] with `scales` [.., out, groups]: [.., in, out]."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    blocks = blocks.to(torch.uint8)
    values = torch.empty(*blocks.shape[:-1], blocks.shape[-1] * 2, dtype=torch.float32)
    values[..., 0::2] = lut[(blocks & 0x0F).long()]
    values[..., 1::2] = lut[(blocks >> 4).long()]
    values = torch.ldexp(values, scales.to(torch.int32).unsqueeze(-1) - 127)
    return values.flatten(-2).transpose(-1, -2).contiguous()
