"""AMD Quark as a diffquant backend: `ModelQuantizer` quantizes, Quark's module transformation plus
`load_state_dict` reloads."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import NamedTuple

import torch

from diffquant.core.errors import DiffquantError
from diffquant.core.recipes import UINT4, Recipe, gguf_scale_bits
from diffquant.quantization.backends.base import QUANTIZABLE, LayerReport, QuantBackend, Storage, TracedGraph, register
from diffquant.quantization.backends.quark import fourbit, internals, svdquant
from diffquant.quantization.backends.quark.config import to_quark_config
from diffquant.core.record import note, record_of

logger = logging.getLogger(__name__)


class StoredLayer(NamedTuple):
    """One Linear/Conv2d of a denoiser as stored: an SVDQuant layer once, as its error-corrected wrapper
    (`svdquant` holds its description); `bits` counts its weight's codes and scales (an SVDQuant layer's
    branch and smoothing factor too; fp32 for a float layer) over `elements` weights."""

    name: str
    layer: torch.nn.Module
    bits: int
    elements: int
    svdquant: str | None


def stored_layers(module: torch.nn.Module) -> Iterator[StoredLayer]:
    """Every Linear/Conv2d of a (quantized) denoiser with what its weight stores (the layer report's and
    the peer comparison's one count)."""
    inside: tuple[str, ...] = ()  # the submodules of an SVDQuant layer, counted with it
    for name, layer in module.named_modules():
        if inside and name.startswith(inside):
            continue
        if svdquant.is_error_corrected(layer):
            inside += (f"{name}.",)
            bits, description = svdquant.stored_bits(layer)
            yield StoredLayer(name, layer, bits, layer.layer.weight.numel(), description)
        elif isinstance(layer, QUANTIZABLE) or internals.is_quant_layer(layer):
            yield StoredLayer(name, layer, fourbit.weight_bits(layer), layer.weight.numel(), None)


@register
class QuarkBackend(QuantBackend):
    """Fake quantization with Quark: Linear/Conv2d become QuantLinear/QuantConv2d whose quantizers hold
    the scales; the module stays un-frozen so that Quark's ONNX export writes real Q/DQ weights."""

    name = "quark"

    def unfit_layers(self, module: torch.nn.Module, recipe: Recipe, excluded: list[str]) -> dict[str, str]:
        return fourbit.unfit_layers(module, recipe, excluded)

    def quantize(self, module: torch.nn.Module, recipe: Recipe, excluded: list[str],
                 calibration: list[dict] | None) -> torch.nn.Module:
        quark_torch = internals.import_quark(module.device)
        unfit = fourbit.unfit_layers(module, recipe, excluded)
        if unfit:
            narrow = {n: why for n, why in unfit.items() if not why.startswith("Conv2d")}
            logger.info("%s: %d Conv2d and %d Linears %s, as its 4-bit weight cannot take them%s", recipe.name,
                        len(unfit) - len(narrow), len(narrow),
                        "stay float" if recipe.fallback is None else f"take {recipe.fallback.dtype} weights",
                        "".join(f"; {n}: {why}" for n, why in narrow.items()))
        if recipe.algorithm is not None:
            return self._svdquant(module, recipe, set(excluded) | set(unfit), calibration)
        quantizer = quark_torch.ModelQuantizer(to_quark_config(recipe, excluded, list(unfit)))
        started = time.perf_counter()
        with torch.no_grad():
            module = quantizer.quantize_model(module, calibration if recipe.needs_calibration else None)
        fourbit.round_scales_fp16(module, gguf_scale_bits(recipe))  # 4-bit scales as stored (fp16); others untouched
        logger.info("quantized %s with %s in %.1f s", type(module).__name__, recipe.name, time.perf_counter() - started)
        return module

    @staticmethod
    def _svdquant(module: torch.nn.Module, recipe: Recipe, skip: set[str], calibration: list[dict] | None):
        """SVDQuant (recipe.algorithm) on every Linear outside `skip` (excluded, or the group does not divide it)."""
        layers = [name for name, layer in module.named_modules() if type(layer) is torch.nn.Linear and name not in skip]
        algorithm = recipe.algorithm
        if not layers:
            raise DiffquantError(f"recipe {recipe.name}: no Linear of this {type(module).__name__} outside the "
                                 f"excluded ones has an input width that the group size "
                                 f"{recipe.weight.granularity.size} divides: use a recipe with a smaller group")
        return svdquant.apply_svdquant(module, calibration, layers, mode=algorithm.mode, rank=algorithm.rank,
                                       group_size=recipe.weight.granularity.size, gptq=algorithm.gptq,
                                       alphas=svdquant.ALPHAS if algorithm.smooth else (None,),
                                       scale_bits=gguf_scale_bits(recipe), choose_scales=recipe.format == "gguf",
                                       bits=4 if recipe.four_bit else 8, asymmetric=recipe.weight.dtype == UINT4)

    def activation_scales(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return internals.activation_scales(module)

    def plain_state(self, module: torch.nn.Module) -> dict:
        from diffquant.quantization.backends.quark import export

        return export.plain_state(module)

    def check_recipes(self, recipes) -> None:
        from diffquant.quantization.backends.quark.export import check_recipes_exportable

        check_recipes_exportable(recipes)

    def export_graph(self, module: torch.nn.Module, wrapper: torch.nn.Module, inputs: dict[str, torch.Tensor],
                     output_name: str, dynamic_axes: dict, folder, external: bool, int4_level: int) -> TracedGraph:
        from diffquant.quantization.backends.quark import export

        return export.trace(module, wrapper, inputs, output_name, dynamic_axes, folder, external, int4_level)

    def set_fake_quant(self, layers, enabled: bool) -> None:
        internals.set_fake_quant(layers, enabled)

    def compiled_fake_quant(self, enabled: bool):
        return internals.quark_compile(enabled)

    def storage(self, module: torch.nn.Module) -> Storage:
        """Each quantized layer as the layer report counts it (`stored_layers`: codes plus scales; an
        SVDQuant layer's residual, low-rank branch and smoothing factor included), everything else as stored."""
        def nbytes(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        weights = quantized = 0
        total = sum(nbytes(t) for t in module.state_dict().values())
        for stored in stored_layers(module):
            quantizer = internals.weight_quantizer(stored.layer)
            if stored.svdquant is not None:
                as_stored = sum(nbytes(t) for t in stored.layer.state_dict().values())
            elif quantizer is not None:
                as_stored = nbytes(stored.layer.weight) + sum(
                    nbytes(getattr(quantizer, n)) for n in ("scale", "zero_point")
                    if isinstance(getattr(quantizer, n, None), torch.Tensor))
            else:
                continue  # a float layer: counted as stored
            weights += stored.elements
            quantized += stored.bits // 8
            total += stored.bits // 8 - as_stored
        return Storage(weights, quantized, total)

    def layer_report(self, module: torch.nn.Module) -> LayerReport:
        report = LayerReport()
        recipe = record_of(module).recipe
        bits = elements = 0
        for name, layer, layer_bits, layer_elements, svdquant_description in stored_layers(module):
            bits += layer_bits
            elements += layer_elements
            if svdquant_description is not None:
                report.quantized[name] = svdquant_description
                continue
            reason = None if recipe is None else fourbit.unfit_reason(layer, recipe)
            if reason is not None:
                report.notes[name] = reason
            weight_q = internals.weight_quantizer(layer)
            if weight_q is None:
                report.float_layers.append(name)
                continue
            description = internals.describe(weight_q)
            input_q = internals.input_quantizer(layer)
            if input_q is not None:
                description += f", act {internals.describe(input_q)}"
            report.quantized[name] = description
        report.bits_per_weight = bits / max(elements, 1)
        return report

    def state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        # The un-frozen state (each quantizer's scale and zero point) with weights as codes where exact.
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        return fourbit.pack_state(module, state)

    def record(self, module: torch.nn.Module) -> dict:
        svd = record_of(module).algorithm
        return {"svdquant": svd} if svd is not None else {}

    def restore(self, module: torch.nn.Module, recipe: Recipe, excluded: list[str],
                state: dict[str, torch.Tensor], record: dict | None = None) -> torch.nn.Module:
        internals.import_quark(module.device)
        if recipe.algorithm is not None:
            module, qconfig = svdquant.rebuild(module, svdquant.saved_layers(state, type(module).__name__),
                                               recipe.algorithm.mode, recipe.weight.granularity.size,
                                               4 if recipe.four_bit else 8, recipe.weight.dtype == UINT4)
        else:
            qconfig = to_quark_config(recipe, excluded, list(fourbit.unfit_layers(module, recipe, excluded)))
            module = internals.transform(module, qconfig)
        device = next(module.parameters()).device
        state = fourbit.unpack_state(module, state)
        try:
            module.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
        except RuntimeError as error:  # torch lists every missing/unexpected key; its first line says which model
            raise DiffquantError(f"the saved quantized state does not fit this {type(module).__name__} "
                                 f"({str(error).splitlines()[0]} ...): quantize the model again") from None
        internals.finish_loading(module, qconfig)
        if record and record.get("svdquant") is not None:
            note(module, algorithm=record["svdquant"])
        return module
