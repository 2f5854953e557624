"""`diffquant generate`: seeded images with a model or a quantized denoiser."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffquant.cli.base import Command
from diffquant.cli.options import add_generation, add_model
from diffquant.core.config import check_settings
from diffquant.core.errors import DiffquantError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p)
    add_generation(p)
    p.add_argument("--quantized", help="folder written by `diffquant quantize` (its model is used)")
    p.add_argument("--out", required=True, help="folder for images/ and prompts.json")


def main(args: argparse.Namespace) -> int:
    from diffquant.core.artifacts import output_folder

    if args.quantized and args.model:
        raise DiffquantError("pass --model or --quantized, not both: a quantized folder names its own model")
    check_settings(args.steps, args.guidance, args.num_images)
    if args.prompts is not None and not all(p.strip() for p in args.prompts):
        raise DiffquantError("empty --prompt: pass a non-empty text, or no --prompt for the model's defaults")
    with output_folder(args.out) as out:
        return _generate(args, out)


def _generate(args: argparse.Namespace, out: Path) -> int:
    from diffquant.core.artifacts import save_image, write_json
    from diffquant.models.generation import default_prompts, default_settings, generate
    from diffquant.models.pipeline import load_pipeline
    from diffquant.quantization.api import load_quantized

    pipe = load_quantized(args.quantized, args.device, args.dtype) if args.quantized else \
        load_pipeline(args.model, args.device, args.dtype, no_t5=args.no_t5)
    settings = default_settings(pipe, args.seed)
    prompts = args.prompts or default_prompts(pipe, args.num_images or 6)
    if args.prompts and args.num_images:
        prompts = [prompts[k % len(prompts)] for k in range(args.num_images)]
    steps = settings.steps if args.steps is None else args.steps
    guidance = settings.guidance if args.guidance is None else args.guidance
    # Written first, and each image as soon as it is made: an interrupted folder says what it holds.
    write_json(out / "prompts.json", {"prompts": prompts, "seed": args.seed, "steps": steps, "guidance": guidance,
                                      "model": args.model, "quantized": args.quantized})
    images = generate(pipe, prompts, seed=args.seed, steps=steps, guidance=guidance, height=args.height,
                      width=args.width, frames=args.frames, on_image=lambda k, image: save_image(image, out / "images" / f"{k:03d}.png"))
    print(f"wrote {len(images)} images to {out / 'images'}")
    return 0


COMMAND = Command("generate", "generate seeded images with a model or a quantized denoiser", add_arguments, main)
