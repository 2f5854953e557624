"""Measure a shapes-sd model: ShapeEval accuracy on held-out seeded captions, and the wall time of
generating 8 images at the default settings; or compare recipes on those captions.

    python -m diffquant.cli.shapes_eval [--model shapes-sd|shapes-sd3|DIR] [--n 200] [--guidance 2,3,4,5]
    python -m diffquant.cli.shapes_eval --recipes int8-w,w8a8-int8 [--calib-prompts random] --out DIR
"""

from __future__ import annotations

import argparse
import time

from diffquant.models.shapes.dataset import sample_captions
from diffquant.models.shapes.shapeeval import ATTRIBUTES, evaluate

EVAL_SEED = 4242  # held-out captions and noise; training draws from other seeds


def evaluate_model(pipe, n: int = 200, steps: int | None = None, guidance: float | None = None,
                   seed: int = EVAL_SEED) -> dict[str, float]:
    """ShapeEval accuracy of `pipe` on `n` captions drawn with `seed` (image k uses seed + k);
    steps and guidance default to the model profile's."""
    from diffquant.models.generation import generate

    captions = sample_captions(n, seed=seed)
    images = generate(pipe, captions, seed=seed, steps=steps, guidance=guidance, batch_size=50, desc="evaluate")
    return evaluate(images, captions)


def time_eight_images(pipe, steps: int | None = None, guidance: float | None = None) -> float:
    """Seconds to generate 8 images in one batch, after one warm-up call."""
    from diffquant.models.generation import generate

    captions = sample_captions(8, seed=1)
    generate(pipe, captions[:1], steps=2, guidance=guidance)
    started = time.perf_counter()
    generate(pipe, captions, steps=steps, guidance=guidance, batch_size=8)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffquant.cli.shapes_eval", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="shapes-sd (default), shapes-sd3, or a folder trained by shapes.train(_sd3)")
    parser.add_argument("--n", type=int, default=200, help="held-out captions (default 200)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model profile's)")
    parser.add_argument("--guidance", help="classifier-free guidance (default: the model profile's); a comma-separated "
                                           "list sweeps it")
    parser.add_argument("--recipes", help="compare these recipes on the held-out captions (diffquant run's flow)")
    parser.add_argument("--calib-prompts", help="with --recipes: calibration source ('random' for the naive baseline)")
    parser.add_argument("--no-export", action="store_true", help="with --recipes: skip ONNX export and ORT images")
    parser.add_argument("--out", help="with --recipes: output folder")
    args = parser.parse_args(argv)
    guidances = [float(g) for g in args.guidance.split(",")] if args.guidance else [None]
    if args.recipes:
        _compare_recipes(args, guidances[0])
        return
    from diffquant.models.generation import default_settings
    from diffquant.models.pipeline import load_pipeline

    pipe = load_pipeline(args.model, device="cpu")
    defaults = default_settings(pipe)
    for guidance in guidances:
        result = evaluate_model(pipe, args.n, args.steps, guidance)
        print(f"ShapeEval on {args.n} held-out captions ({args.steps or defaults.steps} steps, guidance "
              f"{defaults.guidance if guidance is None else guidance}):")
        for name in (*ATTRIBUTES, "overall"):
            count = f" (n={int(result[f'n_{name}'])})" if f"n_{name}" in result else ""
            print(f"  {name:<11} {result[name]:6.1%}{count}")
    print(f"8 images at {args.steps} steps: {time_eight_images(pipe, args.steps, guidances[0]):.2f} s")


def _compare_recipes(args, guidance: float) -> None:
    """`diffquant run` on the held-out captions and seeds, so recipe numbers are comparable with the above."""
    from diffquant.cli.run import summary_table
    from diffquant.core.config import RunConfig
    from diffquant.workflow import run

    config = RunConfig(model=args.model, prompts=sample_captions(args.n, seed=EVAL_SEED), num_images=args.n,
                       seed=EVAL_SEED, steps=args.steps, guidance=guidance, recipes=args.recipes.split(","),
                       export=not args.no_export, out=args.out, calib_prompts=args.calib_prompts)
    print(summary_table(run(config)))


if __name__ == "__main__":
    main()
