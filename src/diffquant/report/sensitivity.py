"""`diffquant sensitivity`: rank a recipe's layers by what quantizing each alone costs, and write the ranking
as JSON, a chart and a one-table report."""

from __future__ import annotations

from pathlib import Path

from diffquant.core.errors import DiffquantError
from diffquant.core.recipes import Recipe, get_recipe
from diffquant.evaluate.sensitivity import SensitivityResult, analyze_sensitivity
from diffquant.core.artifacts import write_json
from diffquant.core.config import check_settings
from diffquant.models.generation import default_settings
from diffquant.quantization.calibration import calibrate_for_run


def sensitivity_report(config, recipe: str | Recipe, out: Path, unit: str = "layer", steps: int | None = None,
                       max_keep: int = 16, keep_float: int | None = None,
                       target_sqnr_db: float | None = None) -> tuple[SensitivityResult, Recipe | None]:
    """`diffquant sensitivity`: load `config.model`, calibrate with the config's options, rank the units
    and write sensitivity.json, sensitivity.png, report.html (and the mixed recipe's JSON when
    `keep_float` or `target_sqnr_db` is given) into `out`.

    Returns (the ranking, the mixed recipe or None)."""
    from diffquant.models.pipeline import load_pipeline
    from diffquant.report.html import write_table_report

    check_settings(steps)
    for flag, value in (("--keep-float", keep_float), ("--max-keep", max_keep)):
        if value is not None and value < 0:
            raise DiffquantError(f"{flag} must be 0 or more, got {value}")
    recipe = get_recipe(recipe)
    pipe = load_pipeline(config.model, config.device, config.dtype, no_t5=config.no_t5)
    settings = default_settings(pipe)
    calibration, described = calibrate_for_run(pipe, config, steps=steps or settings.steps,
                                                guidance=settings.guidance)
    result = analyze_sensitivity(pipe, recipe, calibration, unit=unit, max_keep=max_keep,
                                 profile_exclusions=not config.quantize_all)
    data = result.to_dict() | {"calibration": described}
    mixed = None
    if keep_float is not None or target_sqnr_db is not None:
        mixed = result.mixed_recipe(keep_float, target_sqnr_db)
        write_json(out / f"{mixed.name}.json", mixed.to_dict())
        data["mixed_recipe"] = mixed.to_dict()
    write_json(out / "sensitivity.json", data)
    result.plot(out / "sensitivity.png")
    write_table_report(out, f"Sensitivity of {recipe.name} by {unit}", [unit, "SQNR alone (dB)"],
                       [[name, sqnr] for name, sqnr in result.ranking], "sensitivity.png",
                       [f"all quantized: {result.full_sqnr_db:.2f} dB",
                        "keep K most sensitive in float -> SQNR dB: "
                        + ", ".join(f"{k}: {s:.1f}" for k, s in enumerate(result.keep_float_curve))])
    return result, mixed
