"""Stage 3, quantize: a copy of the pipeline whose denoiser (UNet or transformer) is quantized by a
backend (AMD Quark, see `backends/quark`); save it and reload it without calibration data."""

from __future__ import annotations

import copy
import inspect
import logging
from pathlib import Path

import torch

from diffquant.quantization.backends import DEFAULT_BACKEND, LayerReport, backend_of, get_backend
from diffquant.models.denoisers import DENOISERS, denoiser_of
from diffquant.core.errors import DiffquantError
from diffquant.core.plan import FLOAT, LayerPlan
from diffquant.core.recipes import Recipe, get_recipe
from diffquant.core.record import note, record_of
from diffquant.core.artifacts import atomic_dir, read_json, write_json
from diffquant.core.recipes import recipe_from_dict
from diffquant.models.profiles import profile_of
from diffquant.quantization.plan import plan_layers

logger = logging.getLogger(__name__)


def layer_report(module: torch.nn.Module) -> LayerReport:
    """Inspect a (possibly) quantized denoiser: each Linear/Conv2d is quantized (with its scheme) or float."""
    return backend_of(module).layer_report(module)


def quantize_module(module: torch.nn.Module, recipe: str | Recipe, calibration: list[dict] | None = None,
                    exclude: tuple[str, ...] | list[str] = (), backend: str = DEFAULT_BACKEND,
                    in_place: bool = False, profile_rule=None) -> torch.nn.Module:
    """Quantize a copy of a bare denoiser module (see `quantize`); `module` is left untouched unless
    `in_place`, for a caller that has no further use for the float module (no second copy in memory:
    3.4 GB less at the peak for an SD 1.5 UNet). `profile_rule`: the model profile's `KeepFloat` for
    this recipe, whose layers stay float too. The module's record holds the per-layer plan."""
    recipe = get_recipe(recipe)
    plan = plan_layers(module, recipe, exclude, profile_rule, backend)
    patterns = tuple(exclude) + (profile_rule.patterns if profile_rule is not None else ())
    if patterns:  # the recorded recipe names every pattern it was run with
        recipe = recipe.with_exclude(patterns)
    if recipe.needs_calibration and not calibration:
        reads = "SVDQuant's statistics" if recipe.algorithm else "activation ranges"
        raise DiffquantError(f"recipe {recipe.name} needs calibration data ({reads}), got "
                             f"{'an empty list' if calibration is not None else 'none'}: pass calibrate(pipe, prompts)")
    quantizer = get_backend(backend)
    # The backend is told the layers kept float by choice; those its weight cannot take it finds (and logs) itself.
    unfit = quantizer.unfit_layers(module, recipe, [])
    excluded = [e.name for e in plan.layers if e.action == FLOAT and unfit.get(e.name) != e.reason]
    if excluded:
        logger.info("%s", plan.summary())
    work = module if in_place else copy.deepcopy(module)
    smoothing = None
    if recipe.smoothing is not None:
        from diffquant.quantization.smoothing import smooth

        with torch.no_grad():
            smoothing = smooth(work, recipe, calibration, excluded)
    quantized = quantizer.quantize(work, recipe, excluded, calibration)
    quantized.eval()
    if recipe.attention is not None:  # after the layers: the ranges are those the quantized layers produce
        from diffquant.quantization.attention import calibrate_attention

        calibrate_attention(quantized, calibration)
    note(quantized, recipe=recipe, excluded=tuple(excluded), backend=quantizer.name, smoothing=smoothing, plan=plan,
         float_reason="" if profile_rule is None else profile_rule.reason)
    return quantized


def with_denoiser(pipe, attribute: str, module: torch.nn.Module):
    """A pipeline of the same class as `pipe` sharing its components, with `module` as its denoiser."""
    components = dict(pipe.components)
    components[attribute] = module
    if "requires_safety_checker" in inspect.signature(type(pipe).__init__).parameters:
        components["requires_safety_checker"] = pipe.config.get("requires_safety_checker", False)
    made = type(pipe)(**components)
    made.set_progress_bar_config(disable=True)
    made.register_to_config(_name_or_path=pipe.name_or_path)
    return made


def quantize(pipe, recipe: str | Recipe, calibration: list[dict] | None = None,
             exclude: tuple[str, ...] | list[str] = (), backend: str = DEFAULT_BACKEND,
             profile_exclusions: bool = True):
    """Quantize a copy of the pipeline's denoiser (`pipe.unet` or `pipe.transformer`) and return a new
    pipeline that uses it.

    Every Linear and Conv2d layer is quantized (a transformer's attention, context-stream, feed-forward,
    AdaLayerNorm modulation and embedding projections, and SD3's patch-embedding Conv2d) except the
    recipe's `exclude` patterns, `exclude`, the denoiser family's `default_exclusions` and, for a recipe
    the model's profile has measured, the profile's `keep_float` layers (see `diffquant.models.profiles`).

    The original pipeline and its denoiser are left untouched, so a baseline and several recipes can be
    compared in one process; the new pipeline shares the text encoders, VAE, tokenizers and scheduler.

    Args:
        pipe: a diffusers pipeline whose denoiser diffquant supports (see `diffquant.models.denoisers`).
        recipe: a recipe name (see `diffquant.RECIPES`), a recipe .json file, or a `Recipe`.
        calibration: denoiser forward-kwargs dicts (from `calibrate`); required when the recipe quantizes
            activations, never read for weight-only recipes.
        exclude: extra fnmatch patterns of module names kept in float.
        backend: the quantization backend (see `diffquant.quantization.backends`).
        profile_exclusions: apply the profile's measured float layers for this recipe (False: quantize
            every layer the recipe and `exclude` allow).

    Returns:
        A pipeline of the same class whose denoiser is the quantized copy; its denoiser's
        record (`diffquant.core.record.record_of`) says why layers were kept in float ("" when none were by the profile).
    """

    family = denoiser_of(pipe)
    recipe = get_recipe(recipe)
    rule = profile_of(pipe).keep_float_for(recipe.name) if profile_exclusions else None
    if rule is not None:
        logger.info("%s: the model's profile keeps %s in float (%s)", recipe.name, ", ".join(rule.patterns), rule.reason)
    quantized = quantize_module(family.module, recipe, calibration, exclude, backend, profile_rule=rule)
    return with_denoiser(pipe, family.pipeline_attribute, quantized)


ARTIFACT_FILE = "diffquant_quantized.json"
ARTIFACT_TYPE = "QuantizedDenoiser"
ARTIFACT_VERSION = 3
# Version 1 ("QuantizedUNet") held a UNet and no list of its float layers: they are matched again from the recipe.
# Version 2 held float master weights; version 3 holds int8 / packed 4-bit codes (backends/quark/fourbit.py).
_READABLE = {(ARTIFACT_TYPE, ARTIFACT_VERSION), (ARTIFACT_TYPE, 2), ("QuantizedUNet", 1)}


def state_file(attribute: str) -> str:
    """The safetensors file of a quantized denoiser, by its pipeline attribute ('unet_quantized.safetensors')."""
    return f"{attribute}_quantized.safetensors"


def save_quantized(quantized_pipe, out_dir: str | Path, model: str | None = None) -> Path:
    """Write a quantized denoiser (weights and the backend's scales), its recipe, the layers it kept in
    float and its source model to `out_dir` (replaced atomically).

    Reload with `load_quantized`, which needs no calibration data; outputs after reload equal those before.
    """
    from safetensors.torch import save_file

    family = denoiser_of(quantized_pipe)
    module = family.module
    recipe = record_of(module).recipe
    if recipe is None:
        raise DiffquantError(f"this pipeline's {family.name} was not quantized by diffquant.quantize: nothing to save")
    backend = get_backend(record_of(module).backend)
    with atomic_dir(Path(out_dir)) as tmp:
        save_file(backend.state_dict(module), str(tmp / state_file(family.pipeline_attribute)))
        write_json(tmp / ARTIFACT_FILE, {
            "type": ARTIFACT_TYPE, "version": ARTIFACT_VERSION, "model": model, "denoiser": family.module_class,
            "backend": backend.name, "recipe": recipe.to_dict(), "excluded": list(record_of(module).excluded),
            "record": backend.record(module),
            "plan": None if record_of(module).plan is None else record_of(module).plan.to_dict()})
    return Path(out_dir)


def _read_artifact(path: Path) -> tuple[dict, Recipe]:
    """The checked contents of `path`/diffquant_quantized.json and its recipe."""

    meta_file = path / ARTIFACT_FILE
    fix = "quantize again with `diffquant quantize`"
    meta = read_json(meta_file, f"{path} holds no quantized denoiser ({ARTIFACT_FILE} missing): run "
                     f"`diffquant quantize --out {path}` first", fix=fix)
    if not isinstance(meta, dict) or (meta.get("type"), meta.get("version")) not in _READABLE:
        found = f"{meta.get('type')} v{meta.get('version')}" if isinstance(meta, dict) else type(meta).__name__
        raise DiffquantError(f"{meta_file} is not a diffquant quantized UNet or transformer ({ARTIFACT_TYPE} "
                             f"v{ARTIFACT_VERSION}; found {found}): {fix}")
    if meta["version"] == 1:
        meta = meta | {"denoiser": "UNet2DConditionModel", "backend": "quark", "excluded": None}
    if not isinstance(meta.get("recipe"), dict) or not isinstance(meta.get("model"), (str, type(None))):
        raise DiffquantError(f"{meta_file} lacks its recipe or names its model wrongly: {fix}")
    excluded = meta.get("excluded")
    if not isinstance(meta.get("denoiser"), str) or not isinstance(meta.get("backend"), str) or not (
            excluded is None and meta["version"] == 1
            or isinstance(excluded, list) and all(isinstance(n, str) for n in excluded)):
        raise DiffquantError(f"{meta_file} lacks its denoiser class, backend or list of float layers: {fix}")
    try:
        recipe = recipe_from_dict(meta["recipe"])
    except DiffquantError as error:
        raise DiffquantError(f"{meta_file}: {error}") from None
    except (KeyError, TypeError) as error:
        raise DiffquantError(f"{meta_file} holds a broken recipe ({type(error).__name__}: {error}): {fix}") from None
    return meta, recipe


def load_quantized(path: str | Path, device: str = "auto", dtype: str = "auto", pipe=None):
    """Load a pipeline whose denoiser is the quantized one saved by `save_quantized` (or `diffquant quantize`).

    The backend rebuilds the quantized layers on the float denoiser and loads the saved weights and
    scales into them: nothing is calibrated again and no input is run.

    Args:
        path: the folder `save_quantized` wrote.
        device, dtype: where and how the model the artifact names is loaded (see `load_pipeline`).
        pipe: that model's float pipeline when it is already loaded (left untouched; `device` and
            `dtype` are then unused).

    Returns:
        A pipeline whose `unet` or `transformer` is the quantized denoiser.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta, recipe = _read_artifact(path)
    if meta["denoiser"] not in DENOISERS:
        raise DiffquantError(f"{path} holds a quantized {meta['denoiser']}, which this diffquant does not know "
                             f"(it knows {', '.join(DENOISERS)}): quantize again with this version")
    weights = path / state_file(DENOISERS[meta["denoiser"]].pipeline_attribute)
    if not weights.is_file():
        raise DiffquantError(f"{weights} is missing: quantize again with `diffquant quantize`")
    backend = get_backend(meta["backend"])
    loaded = pipe is None
    if loaded:
        from diffquant.models.pipeline import load_pipeline

        pipe = load_pipeline(meta.get("model"), device, dtype)
    family = denoiser_of(pipe)
    if family.module_class != meta["denoiser"]:
        raise DiffquantError(f"{path} holds a quantized {meta['denoiser']}, but the pipeline's denoiser is a "
                             f"{family.module_class}: load it with the model it was quantized from")
    if record_of(family.module).quantized:
        raise DiffquantError("load_quantized needs the float pipeline, got one whose denoiser is already quantized")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise DiffquantError(f"corrupt quantized weights in {weights} ({error}): quantize again") from None
    excluded = meta["excluded"] if meta["excluded"] is not None else plan_layers(family.module, recipe).float_layers
    module = family.module if loaded else copy.deepcopy(family.module)  # a caller's pipeline stays float
    record = meta.get("record") if isinstance(meta.get("record"), dict) else None  # absent from older files
    ranges = {}
    if recipe.attention is not None:
        from diffquant.quantization.attention import restore_attention, split_state

        state, ranges = split_state(state)
    quantized = backend.restore(module, recipe, excluded, state, record)
    if recipe.attention is not None:
        restore_attention(quantized, ranges)
    quantized.eval()
    try:
        plan = LayerPlan.from_dict(meta["plan"]) if isinstance(meta.get("plan"), dict) else None
    except (ValueError, KeyError, TypeError) as error:
        raise DiffquantError(f"{path / ARTIFACT_FILE} holds a layer plan this diffquant cannot read ({error}): "
                             "quantize again with `diffquant quantize`") from None
    note(quantized, recipe=recipe, excluded=tuple(excluded), backend=backend.name, plan=plan)
    return with_denoiser(pipe, family.pipeline_attribute, quantized)
