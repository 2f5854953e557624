"""Sensitivity analysis: quantize one layer (or block) at a time, rank by the denoiser output's SQNR,
and derive a mixed-precision recipe that keeps the most sensitive layers in float.

The denoiser (UNet or transformer) is quantized and calibrated once; each candidate is then measured
by turning Quark's fake quantization on for that layer only (its weight, input and output quantizers),
which costs one evaluation pass per layer instead of one quantization per layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from diffquant.quantization.backends import backend_of
from diffquant.models.denoisers import denoiser_of
from diffquant.core.errors import DiffquantError
from diffquant.evaluate.metrics import sqnr_db
from diffquant.core.progress import progress
from diffquant.quantization.api import layer_report, quantize
from diffquant.core.recipes import Recipe, get_recipe
from diffquant.core.record import record_of
from diffquant.core.artifacts import atomic_path

logger = logging.getLogger(__name__)


@dataclass
class SensitivityResult:
    """Layers (or blocks) ranked from most to least sensitive, with the SQNR (dB) of the denoiser output
    when only that unit is quantized; `keep_float_curve[k]` is the full model's SQNR with the k most
    sensitive units left in float."""

    recipe: Recipe
    unit: str
    full_sqnr_db: float
    ranking: list[tuple[str, float]]
    members: dict[str, list[str]] = field(default_factory=dict)
    keep_float_curve: list[float] = field(default_factory=list)

    def mixed_recipe(self, keep_float: int | None = None, target_sqnr_db: float | None = None) -> Recipe:
        """The recipe with the K most sensitive units in float: K given, or the smallest K whose
        measured full-model SQNR reaches `target_sqnr_db`."""
        if (keep_float is None) == (target_sqnr_db is None):
            raise DiffquantError("pass exactly one of --keep-float K or --target-sqnr DB")
        if keep_float is None:
            reached = [k for k, sqnr in enumerate(self.keep_float_curve) if sqnr >= target_sqnr_db]
            if not reached:
                best = max(self.keep_float_curve)
                raise DiffquantError(f"no measured K reaches {target_sqnr_db} dB (best {best:.1f} dB): lower the "
                                     "target or raise --max-keep")
            keep_float = reached[0]
        names = [n for unit, _ in self.ranking[:keep_float] for n in self.members.get(unit, [unit])]
        return replace(self.recipe.with_exclude(names), name=f"{self.recipe.name}-mixed{keep_float}")

    def to_dict(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "unit": self.unit, "full_sqnr_db": self.full_sqnr_db,
                "ranking": [{"name": n, "sqnr_db": s} for n, s in self.ranking],
                "keep_float_curve_db": self.keep_float_curve}

    def plot(self, path: Path, top: int = 25) -> Path:
        """A horizontal bar chart of the `top` most sensitive units (matplotlib, PNG, written atomically)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shown = self.ranking[:top][::-1]
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(shown) + 1.2))
        ax.barh([n for n, _ in shown], [s for _, s in shown], color="#c44")
        ax.axvline(self.full_sqnr_db, color="black", linestyle="--", label=f"all quantized: {self.full_sqnr_db:.1f} dB")
        ax.set_xlabel("denoiser output SQNR with only this unit quantized (dB, lower = more sensitive)")
        ax.set_title(f"{self.recipe.name}: most sensitive {self.unit}s")
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        return Path(path)


def _unit_of(name: str, unit: str) -> str:
    if unit == "layer":
        return name
    parts = name.split(".")
    # down_blocks.1.attentions.0.* -> down_blocks.1.attentions.0; transformer_blocks.3.* -> transformer_blocks.3;
    # conv_in -> conv_in
    return ".".join(parts[:4]) if parts[0] in ("down_blocks", "up_blocks") else ".".join(parts[:2])


def _switch(denoiser: torch.nn.Module, original: torch.nn.Module, names: list[str], rewrites_weights: bool):
    """A function (names, quantized) that puts the named layers of the quantized `denoiser` in their
    quantized or float form. Fake quantization switched off gives a layer back its float weights, except
    where an algorithm rewrote them (SVDQuant/GPTQ: a rounded residual, a smoothing divisor and a branch
    in a wrapper); there the float layer of the `original` denoiser is put in the wrapper's place."""
    quantized_layers = {name: denoiser.get_submodule(name) for name in names}
    float_layers = {name: original.get_submodule(name) for name in names} if rewrites_weights else {}

    def use(members: list[str], quantized: bool) -> None:
        if not rewrites_weights:
            backend_of(denoiser).set_fake_quant([quantized_layers[n] for n in members], quantized)
            return
        for name in members:
            denoiser.set_submodule(name, quantized_layers[name] if quantized else float_layers[name])

    return use


def analyze_sensitivity(pipe, recipe: str | Recipe, calibration, eval_inputs: list[dict] | None = None,
                        unit: str = "layer", max_keep: int = 16, profile_exclusions: bool = True) -> SensitivityResult:
    """Rank the denoiser's layers (unit='layer') or blocks (unit='block') by how much quantizing them alone
    hurts the output SQNR on `eval_inputs` (default: up to 8 items of the calibration data).

    Returns:
        A `SensitivityResult`, most sensitive first, with the keep-in-float curve up to `max_keep`.
        `profile_exclusions=False` ranks every layer the recipe allows (what re-derives a profile's float layers).
    """
    if unit not in ("layer", "block"):
        raise DiffquantError(f"unknown sensitivity unit {unit!r}: use layer or block")
    recipe = get_recipe(recipe)
    quantized = quantize(pipe, recipe, calibration=calibration if recipe.needs_calibration else None,
                         profile_exclusions=profile_exclusions)
    denoiser = denoiser_of(quantized).module
    # The recipe as `quantize` applied it, with the profile's float layers for this recipe: the ranking is
    # measured with them float, so a mixed recipe derived from it (another name, which the profile does not
    # know) keeps them float too and reproduces the measured curve.
    recipe = record_of(denoiser).recipe
    eval_inputs = list(eval_inputs or [calibration[i] for i in range(min(8, len(calibration)))])
    if not eval_inputs:
        raise DiffquantError("sensitivity needs evaluation inputs: pass calibration data")

    def outputs(module) -> torch.Tensor:
        with torch.no_grad():
            tensor = denoiser_of(pipe).output_tensor  # a module that returns a list per sample (Z-Image): stacked
            return torch.cat([tensor(module(**item, return_dict=False)[0]).flatten().float() for item in eval_inputs])

    reference = outputs(denoiser_of(pipe).module)
    names = list(layer_report(denoiser).quantized)
    units: dict[str, list[str]] = {}
    for name in names:
        units.setdefault(_unit_of(name, unit), []).append(name)
    use = _switch(denoiser, denoiser_of(pipe).module, names, rewrites_weights=recipe.algorithm is not None)
    full = sqnr_db(reference, outputs(denoiser))

    scores = []
    use(names, quantized=False)
    try:
        for key in progress(units, desc=f"sensitivity ({unit})", total=len(units)):
            use(units[key], quantized=True)
            scores.append((key, sqnr_db(reference, outputs(denoiser))))
            use(units[key], quantized=False)
        ranking = sorted(scores, key=lambda pair: pair[1])
        use(names, quantized=True)
        curve = [full]
        for key, _ in progress(ranking[:max_keep], desc="keep-float curve"):
            use(units[key], quantized=False)
            curve.append(sqnr_db(reference, outputs(denoiser)))
    finally:
        use(names, quantized=True)
    logger.info("sensitivity of %s: all quantized %.1f dB; most sensitive %s (%.1f dB alone)",
                recipe.name, full, ranking[0][0], ranking[0][1])
    return SensitivityResult(recipe, unit, full, ranking, units, curve)
