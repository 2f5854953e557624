"""What a quantization backend must do, and the registry that finds one by name."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from diffquant.core.errors import DiffquantError
from diffquant.core.recipes import Recipe
from diffquant.core.record import record_of

BACKENDS: dict[str, type[QuantBackend]] = {}
DEFAULT_BACKEND = "quark"
QUANTIZABLE = (torch.nn.Linear, torch.nn.Conv2d)  # the layer kinds a recipe speaks of


def register(cls: type[QuantBackend]) -> type[QuantBackend]:
    """Class decorator: make `cls` the backend named `cls.name`."""
    BACKENDS[cls.name] = cls
    return cls


def backend_of(module: torch.nn.Module) -> QuantBackend:
    """The backend that quantized `module` (the default one for a float module)."""
    return get_backend(record_of(module).backend or DEFAULT_BACKEND)


def get_backend(name: str = DEFAULT_BACKEND) -> QuantBackend:
    """The backend registered as `name`.

    Raises:
        DiffquantError: no backend has that name.
    """
    try:
        return BACKENDS[name]()
    except KeyError:
        raise DiffquantError(f"unknown quantization backend {name!r}: choose from {', '.join(BACKENDS)}") from None


@dataclass
class LayerReport:
    """Which layers a quantized denoiser really quantized (read from its modules, not from the config)."""

    quantized: dict[str, str] = field(default_factory=dict)  # name -> "int8 per_tensor" etc.
    float_layers: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # name -> why a 4-bit recipe left it float / 8-bit
    bits_per_weight: float | None = None  # stored bits per Linear/Conv2d weight element, scales included

    def to_dict(self) -> dict:
        return {"quantized": self.quantized, "float": self.float_layers,
                "n_quantized": len(self.quantized), "n_float": len(self.float_layers),
                "notes": self.notes, "bits_per_weight": self.bits_per_weight}


@dataclass
class TracedGraph:
    """A quantized denoiser as the backend wrote it to ONNX: the model (tensors in memory), how its weights
    were stored (`compression`) and which Linears became MatMulNBits (`nbits`)."""

    model: object  # onnx.ModelProto
    compression: dict = field(default_factory=dict)
    nbits: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Storage:
    """What a quantized denoiser stores: weight elements of its quantized layers, their stored bytes (codes,
    scales, zero points, side branches) and the bytes of the whole module as stored."""

    quantized_weights: int
    quantized_bytes: int
    total_bytes: int

    @property
    def bits_per_weight(self) -> float | None:
        return 8 * self.quantized_bytes / self.quantized_weights if self.quantized_weights else None


class QuantBackend(ABC):
    """One quantization library: it turns a float denoiser module into a quantized one following a recipe,
    tells which layers it quantized, and rebuilds a saved quantized module without calibration data.

    Modules are changed in place; the caller copies first when the float module must survive."""

    name: ClassVar[str]

    @abstractmethod
    def quantize(self, module: torch.nn.Module, recipe: Recipe, excluded: list[str],
                 calibration: list[dict] | None) -> torch.nn.Module:
        """Quantize the Linear/Conv2d layers of `module` except the layers named in `excluded`.

        Args:
            module: a denoiser module (changed in place).
            recipe: what to quantize and how.
            excluded: concrete module names kept in float.
            calibration: forward-kwargs dicts, run through the module when the recipe quantizes activations.
        """

    def unfit_layers(self, module: torch.nn.Module, recipe: Recipe, excluded: list[str]) -> dict[str, str]:
        """name -> why, for each layer of the float `module` outside `excluded` that the recipe's weight
        cannot take (it takes the recipe's fallback, or stays float without one); none by default."""
        return {}

    @abstractmethod
    def layer_report(self, module: torch.nn.Module) -> LayerReport:
        """Each Linear/Conv2d of `module` (quantized or not): quantized, with its scheme, or float."""

    @abstractmethod
    def state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Everything `restore` needs besides the recipe: weights, scales, zero points."""

    def activation_scales(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """'<layer>.input' / '<layer>.output' -> the static scale of each activation quantizer of `module`
        (what an export must keep: `export.missing_activation_quantizers`); none for a weight-only backend."""
        return {}

    def record(self, module: torch.nn.Module) -> dict:
        """What the backend's algorithm measured while quantizing `module` (JSON-able, e.g. SVDQuant's
        alpha and error per layer): saved beside the weights and handed back to `restore`."""
        return {}

    @abstractmethod
    def restore(self, module: torch.nn.Module, recipe: Recipe, excluded: list[str],
                state: dict[str, torch.Tensor], record: dict | None = None) -> torch.nn.Module:
        """Turn the float `module` (in place) into the quantized module whose `state_dict` was `state`
        (and whose `record` was `record`), without running it: no calibration data, the saved scales
        are the ones used."""

    # --- what the rest of diffquant asks of a quantized module; the defaults fit a backend that cannot ---

    def plain_state(self, module: torch.nn.Module) -> dict:
        """The quantized `module` under its float parameter names: each int4 per-group Linear weight as its
        codes (`diffquant.passes.codes.WeightCodes`), every other tensor as it is; what block formats such as
        GGUF are written from. A backend without that form raises DiffquantError."""
        raise DiffquantError(f"the {self.name} backend has no plain form of a quantized module")

    def check_recipes(self, recipes: Iterable[Recipe]) -> None:
        """Refuse, before any slow work, recipes this backend cannot export (DiffquantError naming them)."""

    def export_graph(self, module: torch.nn.Module, wrapper: torch.nn.Module, inputs: dict[str, torch.Tensor],
                     output_name: str, dynamic_axes: dict, folder, external: bool, int4_level: int) -> TracedGraph:
        """Write the quantized `module` (traced through `wrapper`, its flat-input form, with `inputs`) to ONNX in
        `folder`, quantized weights stored as codes, and return the loaded model. `external`: the model is over
        2 GB (tensors go to external data); `int4_level`: ONNX Runtime MatMulNBits' accuracy_level."""
        raise DiffquantError(f"the {self.name} backend cannot export to ONNX")

    def quantizes_outputs(self, module: torch.nn.Module) -> bool:
        """Whether some layer of `module` quantizes its output too (its runtime re-rounds it)."""
        return any(name.endswith(".output") for name in self.activation_scales(module))

    def set_fake_quant(self, layers: Iterable[torch.nn.Module], enabled: bool) -> None:
        """Turn the quantization of `layers` (quantized layers of one module) on or off, in place."""
        raise DiffquantError(f"the {self.name} backend cannot switch layers' quantization off")

    @contextlib.contextmanager
    def compiled_fake_quant(self, enabled: bool) -> Iterator[None]:
        """While active, fake quantization runs compiled (`enabled`) or eagerly, where the backend can choose."""
        yield

    def storage(self, module: torch.nn.Module) -> Storage:
        """What the quantized `module` stores, each quantized layer as the backend packs it."""
        total = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        return Storage(0, 0, total)
