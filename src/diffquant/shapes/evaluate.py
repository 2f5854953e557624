"""Measure a shapes-sd model: ShapeEval accuracy on held-out seeded captions, and the wall time of
generating 8 images at the default settings.

    python -m diffquant.shapes.evaluate [--model DIR] [--n 200]
"""

from __future__ import annotations

import argparse
import time

from .dataset import sample_captions
from .model import DEFAULT_GUIDANCE, DEFAULT_STEPS
from .shapeeval import ATTRIBUTES, evaluate

EVAL_SEED = 4242  # held-out captions and noise; training draws from other seeds


def evaluate_model(pipe, n: int = 200, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                   seed: int = EVAL_SEED) -> dict[str, float]:
    """ShapeEval accuracy of `pipe` on `n` captions drawn with `seed` (image k uses seed + k)."""
    from ..generation import generate

    captions = sample_captions(n, seed=seed)
    images = generate(pipe, captions, seed=seed, steps=steps, guidance=guidance, batch_size=50, desc="evaluate")
    return evaluate(images, captions)


def time_eight_images(pipe, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> float:
    """Seconds to generate 8 images in one batch, after one warm-up call."""
    from ..generation import generate

    captions = sample_captions(8, seed=1)
    generate(pipe, captions[:1], steps=2, guidance=guidance)
    started = time.perf_counter()
    generate(pipe, captions, steps=steps, guidance=guidance, batch_size=8)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffquant.shapes.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="shapes-sd folder (default: the embedded weights)")
    parser.add_argument("--n", type=int, default=200, help="held-out captions (default 200)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    args = parser.parse_args(argv)
    from ..pipeline import load_pipeline

    pipe = load_pipeline(args.model, device="cpu")
    result = evaluate_model(pipe, args.n, args.steps, args.guidance)
    print(f"ShapeEval on {args.n} held-out captions ({args.steps} DDIM steps, guidance {args.guidance}):")
    for name in (*ATTRIBUTES, "overall"):
        count = f" (n={int(result[f'n_{name}'])})" if f"n_{name}" in result else ""
        print(f"  {name:<11} {result[name]:6.1%}{count}")
    print(f"8 images at {args.steps} steps: {time_eight_images(pipe, args.steps, args.guidance):.2f} s")


if __name__ == "__main__":
    main()
