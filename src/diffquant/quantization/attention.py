"""int8 attention: the two matmuls inside each attention (Q.K^T and P.V) take int8 inputs, as NNCF's
transformer mode quantizes them, so that ONNX Runtime and OpenVINO run them on integer kernels too.

Each diffusers attention module (the ones with a `processor`: UNet, SD3 joint and FLUX attention alike)
gets an `AttentionQuantizer` child holding four static per-tensor ranges, calibrated on the recipe's
calibration calls: the query (already multiplied by the softmax scale), the key, the value (int8,
symmetric) and the softmax probabilities (uint8, zero point 0). While that module runs, its
`scaled_dot_product_attention` call is taken over by a torch function mode that computes the same
attention with those four tensors fake-quantized; torch's ONNX export writes the fake quantization as
QuantizeLinear/DequantizeLinear pairs in front of each MatMul, the form ONNX Runtime fuses into
MatMulIntegerToFloat and OpenVINO compiles to int8 MatMuls. The attention is then no longer one fused
MultiHeadAttention: its S x S scores are materialised.

Why hand-written: Quark quantizes module inputs, outputs and weights; its only attention option
(`softmax_quant_spec`) patches `nn.functional.softmax` in LLM modules with eager attention, which
diffusers' attentions (scaled_dot_product_attention) never call; no library here quantizes the inputs
of diffusers' attention matmuls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from diffquant.core.errors import DiffquantError

CHILD = "diffquant_attention"  # the quantizer's name under its attention module (and in saved states)
QUERY, KEY, VALUE, PROBS = range(4)


class AttentionQuantizer(torch.nn.Module):
    """The calibrated ranges of one attention's matmul inputs; `observing` records them instead of quantizing."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("amax", torch.zeros(4))
        self.observing = False

    def _quant(self, x: torch.Tensor, which: int) -> torch.Tensor:
        if self.observing:
            self.amax[which] = torch.maximum(self.amax[which], x.detach().abs().amax().float())
            return x
        amax = torch.clamp(self.amax[which], min=1e-8)
        if which == PROBS:  # softmax outputs lie in [0, 1]: unsigned, all 256 codes on the positive side
            return torch.fake_quantize_per_tensor_affine(x, amax / 255.0, 0, 0, 255)
        return torch.fake_quantize_per_tensor_affine(x, amax / 127.0, 0, -128, 127)

    def forward(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
        if is_causal or dropout_p or enable_gqa:
            raise DiffquantError("int8 attention covers diffusion attention (no causal mask, dropout or grouped "
                                 "heads): use a recipe without attention quantization for this model")
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        # The scale goes into the query before it is quantized: the scores come out of the integer
        # product already scaled, with no multiply over the S x S matrix.
        scores = self._quant(query * scale, QUERY) @ self._quant(key.transpose(-2, -1), KEY)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else scores + attn_mask
        probs = torch.softmax(scores, dim=-1)
        return self._quant(probs, PROBS) @ self._quant(value, VALUE)


class _TakeOverAttention(TorchFunctionMode):
    """Runs `scaled_dot_product_attention` through one attention's quantizer while that attention runs."""

    def __init__(self, quantizer: AttentionQuantizer) -> None:
        super().__init__()
        self.quantizer = quantizer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return self.quantizer(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


_ACTIVE: list[_TakeOverAttention] = []


def _enter(module, args) -> None:
    mode = _TakeOverAttention(getattr(module, CHILD))
    mode.__enter__()
    _ACTIVE.append(mode)


def _leave(module, args, output):
    _ACTIVE.pop().__exit__(None, None, None)
    return output


def attention_modules(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The attention modules of a diffusers denoiser by name: the modules that run an attention processor."""
    return {name: m for name, m in module.named_modules()
            if hasattr(m, "processor") and callable(getattr(m, "set_processor", None))}


def attach(module: torch.nn.Module, names: set[str] | None = None) -> dict[str, tuple]:
    """Give every attention of `module` (or those in `names`) an uncalibrated quantizer; returns the hook handles
    by attention name. An attention that has one keeps it."""
    handles = {}
    for name, attention in attention_modules(module).items():
        if (names is not None and name not in names) or hasattr(attention, CHILD):
            continue
        attention.add_module(CHILD, AttentionQuantizer().to(next(attention.parameters()).device))
        handles[name] = (attention.register_forward_pre_hook(_enter),
                         attention.register_forward_hook(_leave, always_call=True))
    return handles


def quantizers(module: torch.nn.Module) -> list[AttentionQuantizer]:
    return [m for m in module.modules() if isinstance(m, AttentionQuantizer)]


@torch.no_grad()
def calibrate_attention(module: torch.nn.Module, calibration: list[dict]) -> int:
    """Attach quantizers to `module`'s attentions and record their ranges over the calibration calls (the
    module's own forward kwargs, run through its already quantized layers); returns how many attentions.
    An attention that never calls scaled_dot_product_attention (a linear attention, Sana's) loses its
    quantizer again and stays float."""
    handles = attach(module)
    for q in quantizers(module):
        q.observing = True
    try:
        for item in calibration:
            module(**item, return_dict=False)
    finally:
        for q in quantizers(module):
            q.observing = False
    for name, attention in attention_modules(module).items():
        quantizer = getattr(attention, CHILD, None)
        if quantizer is not None and not bool((quantizer.amax > 0).any()):
            _detach(attention, handles[name])
    empty = [q for q in quantizers(module) if not bool((q.amax > 0).all())]
    if empty:
        raise DiffquantError(f"{len(empty)} attentions saw a query, key, value or probability range of 0 in "
                             "calibration: calibrate on calls that run every attention")
    if not quantizers(module):
        raise DiffquantError(f"no attention of this {type(module).__name__} calls scaled_dot_product_attention: "
                             "int8 attention does not apply; use the recipe without -attn")
    return len(quantizers(module))


def _detach(attention: torch.nn.Module, handles) -> None:
    for handle in handles:
        handle.remove()
    delattr(attention, CHILD)


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(the layers' state, the attention quantizers' ranges) of a saved quantized state."""
    mark = f".{CHILD}."
    ranges = {k: v for k, v in state.items() if mark in k}
    return {k: v for k, v in state.items() if mark not in k}, ranges


def restore_attention(module: torch.nn.Module, ranges: dict[str, torch.Tensor]) -> int:
    """Attach quantizers to the attentions the saved ranges name and load them (no calibration); returns how many."""
    suffix = f".{CHILD}.amax"
    names = {k[:-len(suffix)] for k in ranges if k.endswith(suffix)}
    if not ranges or len(names) != len(ranges) or not names <= set(attention_modules(module)):
        raise DiffquantError(f"the saved attention ranges ({len(ranges)}) do not fit this model's attentions: "
                             "quantize the model again")
    attach(module, names)
    device = next(module.parameters()).device
    module.load_state_dict({k: v.to(device) for k, v in ranges.items()}, strict=False)
    return len(names)
