"""Quantization recipes: small frozen dataclasses, a name table for the CLI, and the one place where
a recipe becomes a Quark `QConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import DiffquantError

RECIPE_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 had no conv_output
DTYPES = ("int8", "fp8_e4m3")
OBSERVERS = ("min_max", "percentile", "MSE")


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel (axis 0 of Linear and Conv2d weights)."""

    axis: int = 0


Granularity = PerTensor | PerChannel


@dataclass(frozen=True)
class TensorQuant:
    """How one kind of tensor (weights or input activations) is quantized: symmetric, static scales."""

    dtype: str
    granularity: Granularity = field(default_factory=PerTensor)
    observer: str = "min_max"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise DiffquantError(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.observer not in OBSERVERS:
            raise DiffquantError(f"unknown observer {self.observer!r}: use one of {', '.join(OBSERVERS)}")
        if not isinstance(self.granularity, (PerTensor, PerChannel)):
            raise DiffquantError(f"granularity must be PerTensor() or PerChannel(), not {self.granularity!r}")


@dataclass(frozen=True)
class Recipe:
    """A named quantization scheme for the UNet's Linear and Conv2d layers.

    `activation` None means weight-only (no calibration data needed). `conv_output` also quantizes
    the outputs of Conv2d layers: ONNX Runtime runs a Conv as an integer QLinearConv only when its
    output is quantized, otherwise it dequantizes and runs the float Conv. `exclude` holds fnmatch
    patterns over module names (e.g. "conv_in", "*time_emb*") that stay in float.
    """

    name: str
    weight: TensorQuant
    activation: TensorQuant | None = None
    exclude: tuple[str, ...] = ()
    description: str = ""
    conv_output: TensorQuant | None = None

    def __post_init__(self) -> None:
        if isinstance(self.exclude, (list, str)):
            raise DiffquantError(f"Recipe.exclude must be a tuple of patterns, not {type(self.exclude).__name__}")
        if self.conv_output is not None and self.activation is None:
            raise DiffquantError(f"recipe {self.name}: conv_output needs activation quantization as well")

    @property
    def needs_calibration(self) -> bool:
        return self.activation is not None

    def to_dict(self) -> dict:
        """A JSON-able description with a type and a version, written next to every run's outputs."""
        def quant(q: TensorQuant | None):
            if q is None:
                return None
            return {"dtype": q.dtype, "granularity": type(q.granularity).__name__, "observer": q.observer,
                    **({"axis": q.granularity.axis} if isinstance(q.granularity, PerChannel) else {})}

        return {"type": "Recipe", "version": RECIPE_VERSION, "name": self.name, "weight": quant(self.weight),
                "activation": quant(self.activation), "conv_output": quant(self.conv_output),
                "exclude": list(self.exclude), "description": self.description}

    def with_exclude(self, patterns: tuple[str, ...] | list[str]) -> Recipe:
        """A copy that also keeps the modules matching `patterns` in float."""
        return replace(self, exclude=tuple(dict.fromkeys(self.exclude + tuple(patterns))))


INT8 = "int8"
FP8 = "fp8_e4m3"
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("int8-w", TensorQuant(INT8, PerTensor()),
           description="int8 weights, per-tensor, symmetric, min-max (the tutorial's recipe)"),
    Recipe("int8-w-pc", TensorQuant(INT8, PerChannel()),
           description="int8 weights, per-output-channel, symmetric, min-max"),
    Recipe("fp8-w", TensorQuant(FP8, PerTensor()),
           description="fp8 e4m3 weights, per-tensor (the tutorial's fp8 recipe)"),
    Recipe("fp8-w-pc", TensorQuant(FP8, PerChannel()),
           description="fp8 e4m3 weights, per-output-channel"),
    Recipe("w8a8-int8", TensorQuant(INT8, PerChannel()), TensorQuant(INT8, PerTensor()),
           description="int8 weights per channel, int8 static per-tensor input activations (calibrated)"),
    Recipe("w8a8-int8-ort", TensorQuant(INT8, PerChannel()), TensorQuant(INT8, PerTensor()),
           conv_output=TensorQuant(INT8, PerTensor()),
           description="w8a8-int8 plus int8 Conv2d outputs, so that ONNX Runtime runs every Conv as an "
                       "integer QLinearConv (its fast CPU path)"),
    Recipe("w8a8-fp8", TensorQuant(FP8, PerTensor()), TensorQuant(FP8, PerTensor()),
           description="fp8 e4m3 weights and static per-tensor input activations (calibrated)"),
)}
DEFAULT_RECIPES = ("int8-w", "fp8-w")


def recipe_from_dict(data: dict) -> Recipe:
    """Inverse of `Recipe.to_dict` (checks the type and version)."""
    if data.get("type") != "Recipe" or data.get("version") not in READABLE_VERSIONS:
        versions = " or ".join(map(str, READABLE_VERSIONS))
        raise DiffquantError(f"not a diffquant recipe of version {versions}: {data.get('type')} "
                             f"v{data.get('version')}; re-create it with this diffquant version")

    def quant(q: dict | None) -> TensorQuant | None:
        if q is None:
            return None
        granularity = PerChannel(q.get("axis", 0)) if q["granularity"] == "PerChannel" else PerTensor()
        return TensorQuant(q["dtype"], granularity, q["observer"])

    return Recipe(data["name"], quant(data["weight"]), quant(data["activation"]), tuple(data["exclude"]),
                  data.get("description", ""), quant(data.get("conv_output")))


def get_recipe(name: str | Recipe) -> Recipe:
    """Look a recipe up by its CLI name, or read a recipe .json file (e.g. one written by
    `diffquant sensitivity`); a Recipe passes through."""
    if isinstance(name, Recipe):
        return name
    if name.endswith(".json"):
        import json
        from pathlib import Path

        path = Path(name).expanduser()
        if not path.is_file():
            raise DiffquantError(f"recipe file {path} does not exist: pass a name ({', '.join(RECIPES)}) or a .json file")
        try:
            return recipe_from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as error:
            raise DiffquantError(f"recipe file {path} is not a diffquant recipe ({error})") from None
    try:
        return RECIPES[name]
    except KeyError:
        raise DiffquantError(f"unknown recipe {name!r}: choose from {', '.join(RECIPES)}") from None


def parse_recipes(names: str | list[str]) -> list[Recipe]:
    """'int8-w,fp8-w' (or a list) -> recipes; duplicates and blanks are refused."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    if not items or any(not n for n in items):
        raise DiffquantError(f"empty recipe name in {names!r}: pass comma-separated names like int8-w,fp8-w")
    if len(set(items)) != len(items):
        raise DiffquantError(f"recipe listed twice in {names!r}: name each recipe once")
    return [get_recipe(n) for n in items]


def to_quark_config(recipe: Recipe, exclude: list[str] | None = None):
    """The one mapping from a diffquant recipe to a Quark `QConfig`.

    Args:
        recipe: the recipe.
        exclude: concrete module names to keep in float (already matched from the recipe's patterns).
    """
    from quark.torch.quantization.config.config import (
        FP8E4M3PerChannelSpec, FP8E4M3PerTensorSpec, Int8PerChannelSpec, Int8PerTensorSpec, QConfig, QLayerConfig,
    )

    def spec(q: TensorQuant, is_weight: bool):
        if q.dtype == INT8 and isinstance(q.granularity, PerTensor):
            made = Int8PerTensorSpec(observer_method=q.observer, symmetric=True, scale_type="float",
                                     round_method="half_even", is_dynamic=False)
        elif q.dtype == INT8:
            made = Int8PerChannelSpec(ch_axis=q.granularity.axis, symmetric=True, scale_type="float",
                                      round_method="half_even", is_dynamic=False)
        elif isinstance(q.granularity, PerTensor):
            made = FP8E4M3PerTensorSpec(observer_method=q.observer, scale_type="float", is_dynamic=False)
        else:
            made = FP8E4M3PerChannelSpec(ch_axis=q.granularity.axis, scale_type="float", is_dynamic=False)
        if not is_weight and isinstance(q.granularity, PerChannel):
            raise DiffquantError(f"recipe {recipe.name}: activations support PerTensor() only")
        return made.to_quantization_spec()

    import torch

    weight = spec(recipe.weight, is_weight=True)
    inputs = None if recipe.activation is None else spec(recipe.activation, is_weight=False)
    by_type = {}
    if recipe.conv_output is not None:
        by_type[torch.nn.Conv2d] = QLayerConfig(weight=weight, input_tensors=inputs,
                                                output_tensors=spec(recipe.conv_output, is_weight=False))
    return QConfig(global_quant_config=QLayerConfig(weight=weight, input_tensors=inputs),
                   layer_type_quant_config=by_type, exclude=list(exclude or []))
