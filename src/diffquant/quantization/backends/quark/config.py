"""The one place where a diffquant recipe becomes a Quark `QConfig`."""

from __future__ import annotations

import torch

from diffquant.core.errors import DiffquantError
from diffquant.core.recipes import INT4, INT8, MXFP4, UINT4, PerGroup, PerTensor, Recipe, TensorQuant


def to_quark_config(recipe: Recipe, exclude: list[str] | None = None, unfit: list[str] | tuple[str, ...] = ()):
    """The one mapping from a diffquant recipe to a Quark `QConfig`.

    Every Linear and Conv2d gets the recipe's weight (and input activation) spec; `conv_output` adds an
    output spec to Conv2d layers only (Linear outputs stay float). A 4-bit recipe gives its per-group
    weight spec (Quark's `Int4PerGroupSpec`, `Uint4PerGroupSpec` (asymmetric, an integer zero point per group) or
    `OCP_MXFP4Spec`, groups along the input axis) to Linear
    layers; the `unfit` layers (every Conv2d, Linears whose input width the group does not divide: Quark
    would raise on them) get the recipe's `fallback` spec, or stay float without one.

    Args:
        recipe: the recipe.
        exclude: concrete module names to keep in float (already matched from the recipe's patterns).
        unfit: for a 4-bit recipe, the layers its weight cannot take (see `fourbit.unfit_layers`).
    """
    from quark.torch.quantization.config.config import (
        FP8E4M3PerChannelSpec, FP8E4M3PerTensorSpec, Int4PerGroupSpec, Int8PerChannelSpec, Int8PerGroupSpec,
        Int8PerTensorSpec,
        OCP_MXFP4Spec, QConfig, QLayerConfig, Uint4PerGroupSpec,
    )

    def spec(q: TensorQuant, is_weight: bool):
        if not is_weight and not isinstance(q.granularity, PerTensor):
            raise DiffquantError(f"recipe {recipe.name}: activations support PerTensor() only")
        if q.dtype == INT4:
            made = Int4PerGroupSpec(ch_axis=-1, group_size=q.granularity.size, symmetric=True, scale_type="float",
                                    round_method="half_even", is_dynamic=False)
        elif q.dtype == UINT4:  # GGUF's Q4_1 blocks
            made = Uint4PerGroupSpec(ch_axis=-1, group_size=q.granularity.size, symmetric=False, scale_type="float",
                                     round_method="half_even", is_dynamic=False)
        elif q.dtype == MXFP4:
            made = OCP_MXFP4Spec(ch_axis=-1, is_dynamic=False)
        elif q.dtype == INT8 and isinstance(q.granularity, PerGroup):  # GGUF's Q8_0 blocks
            made = Int8PerGroupSpec(ch_axis=-1, group_size=q.granularity.size, symmetric=True, scale_type="float",
                                    round_method="half_even", is_dynamic=False)
        elif q.dtype == INT8 and isinstance(q.granularity, PerTensor):
            made = Int8PerTensorSpec(observer_method=q.observer, symmetric=True, scale_type="float",
                                     round_method="half_even", is_dynamic=False)
        elif q.dtype == INT8:
            made = Int8PerChannelSpec(ch_axis=q.granularity.axis, symmetric=True, scale_type="float",
                                      round_method="half_even", is_dynamic=False)
        elif isinstance(q.granularity, PerTensor):
            made = FP8E4M3PerTensorSpec(observer_method=q.observer, scale_type="float", is_dynamic=False)
        else:
            made = FP8E4M3PerChannelSpec(ch_axis=q.granularity.axis, scale_type="float", is_dynamic=False)
        return made.to_quantization_spec()

    weight = spec(recipe.weight, is_weight=True)
    if recipe.per_group:
        linear = QLayerConfig(weight=weight)
        if recipe.fallback is None:
            return QConfig(global_quant_config=linear, exclude=list(exclude or []) + list(unfit))
        eight = QLayerConfig(weight=spec(recipe.fallback, is_weight=True))
        return QConfig(global_quant_config=eight, layer_type_quant_config={torch.nn.Linear: linear},
                       layer_quant_config={name: eight for name in unfit}, exclude=list(exclude or []))
    inputs = None if recipe.activation is None else spec(recipe.activation, is_weight=False)
    by_type = {}
    if recipe.conv_output is not None:
        by_type[torch.nn.Conv2d] = QLayerConfig(weight=weight, input_tensors=inputs,
                                                output_tensors=spec(recipe.conv_output, is_weight=False))
    return QConfig(global_quant_config=QLayerConfig(weight=weight, input_tensors=inputs),
                   layer_type_quant_config=by_type, exclude=list(exclude or []))
