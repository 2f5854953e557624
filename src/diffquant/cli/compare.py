"""`diffquant compare`: fidelity of generated folders against a baseline folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffquant.cli.base import Command
from diffquant.core.errors import DiffquantError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("baseline", help="folder written by `diffquant generate`")
    p.add_argument("others", nargs="+", help="folders to compare (same prompts and seeds)")
    p.add_argument("--out", required=True, help="folder for comparison.json and grid.png")


def main(args: argparse.Namespace) -> int:
    from diffquant.core.artifacts import output_folder

    base_meta, base_images = _load_generated(args.baseline)
    loaded = {}
    for folder in args.others:  # every folder is read and checked before any metric is computed
        meta, images = _load_generated(folder)
        if meta["prompts"] != base_meta["prompts"] or meta["seed"] != base_meta["seed"]:
            raise DiffquantError(f"{folder} was generated with other prompts or seeds than {args.baseline}: compare like with like")
        loaded[folder] = (meta, images)
    with output_folder(args.out) as out:
        _compare(args, out, base_images, loaded)
    return 0


def _load_generated(folder: str):
    from PIL import UnidentifiedImageError

    from diffquant.core.artifacts import read_json
    from diffquant.evaluate.scoring import read_images

    meta_file = Path(folder) / "prompts.json"
    meta = read_json(meta_file, f"{folder} has no prompts.json: pass a folder written by `diffquant generate`",
                     fix="generate the folder again")
    if not isinstance(meta, dict) or not isinstance(meta.get("prompts"), list) or "seed" not in meta:
        raise DiffquantError(f"{meta_file} lacks its prompts or seed: pass a folder written by `diffquant generate`")
    paths = [Path(folder) / "images" / f"{k:03d}.png" for k in range(len(meta["prompts"]))]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DiffquantError(f"{folder} lacks {len(missing)} of its {len(paths)} images (first: images/{missing[0]}): "
                             "generate the folder again")
    try:
        images = read_images(paths)
    except (UnidentifiedImageError, OSError) as error:
        raise DiffquantError(f"an image of {folder} cannot be read ({error}): generate the folder again") from None
    return meta, images


def _compare(args: argparse.Namespace, out: Path, base_images, loaded: dict) -> None:
    from diffquant.core.artifacts import save_image, write_json
    from diffquant.evaluate.metrics import compare
    from diffquant.models.generation import image_grid

    rows, results = {"baseline": base_images}, {}
    for folder, (meta, images) in loaded.items():
        results[folder] = compare(base_images, images, meta["prompts"]).to_dict()
        rows[Path(folder).name] = images
    save_image(image_grid(rows), out / "grid.png")
    write_json(out / "comparison.json", {"baseline": args.baseline, "results": results})
    for folder, r in results.items():
        mean = r["mean"]
        se = mean.get("shapeeval")
        print(f"{folder}: PSNR {mean['psnr_db']:.2f} dB, SSIM {mean['ssim']:.4f}"
              + (f", ShapeEval {se['overall']:.3f}" if se else ""))
    print(f"wrote {out / 'comparison.json'} and {out / 'grid.png'}")


COMMAND = Command("compare", "fidelity of generated folders against a baseline folder", add_arguments, main)
