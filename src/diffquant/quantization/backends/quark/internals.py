"""Every read of Quark's internals in diffquant: its quantizer attributes on quantized layers
(`_weight_quantizer`, `_input_quantizer`, `_output_quantizer`), their scales and flags, its module
transformation and its torch.compile switch. These are not Quark's public API: when a Quark release
renames one, this module is the only one to change.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator

import torch

logger = logging.getLogger(__name__)


def import_quark(device: torch.device | str = "cpu"):
    """Import `quark.torch` only when quantizing: it costs seconds (and a JIT build the first time).

    On CPU, Quark's fake-quant forward would go through a cold `torch.compile(max-autotune)` that
    costs tens of seconds on its first call and is never faster than fp32 for a short job, so the
    CPU default sets QUARK_DISABLE_COMPILE=1 (a user's own setting wins). Quark's chatty INFO logs
    are lowered to errors unless QUARK_LOG_LEVEL is set.
    """
    if torch.device(device).type == "cpu":
        os.environ.setdefault("QUARK_DISABLE_COMPILE", "1")
    os.environ.setdefault("QUARK_LOG_LEVEL", "error")
    started = time.perf_counter()
    import quark.torch

    logger.debug("import quark.torch took %.1f s", time.perf_counter() - started)
    return quark.torch


@contextlib.contextmanager
def quark_compile(enabled: bool) -> Iterator[None]:
    """Turn Quark's torch.compile of fake quantization on or off for the duration."""
    from quark.torch.quantization import tensor_quantize

    before = tensor_quantize.QUARK_DISABLE_COMPILE
    tensor_quantize.QUARK_DISABLE_COMPILE = not enabled
    try:
        yield
    finally:
        tensor_quantize.QUARK_DISABLE_COMPILE = before


# --- the quantizers of one layer ---------------------------------------------------------------

def weight_quantizer(module: torch.nn.Module):
    """The layer's weight fake-quantizer, or None (a float layer, or not a layer)."""
    return getattr(module, "_weight_quantizer", None)


def input_quantizer(module: torch.nn.Module):
    """The layer's input-activation fake-quantizer, or None."""
    return getattr(module, "_input_quantizer", None)


def output_quantizer(module: torch.nn.Module):
    """The layer's output-activation fake-quantizer, or None."""
    return getattr(module, "_output_quantizer", None)


def is_quant_layer(module: torch.nn.Module) -> bool:
    """True for a layer Quark swapped in (QuantLinear, QuantConv2d), quantizing or not.

    Quark's QuantConv2d is not an nn.Conv2d subclass; the quantizer attributes identify its layers."""
    return hasattr(module, "_weight_quantizer")


def quantizers(module: torch.nn.Module) -> list:
    """The layer's weight, input and output quantizers that exist."""
    return [q for q in (weight_quantizer(module), input_quantizer(module), output_quantizer(module)) if q is not None]


def describe(quantizer) -> str:
    """'int8 per_tensor', 'fp8_e4m3 per_channel', ...: the quantizer's dtype and scheme."""
    dtype = str(getattr(quantizer, "dtype", "?")).split(".")[-1]
    scheme = str(getattr(quantizer, "qscheme", "?")).split(".")[-1]
    return f"{dtype} {scheme}"


def has_output_quantizers(module: torch.nn.Module) -> bool:
    """True when some layer of `module` also quantizes its output (recipes with conv_output)."""
    return any(output_quantizer(m) is not None for m in module.modules())


def activation_scales(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """'<layer>.input' / '<layer>.output' -> the static activation scale of every quantized layer."""
    scales = {}
    for name, layer in module.named_modules():
        for kind, quantizer in (("input", input_quantizer(layer)), ("output", output_quantizer(layer))):
            if quantizer is not None:
                scales[f"{name}.{kind}"] = quantizer.scale.detach().clone()
    return scales


def set_fake_quant(layers: Iterable[torch.nn.Module], enabled: bool) -> None:
    """Turn the fake quantization of `layers` (all their quantizers) on or off."""
    for layer in layers:
        for quantizer in quantizers(layer):
            quantizer.enable_fake_quant(enabled)


# --- weights as codes ---------------------------------------------------------------------------

def fake_quantized_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight after Quark's quantize-dequantize (what its forward multiplies by), in float32."""
    with torch.no_grad():
        return weight_quantizer(layer)(layer.weight.detach()).float()


def observe_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight scale, after its quantizer has observed the weight where it still observes
    (a weight-only quantizer takes its scale on its first call); a fixed scale is returned as it is."""
    quantizer = weight_quantizer(layer)
    if quantizer.is_observer_enabled:
        with torch.no_grad():
            quantizer(layer.weight.detach())
    return quantizer.scale.detach()


def set_weight_scale(layer: torch.nn.Module, scale: torch.Tensor) -> None:
    """Give the layer's weight quantizer this scale (its shape) and stop it observing: an algorithm
    (GPTQ) chose the scale and rounded the weight on it already."""
    fix_scale(weight_quantizer(layer), scale)


def weight_zero_point(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight zero points (an asymmetric uint4 weight's integer z per group, (N, K / group))."""
    return weight_quantizer(layer).zero_point.detach()


def set_weight_zero_point(layer: torch.nn.Module, zero_point: torch.Tensor) -> None:
    """Give the layer's weight quantizer these integer zero points (its shape, device and dtype)."""
    quantizer = weight_quantizer(layer)
    quantizer.zero_point.data = zero_point.to(quantizer.zero_point.device, quantizer.zero_point.dtype).reshape(
        quantizer.zero_point.shape)


def fix_scale(quantizer, scale: torch.Tensor) -> None:
    """Give a fake-quantizer this scale (in its own shape, device and dtype) and stop it observing."""
    quantizer.scale.data = scale.to(quantizer.scale.device, quantizer.scale.dtype).reshape(quantizer.scale.shape)
    quantizer.disable_observer()


def fresh_quantizer(spec, device: torch.device | str):
    """A new Quark fake-quantizer for a quantization spec (it observes on its first call)."""
    from quark.torch.quantization.tensor_quantize import FakeQuantizeBase

    return FakeQuantizeBase.get_fake_quantize(spec, device=device)


# State-dict names of a quantized layer's weight quantizer and its scale, after the layer's own name.
WEIGHT_QUANTIZER_KEY = "._weight_quantizer"
WEIGHT_SCALE_KEY = WEIGHT_QUANTIZER_KEY + ".scale"
WEIGHT_ZERO_POINT_KEY = WEIGHT_QUANTIZER_KEY + ".zero_point"


def broadcast_scale(layer: torch.nn.Module, scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`scale` (the layer's weight quantizer's, as stored) in a form that multiplies a weight of `shape`: per
    channel along the quantizer's axis, or, for one scale per group of inputs (N, K / group), repeated along K."""
    if scale.dim() == 1:  # per channel along ch_axis (0: output channels)
        view = [1] * len(shape)
        view[weight_quantizer(layer).ch_axis or 0] = -1
        return scale.reshape(view)
    if scale.dim() == 2 and tuple(scale.shape) != tuple(shape):  # (N, K / group): one scale per group of inputs
        return scale.repeat_interleave(shape[1] // scale.shape[1], dim=1)
    return scale


def weight_codes(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(codes, broadcast scale, 'int8'|'fp8') such that codes * scale == Quark's fake-quantized weight."""
    quantizer = weight_quantizer(layer)
    fake = fake_quantized_weight(layer)
    scale = broadcast_scale(layer, quantizer.scale.detach().float(), fake.shape)
    kind = "fp8" if "fp8" in str(quantizer.dtype) else "int8"
    if kind == "int8":
        codes = torch.round(fake / scale).clamp(-128, 127).to(torch.int8)
    else:
        codes = (fake / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    return codes, scale, kind


_WEIGHT_DQ = "/_weight_quantizer/DequantizeLinear"


def weight_dequantize_layer(node, names=None) -> str | None:
    """The layer whose weight an ONNX node of Quark's export dequantizes, None for any other node:
    "/unet/down_blocks.1/resnets.0/conv1/_weight_quantizer/DequantizeLinear" -> "down_blocks.1.resnets.0.conv1"
    (the first path part is the export wrapper's attribute holding the denoiser; `names`: the denoiser's module
    names, which resolve a scope path that skips a ModuleDict, see `scope_layer`)."""
    from diffquant.passes.graph import scope_layer

    if not node.name.endswith(_WEIGHT_DQ):
        return None
    return scope_layer(node.name[: -len(_WEIGHT_DQ)].split("/")[2:], names)


# --- SVDQuant's pieces ------------------------------------------------------------------------------

def svd_decompose(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, L2), the rank-`rank` factors of Quark's SVD split of `weight` (W ~ L2 L1)."""
    from quark.torch.algorithm.svdquant.svdquant import _svd_decompose

    l1, l2, _ = _svd_decompose(weight, rank)
    return l1, l2


def svdquant_statistics(module: torch.nn.Module, calibration, names: set[str], gptq: bool, records: int):
    """Quark's SVDQuant calibration pass over `calibration` (forward-kwargs dicts), on the Linears in `names`
    only: (per-channel input maxima by layer, the inputs of the first `records` calls of each, and for
    GPTQ the Hessians X^T X by layer). Quark's processor has no public way to calibrate without also
    transforming the model, so its `_calibrate` and the collectors it fills are read here."""
    from quark.torch.algorithm.svdquant import SVDQuantProcessor
    from quark.torch.quantization.config.config import SVDQuantConfig

    class Processor(SVDQuantProcessor):
        def _should_quantize(self, name: str, layer: torch.nn.Module) -> bool:
            return name in names

    config = SVDQuantConfig(search_alpha=True, alpha_search_max_samples=records, exclude_patterns=[],
                            min_layer_size=0, use_gptq=gptq)
    processor = Processor(module, config, calibration)
    processor._calibrate()
    hessians = processor.hessian_collector.hessians if gptq else {}
    return processor.smoother.activation_max, processor.input_cache.inputs, hessians


# --- rebuilding a quantized module ----------------------------------------------------------------

def transform(module: torch.nn.Module, qconfig) -> torch.nn.Module:
    """Swap the layers that `qconfig` quantizes for Quark's quantized layers, in place, without running
    anything: the step of `ModelQuantizer.quantize_model` before calibration, and what Quark's own
    diffusers reload (`QuarkDiffusersQuantizer`) does before loading a state dict."""
    from quark.torch.quantization.model_transformation import process_model_transformation

    return process_model_transformation(module, qconfig)


def finish_loading(module: torch.nn.Module, qconfig) -> None:
    """Leave a transformed module whose state was just loaded as `quantize_model` leaves a calibrated
    one: static quantizers stop observing (the loaded scales stay as they are) and fake-quantize,
    and the module carries its QConfig and Quark's "quantized" flag, as Quark's exporters expect."""
    from quark.torch.quantization.tensor_quantize import ScaledFakeQuantize

    for quantizer in module.modules():
        if isinstance(quantizer, ScaledFakeQuantize):
            quantizer.enable_observer(bool(quantizer.is_dynamic))  # dynamic scales are computed per call
            quantizer.enable_fake_quant()
    module.quant_config = qconfig
    module.quark_quantized = True
