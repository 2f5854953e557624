"""Stage 3, quantize: a copy of the pipeline whose UNet is quantized by Quark's ModelQuantizer."""

from __future__ import annotations

import copy
import fnmatch
import inspect
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backends.quark.config import to_quark_config
from .errors import DiffquantError
from .recipes import Recipe, get_recipe

logger = logging.getLogger(__name__)
QUANTIZABLE = (torch.nn.Linear, torch.nn.Conv2d)


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


def match_exclusions(unet: torch.nn.Module, patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the quantizable layers (Linear/Conv2d) that match any fnmatch pattern.

    A pattern that matches no module at all is an error: it is almost always a typo.
    """
    names = [name for name, module in unet.named_modules() if isinstance(module, QUANTIZABLE)]
    all_names = [name for name, _ in unet.named_modules() if name]
    excluded: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)
                or any(fnmatch.fnmatchcase(prefix, pattern) for prefix in _prefixes(n))]
        if not hits and not any(fnmatch.fnmatchcase(n, pattern) for n in all_names):
            raise DiffquantError(f"exclude pattern {pattern!r} matches no module of the UNet: check the name "
                                 f"(e.g. 'conv_in', '*time_emb*', 'down_blocks.0.*')")
        excluded.extend(h for h in hits if h not in excluded)
    return excluded


def _prefixes(name: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b']: a pattern naming a block excludes every layer inside it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@dataclass
class LayerReport:
    """Which layers a quantized UNet really quantized (read from its modules, not from the config)."""

    quantized: dict[str, str] = field(default_factory=dict)  # name -> "int8 per_tensor" etc.
    float_layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"quantized": self.quantized, "float": self.float_layers,
                "n_quantized": len(self.quantized), "n_float": len(self.float_layers)}


def _describe(quantizer) -> str:
    dtype = str(getattr(quantizer, "dtype", "?")).split(".")[-1]
    scheme = str(getattr(quantizer, "qscheme", "?")).split(".")[-1]
    return f"{dtype} {scheme}"


def layer_report(unet: torch.nn.Module) -> LayerReport:
    """Inspect a (possibly) quantized UNet: each Linear/Conv2d is quantized or float."""
    report = LayerReport()
    for name, module in unet.named_modules():
        # Quark's QuantConv2d is not an nn.Conv2d subclass; its quantizer attributes identify it.
        if not isinstance(module, QUANTIZABLE) and not hasattr(module, "_weight_quantizer"):
            continue
        weight_q = getattr(module, "_weight_quantizer", None)
        if weight_q is None:
            report.float_layers.append(name)
            continue
        description = _describe(weight_q)
        input_q = getattr(module, "_input_quantizer", None)
        if input_q is not None:
            description += f", act {_describe(input_q)}"
        report.quantized[name] = description
    return report


def quantize_module(unet: torch.nn.Module, recipe: str | Recipe, calibration: list[dict] | None = None,
                    exclude: tuple[str, ...] | list[str] = ()) -> torch.nn.Module:
    """Quantize a copy of a bare UNet with Quark (see `quantize_unet`); `unet` is left untouched."""
    recipe = get_recipe(recipe)
    if exclude:
        recipe = recipe.with_exclude(tuple(exclude))
    if recipe.needs_calibration and not calibration:
        raise DiffquantError(f"recipe {recipe.name} quantizes activations and needs calibration data, got "
                             f"{'an empty list' if calibration is not None else 'none'}: pass calibrate(pipe, prompts)")
    quark_torch = import_quark(unet.device)
    unet = copy.deepcopy(unet)
    excluded = match_exclusions(unet, recipe.exclude)
    if excluded:
        logger.info("%s: keeping %d layers in float: %s", recipe.name, len(excluded), ", ".join(excluded))
    quantizer = quark_torch.ModelQuantizer(to_quark_config(recipe, excluded))
    started = time.perf_counter()
    with torch.no_grad():
        unet = quantizer.quantize_model(unet, calibration if recipe.needs_calibration else None)
    logger.info("quantized the UNet with %s in %.1f s", recipe.name, time.perf_counter() - started)
    unet.eval()
    unet.diffquant_recipe = recipe  # read back by save_quantized
    return unet


def quantize_unet(pipe, recipe: str | Recipe, calibration: list[dict] | None = None,
                  exclude: tuple[str, ...] | list[str] = ()):
    """Quantize a copy of `pipe.unet` with Quark and return a new pipeline that uses it.

    The original pipeline and its UNet are left untouched, so a baseline and several recipes can be
    compared in one process; the new pipeline shares the text encoder, VAE, tokenizer and scheduler.

    Args:
        pipe: a pipeline from `load_pipeline`.
        recipe: a recipe name (see `diffquant.RECIPES`), a recipe .json file, or a `Recipe`.
        calibration: UNet forward kwargs dicts (from `calibration.capture_unet_inputs`); required when
            the recipe quantizes activations, never read for weight-only recipes.
        exclude: extra fnmatch patterns of module names kept in float.

    Returns:
        A pipeline of the same class whose `unet` is the quantized copy.
    """
    components = dict(pipe.components)
    components["unet"] = quantize_module(pipe.unet, recipe, calibration, exclude)
    if "requires_safety_checker" in inspect.signature(type(pipe).__init__).parameters:
        components["requires_safety_checker"] = pipe.config.get("requires_safety_checker", False)
    quantized = type(pipe)(**components)
    quantized.set_progress_bar_config(disable=True)
    quantized.register_to_config(_name_or_path=pipe.name_or_path)
    return quantized


ARTIFACT_FILE = "diffquant_quantized.json"
STATE_FILE = "unet_quantized.safetensors"
ARTIFACT_VERSION = 1


def save_quantized(quantized_pipe, out_dir: str | Path, model: str | None = None) -> Path:
    """Write a quantized UNet (weights and Quark's scales) plus its recipe and source model to `out_dir`.

    Reload with `load_quantized`; outputs after reload equal those before.
    """
    from safetensors.torch import save_file

    from .artifacts import atomic_dir, write_json

    recipe = getattr(quantized_pipe.unet, "diffquant_recipe", None)
    if recipe is None:
        raise DiffquantError("this pipeline's UNet was not quantized by diffquant.quantize_unet: nothing to save")
    state = {k: v.detach().contiguous().cpu() for k, v in quantized_pipe.unet.state_dict().items()}
    with atomic_dir(Path(out_dir)) as tmp:
        save_file(state, str(tmp / STATE_FILE))
        write_json(tmp / ARTIFACT_FILE, {"type": "QuantizedUNet", "version": ARTIFACT_VERSION,
                                         "model": model, "recipe": recipe.to_dict()})
    return Path(out_dir)


def load_quantized(path: str | Path, device: str = "auto", dtype: str = "auto"):
    """Load a pipeline whose UNet is the quantized one saved by `save_quantized` (or `diffquant quantize`)."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .pipeline import load_pipeline
    from .recipes import recipe_from_dict

    path = Path(path)
    meta_file = path / ARTIFACT_FILE
    if not meta_file.is_file():
        raise DiffquantError(f"{path} holds no quantized UNet ({ARTIFACT_FILE} missing): run `diffquant quantize --out {path}` first")
    fix = "quantize again with `diffquant quantize`"
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as error:
        raise DiffquantError(f"{meta_file} is not valid JSON ({error}): {fix}") from None
    if not isinstance(meta, dict) or meta.get("type") != "QuantizedUNet" or meta.get("version") != ARTIFACT_VERSION:
        found = f"{meta.get('type')} v{meta.get('version')}" if isinstance(meta, dict) else type(meta).__name__
        raise DiffquantError(f"{meta_file} is not a diffquant quantized UNet of version {ARTIFACT_VERSION} "
                             f"(found {found}): {fix}")
    if not isinstance(meta.get("recipe"), dict) or not isinstance(meta.get("model"), (str, type(None))):
        raise DiffquantError(f"{meta_file} lacks its recipe or names its model wrongly: {fix}")
    try:
        recipe = recipe_from_dict(meta["recipe"])
    except DiffquantError as error:
        raise DiffquantError(f"{meta_file}: {error}") from None
    except (KeyError, TypeError) as error:
        raise DiffquantError(f"{meta_file} holds a broken recipe ({type(error).__name__}: {error}): {fix}") from None
    if not (path / STATE_FILE).is_file():
        raise DiffquantError(f"{path / STATE_FILE} is missing: {fix}")
    pipe = load_pipeline(meta.get("model"), device, dtype)
    try:
        state = load_file(str(path / STATE_FILE))
    except (SafetensorError, OSError) as error:
        raise DiffquantError(f"corrupt quantized weights in {path / STATE_FILE} ({error}): quantize again") from None
    # Static activation scales are overwritten by the saved state, so any one input calibrates the skeleton.
    from .export import example_inputs

    placeholder = [example_inputs(pipe.unet, 1, pipe.tokenizer.model_max_length)] if recipe.needs_calibration else None
    quantized = quantize_unet(pipe, recipe, calibration=placeholder)
    quantized.unet.load_state_dict({k: v.to(quantized.unet.device) for k, v in state.items()}, strict=True)
    return quantized
