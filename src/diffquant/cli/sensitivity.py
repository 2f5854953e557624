"""`diffquant sensitivity`: rank layers by the error they add alone; emit a mixed-precision recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffquant.cli.base import Command
from diffquant.cli.options import add_calibration, add_model, calibration_options
from diffquant.core.config import RunConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--recipe", default="w8a8-int8", help="recipe to analyse (default w8a8-int8)")
    p.add_argument("--by", choices=("layer", "block"), default="layer", help="unit quantized at a time")
    p.add_argument("--steps", type=int, help="denoising steps of the capture run")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--keep-float", type=int, help="keep the K most sensitive units in float")
    group.add_argument("--target-sqnr", type=float, help="keep the fewest units in float that reach this SQNR (dB)")
    p.add_argument("--max-keep", type=int, default=16, help="longest keep-in-float curve measured (default 16)")
    p.add_argument("--quantize-all", action="store_true",
                   help="rank every layer the recipe allows, ignoring the model profile's measured float layers "
                        "(to re-derive them)")
    add_calibration(p)
    p.add_argument("--out", required=True, help="folder for sensitivity.json, sensitivity.png and the recipe")


def main(args: argparse.Namespace) -> int:
    from diffquant.core.artifacts import output_folder

    with output_folder(args.out) as out:
        return _sensitivity(args, out)


def _sensitivity(args: argparse.Namespace, out: Path) -> int:
    from diffquant.report.sensitivity import sensitivity_report

    config = RunConfig(model=args.model, device=args.device, dtype=args.dtype, no_t5=args.no_t5,
                       quantize_all=args.quantize_all, **calibration_options(args))
    result, mixed = sensitivity_report(config, args.recipe, out, unit=args.by, steps=args.steps,
                                       max_keep=args.max_keep, keep_float=args.keep_float,
                                       target_sqnr_db=args.target_sqnr)
    print(f"all {args.by}s quantized: {result.full_sqnr_db:.2f} dB; most sensitive:")
    for name, sqnr in result.ranking[:10]:
        print(f"  {sqnr:8.2f} dB  {name}")
    print("keep K in float -> SQNR dB: " + ", ".join(f"{k}:{s:.1f}" for k, s in enumerate(result.keep_float_curve)))
    if mixed is not None:
        path = out / f"{mixed.name}.json"
        print(f"wrote {path}: use it with `diffquant run --recipes {path}`")
    print(f"wrote {out / 'sensitivity.json'}, {out / 'sensitivity.png'} and {out / 'report.html'}")
    return 0


COMMAND = Command("sensitivity", "rank layers by the error they add alone; emit a mixed-precision recipe",
                  add_arguments, main)
