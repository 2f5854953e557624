"""4-bit weights in Quark's modules: which layers a per-group recipe cannot take (and why), the codes and
scales of a quantized weight, nibble packing (saved artifacts and the ONNX MatMulNBits export), and the
bits per weight a quantized denoiser stores.

An int4 weight's group scales, and an SVDQuant layer's smoothing divisors and low-rank branch, are
rounded to float16 values before the codes are taken from them (`fp16_grid`), so that they are stored
in fp16 exactly (as GGUF, NNCF and ONNX Runtime's fp16 MatMulNBits models store theirs): 4.25 bits per
weight at group 64 instead of 4.5 with fp32 scales, the same codes up to a 2**-11 relative change of a
scale.

Why hand-written: Quark exports per-group weights neither to safetensors in a form its own reload reads
back into fake-quant modules nor to ONNX (its weight-folding pass fails on per-group scales), and no
library packs Quark's codes; the packing itself is two nibbles per byte, low nibble first, the layout
of ONNX Runtime's MatMulNBits (see `diffquant.passes.matmul_nbits`).
"""

from __future__ import annotations

import torch

from diffquant.core.errors import DiffquantError
from diffquant.core.recipes import Recipe
from diffquant.passes.codes import pack_nibbles, unpack_nibbles
from diffquant.quantization.backends.quark import internals

# OCP MX FP4 (e2m1): the value of each 4-bit code; bit 3 is the sign.
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E8M0_BIAS = 127
_FP16_MAX = float(torch.finfo(torch.float16).max)
_FP16_TINY = 2.0 ** -24  # the smallest positive float16 (subnormal): a scale rounded to fp16 stays above 0


def fp16_grid(tensor: torch.Tensor, positive: bool = False, bits: int = 11) -> torch.Tensor:
    """`tensor` rounded to the nearest float16 value (clamped into its range; at least the smallest
    positive float16 when `positive`, as a scale or divisor must be), kept in its own dtype. `bits` < 11
    keeps that many significant bits of each value (a GGUF recipe's scales, `recipes.gguf_scale_bits`),
    so that its product with a small integer code is exact in fp16."""
    clamped = tensor.clamp(_FP16_TINY if positive else -_FP16_MAX, _FP16_MAX)
    rounded = clamped.to(torch.float16)
    if bits < 11:
        mantissa, exponent = torch.frexp(rounded.float())  # mantissa in [0.5, 1)
        trimmed = torch.ldexp(torch.round(mantissa * 2.0 ** bits) / 2.0 ** bits, exponent)
        rounded = trimmed.clamp(_FP16_TINY if positive else -_FP16_MAX, _FP16_MAX).to(torch.float16)
    return rounded.to(tensor.dtype)


def fits_fp16(tensor: torch.Tensor) -> bool:
    """True when every value of the float `tensor` is a float16 value (it is stored in fp16 exactly)."""
    return tensor.is_floating_point() and torch.equal(tensor.to(torch.float16).to(tensor.dtype), tensor)


def stored_bits(tensor: torch.Tensor) -> int:
    """Bits a side tensor of a 4-bit layer (scale, smoothing divisor, branch) takes as saved: 16 per value
    when it fits fp16 (`pack_state` stores it so), else its own dtype."""
    return (16 if fits_fp16(tensor) else 8 * tensor.element_size()) * tensor.numel()


def is_int8_blocks(layer: torch.nn.Module) -> bool:
    """True for an int8 weight with one scale per group of inputs (GGUF's Q8_0 blocks)."""
    quantizer = internals.weight_quantizer(layer)
    return weight_kind(layer) == "int8" and getattr(quantizer, "group_size", None) not in (None, 0, -1)


def round_scales_fp16(module: torch.nn.Module, bits: int = 11) -> None:
    """Give every int4 / uint4 (and int8 block) weight quantizer of `module` its scale rounded to fp16 (with `bits`
    significant bits; observing the weight first where it has not yet), so that its codes are taken on the
    scale that is stored. A uint4 weight observed here (round to nearest) takes the zero point of its min-max
    range on the rounded scale, as Quark's observer computes it on its own; one whose scale and zero point
    were set (GPTQ's) keeps its zero point."""
    for layer in module.modules():
        kind = weight_kind(layer)
        if kind in ("int4", "uint4") or is_int8_blocks(layer):
            observing = internals.weight_quantizer(layer).is_observer_enabled
            scale = fp16_grid(internals.observe_weight(layer), positive=True, bits=bits)
            internals.set_weight_scale(layer, scale)
            if kind == "uint4" and observing:
                internals.set_weight_zero_point(layer, min_max_zero_point(layer.weight.detach().float(), scale))


def min_max_zero_point(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quark's integer zero point of each group of `weight` (N, K) on `scale` (N, K / group): -min(w, 0) / scale
    rounded, in 0..15, so that 0 is on the grid and the group's range starts at its minimum."""
    groups = weight.reshape(scale.shape[0], scale.shape[1], -1)
    low = groups.amin(dim=-1).clamp(max=0)
    return torch.round(-low / scale).clamp(0, 15).to(torch.int32)


def unfit_reason(layer: torch.nn.Module, recipe: Recipe) -> str | None:
    """Why the per-group (4-bit, or GGUF Q8_0) weight of `recipe` cannot take `layer` (a float or Quark
    Linear/Conv2d), else None."""
    if not recipe.per_group:
        return None
    weight = layer.weight
    if weight.dim() != 2:
        return f"Conv2d: {'4-bit' if recipe.four_bit else 'int8 block'} per-group weights are for Linear layers"
    group = recipe.weight.granularity.size
    if weight.shape[1] % group:
        return f"input width {weight.shape[1]} is not a multiple of the group size {group}"
    return None


def unfit_layers(module: torch.nn.Module, recipe: Recipe, excluded: list[str]) -> dict[str, str]:
    """name -> reason for each Linear/Conv2d of the float `module` (outside `excluded`) that the recipe's
    per-group weight cannot take; they take the recipe's fallback or stay float. Empty for other recipes."""
    if not recipe.per_group:
        return {}
    skip = set(excluded)
    return {name: reason for name, layer in module.named_modules()
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and name not in skip
            and (reason := unfit_reason(layer, recipe)) is not None}


def weight_kind(layer: torch.nn.Module) -> str | None:
    """'int4', 'uint4', 'mxfp4', 'int8', 'fp8' for a layer whose weight Quark quantizes, else None."""
    quantizer = internals.weight_quantizer(layer)
    if quantizer is None:
        return None
    dtype = str(quantizer.dtype).split(".")[-1]
    return {"int4": "int4", "uint4": "uint4", "fp4": "mxfp4", "int8": "int8", "fp8_e4m3": "fp8"}.get(dtype)


def weight_bits(layer: torch.nn.Module) -> int:
    """Bits that `layer`'s weight takes stored: codes plus scales (int4: fp16 when they fit it, see
    `pack_state`; MX: e8m0; 8-bit: fp32), or fp32 when float. A uint4 weight's zero points count 16 bits each,
    as GGUF's Q4_1 stores them (the fp16 minimum m = -scale x z of each block): 5 bits per weight at group 32."""
    kind = weight_kind(layer)
    elements = layer.weight.numel()
    if kind is None:
        return 32 * elements
    scale = internals.weight_quantizer(layer).scale.detach()
    scale_bits = 8 * scale.numel() if kind == "mxfp4" else (
        stored_bits(scale) if kind in ("int4", "uint4") or is_int8_blocks(layer) else 32 * scale.numel())
    zero_bits = 16 * scale.numel() if kind == "uint4" else 0
    return (4 if kind in ("int4", "uint4", "mxfp4") else 8) * elements + scale_bits + zero_bits


def group_codes(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(nibbles, scale, kind) of a Linear with a 4-bit per-group weight: `nibbles` (N, K) uint8 in 0..15
    (int4: code + 8; uint4: the code q, whose weight is scale x (q - zero point), see `zero_points`; mxfp4: the
    e2m1 code, sign in bit 3) and `scale` (N, K / group) float32, such that `dequantize_groups(nibbles, scale,
    kind)` (with the zero points for uint4) equals Quark's fake-quantized weight bit for bit."""
    kind = weight_kind(layer)
    fake = internals.fake_quantized_weight(layer)  # (N, K)
    scale = internals.weight_quantizer(layer).scale.detach().float()  # (N, K / group)
    steps = fake / scale.repeat_interleave(fake.shape[1] // scale.shape[1], dim=1)
    if kind == "int4":
        nibbles = (torch.round(steps).clamp(-8, 7) + 8).to(torch.uint8)
    elif kind == "uint4":
        zero = zero_points(layer).repeat_interleave(fake.shape[1] // scale.shape[1], dim=1)
        nibbles = (torch.round(steps) + zero).clamp(0, 15).to(torch.uint8)
    elif kind == "mxfp4":
        table = torch.tensor(E2M1)
        magnitude = steps.abs()
        index = torch.searchsorted(table, magnitude).clamp(max=len(E2M1) - 1)
        if not torch.equal(table[index], magnitude):
            raise AssertionError("an MXFP4 weight is not on the e2m1 grid times its scale")
        nibbles = (index + 8 * torch.signbit(steps)).to(torch.uint8)
    else:
        raise ValueError(f"not a 4-bit per-group weight: {kind}")
    return nibbles, scale, kind


def zero_points(layer: torch.nn.Module) -> torch.Tensor:
    """The integer zero points (N, K / group) of a Linear's uint4 per-group weight, as float32 (0..15)."""
    return internals.weight_zero_point(layer).float().reshape(internals.weight_quantizer(layer).scale.shape)


def dequantize_groups(nibbles: torch.Tensor, scale: torch.Tensor, kind: str,
                      zero: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight (N, K) of `group_codes`' nibbles and scales: (nibble - 8) * scale for int4, (nibble -
    zero) * scale for uint4 (`zero`: its zero points, (N, K / group))."""
    if kind == "int4":
        values = nibbles.to(torch.float32) - 8
    elif kind == "uint4":
        values = nibbles.to(torch.float32) - zero.float().repeat_interleave(nibbles.shape[1] // scale.shape[1], dim=1)
    else:
        values = torch.tensor(E2M1)[(nibbles & 7).long()] * torch.where(nibbles >= 8, -1.0, 1.0)
    return values * scale.repeat_interleave(nibbles.shape[1] // scale.shape[1], dim=1)


# --- save and reload: weights as codes ----------------------------------------------------------

_PACKED4, _INT8, _E8M0 = ".weight_packed4", ".weight_int8", ".weight_scale_e8m0"
_SCALE, _ZERO = internals.WEIGHT_SCALE_KEY, internals.WEIGHT_ZERO_POINT_KEY
# An SVDQuant layer's smoothing divisor and low-rank branch (Quark's ErrorCorrectedModule's names).
_SIDE = (".smooth_factor", ".correction.l1.weight", ".correction.l2.weight")


def _exact(weight: torch.Tensor, layer: torch.nn.Module) -> bool:
    """True when `weight` (float32, from codes) is the layer's fake-quantized weight in the layer's dtype."""
    fake = internals.weight_quantizer(layer)(layer.weight.detach())
    return torch.equal(weight.to(fake.dtype), fake)


def pack_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the module's un-frozen state dict) with each 4-bit weight replaced by its packed nibbles
    (and an MX scale by its e8m0 exponent byte) and each int8 weight by its int8 codes: the float master
    weights are not needed again, since the fake-quantized weight is a fixed point of its quantizer.
    A weight whose codes would not give its fake-quantized weight exactly keeps its float master weight.
    int4 / uint4 scales and SVDQuant's divisors and branches are stored in fp16 where their values fit it
    (loading them back into their float32 buffers is exact), uint4 zero points (0..15) in uint8."""
    packed = dict(state)
    for key, tensor in state.items():
        if key.endswith(_SIDE) and tensor.dtype == torch.float32 and fits_fp16(tensor):
            packed[key] = tensor.to(torch.float16)
    for name, layer in module.named_modules():
        kind = weight_kind(layer)
        if kind in ("int4", "uint4", "mxfp4"):
            nibbles, scale, _ = group_codes(layer)
            zero = zero_points(layer) if kind == "uint4" else None
            if not _exact(dequantize_groups(nibbles, scale, kind, zero), layer):
                continue
            del packed[f"{name}.weight"]
            packed[name + _PACKED4] = pack_nibbles(nibbles).contiguous()
            if kind in ("int4", "uint4") and fits_fp16(scale):
                packed[name + _SCALE] = packed[name + _SCALE].to(torch.float16)
            if kind == "uint4":
                packed[name + _ZERO] = zero.to(torch.uint8).contiguous()
            if kind == "mxfp4":
                del packed[name + _SCALE]
                exponent = torch.frexp(scale)[1] - 1 + _E8M0_BIAS  # scale = 2**(byte - 127)
                packed[name + _E8M0] = exponent.to(torch.uint8).contiguous()
        elif kind == "int8":
            codes, scale, _ = internals.weight_codes(layer)
            if _exact(codes.float() * scale, layer):
                del packed[f"{name}.weight"]
                packed[name + _INT8] = codes.contiguous()
                if is_int8_blocks(layer) and fits_fp16(packed[name + _SCALE]):
                    packed[name + _SCALE] = packed[name + _SCALE].to(torch.float16)
    return packed


def unpack_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `pack_state` for the transformed (Quark) `module`: codes become the fake-quantized
    float weights, whose fake quantization with the saved scales gives the same weights again. A state
    saved with float weights (before packing existed) passes through."""
    modules = dict(module.named_modules())
    state = dict(state)
    for key in [k for k in state if k.endswith((_PACKED4, _INT8))]:
        name = key.rsplit(".", 1)[0]
        layer = modules.get(name)
        if layer is None or weight_kind(layer) is None:
            raise DiffquantError(f"the saved quantized state holds codes for {name!r}, which this model does "
                                 "not quantize that way: quantize the model again")
        codes = state.pop(key)
        if key.endswith(_INT8):
            weight = codes.float() * internals.broadcast_scale(layer, state[name + _SCALE].float(), codes.shape)
        else:
            kind = weight_kind(layer)
            if kind == "mxfp4":
                exponent = state.pop(name + _E8M0).int() - _E8M0_BIAS
                state[name + _SCALE] = torch.ldexp(torch.ones(exponent.shape), exponent)
            zero = state[name + _ZERO] if kind == "uint4" else None
            weight = dequantize_groups(unpack_nibbles(codes), state[name + _SCALE].float(), kind, zero)
        state[f"{name}.weight"] = weight.to(layer.weight.dtype)
    return state
