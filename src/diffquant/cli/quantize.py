"""`diffquant quantize`: quantize the denoiser (UNet or transformer) and save it for generate/export."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffquant.cli.base import Command
from diffquant.cli.options import add_calibration, add_model, add_size, calibration_options
from diffquant.core.config import RunConfig
from diffquant.core.recipes import RECIPES, get_recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--recipe", required=True, help=f"one of: {', '.join(RECIPES)}")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="fnmatch pattern of module names kept in float (repeatable)")
    p.add_argument("--quantize-all", action="store_true",
                   help="ignore the model profile's measured float layers for this recipe")
    add_calibration(p)
    add_size(p)  # the calibration's image size
    p.add_argument("--out", required=True)


def main(args: argparse.Namespace) -> int:
    from diffquant.core.artifacts import output_folder
    from diffquant.models.generation import default_settings
    from diffquant.models.pipeline import load_pipeline
    from diffquant.quantization.api import layer_report, quantize, save_quantized
    from diffquant.quantization.calibration import calibrate_for_run

    recipe = get_recipe(args.recipe)
    config = RunConfig(model=args.model, height=args.height, width=args.width, frames=args.frames,
                       **calibration_options(args))
    with output_folder(args.out) as out:
        pipe = load_pipeline(args.model, args.device, args.dtype, no_t5=args.no_t5)
        calibration = None
        if recipe.needs_calibration:
            settings = default_settings(pipe)
            calibration, _ = calibrate_for_run(pipe, config, steps=settings.steps, guidance=settings.guidance)
        quantized = quantize(pipe, recipe, calibration=calibration, exclude=args.exclude,
                             profile_exclusions=not args.quantize_all)
        save_quantized(quantized, out, model=args.model)
    from diffquant.models.denoisers import denoiser_of

    report = layer_report(denoiser_of(quantized).module)
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    print(f"quantized {len(report.quantized)} layers ({len(report.float_layers)} left in float), "
          f"{report.bits_per_weight:.2f} bits per weight; saved to {out} ({size / 1e6:.1f} MB)")
    return 0


COMMAND = Command("quantize", "quantize the denoiser (UNet or transformer) and save it for generate/export",
                  add_arguments, main)
