"""What diffquant did to a denoiser module, in one typed record kept on the module: the recipe, the layers kept
in float and why, the backend, smoothing and what the backend's algorithm measured. `save_quantized` writes it,
`layer_report` and the export read it; nothing else is stamped onto torch modules."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from diffquant.core.plan import LayerPlan
from diffquant.core.recipes import Recipe

_ATTRIBUTE = "diffquant_record"


@dataclass(frozen=True)
class QuantizationRecord:
    """Empty for a float module."""

    recipe: Recipe | None = None
    excluded: tuple[str, ...] = ()  # concrete layer names kept in float
    backend: str | None = None
    float_reason: str = ""  # why the model's profile kept layers in float ("" when it kept none)
    smoothing: Any = None  # the smoothing report (SmoothQuant-style recipes)
    algorithm: dict | None = None  # what the backend's algorithm measured (SVDQuant: alpha and error per layer)
    plan: LayerPlan | None = None  # every layer's action and reason (None for a module reloaded from an older save)

    @property
    def quantized(self) -> bool:
        return self.recipe is not None


def record_of(module) -> QuantizationRecord:
    """The record of `module` (an empty one for a module diffquant did not quantize)."""
    return getattr(module, _ATTRIBUTE, None) or QuantizationRecord()


def note(module, **changes) -> QuantizationRecord:
    """Set fields of the record of `module` (in place on the module); returns the new record."""
    record = replace(record_of(module), **changes)
    object.__setattr__(module, _ATTRIBUTE, record)  # a plain attribute, not a submodule or buffer
    return record
