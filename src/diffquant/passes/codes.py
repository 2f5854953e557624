"""A quantized weight as the integer (or fp8) codes and scales that a graph stores: what a quantization
backend hands to the weight passes (`compression`, `matmul_nbits`), so that those passes rewrite ONNX
graphs without knowing which library quantized the weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WeightCodes:
    """One layer's stored weight.

    - `kind` "int8" / "fp8": `codes` int8 / float8_e4m3fn shaped like the weight, `scale` broadcastable to it
      (one value, or one per output channel).
    - `kind` "int4": `codes` (N, K) uint8 nibbles, each the int4 code + 8; `scale` (N, K / group).
    - `kind` "int8" with `scale` (N, K / group) (GGUF's Q8_0 blocks): `codes` (N, K) int8.
    - `kind` "uint4" (GGUF's Q4_1 blocks): `codes` (N, K) uint8 in 0..15, `scale` and `zero` (N, K / group), `zero`
      the integer zero points (0..15, float32): each weight scale x (code - zero).

    `exact`: the backend checked that the codes dequantize to the weight its forward multiplies by, bit for
    bit. `float_dtype`: the layer's weight dtype (a MatMulNBits' scales take the type of its input).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    kind: str
    exact: bool
    float_dtype: torch.dtype = torch.float32
    zero: torch.Tensor | None = None

    def dequantized(self) -> torch.Tensor:
        """The float32 weight of block codes (int4, uint4, int8 with one scale per group): codes x scales, bit for
        bit the fake-quantized weight when `exact`."""
        values = self.codes.float() - {"int4": 8, "uint4": 0}.get(self.kind, 0)
        if self.zero is not None:
            values = values - self.zero.float().repeat_interleave(self.group, dim=1)
        return values * self.scale.float().repeat_interleave(self.group, dim=1)

    @property
    def group(self) -> int:
        """Weights per scale along K (codes with one scale per group)."""
        return self.codes.shape[1] // self.scale.shape[1]


def pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K / 2) bytes, element 2i in the low nibble of byte i (MatMulNBits' order)."""
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
