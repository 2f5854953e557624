"""`diffquant`: a thin command line over the Python API. It parses arguments and calls the API.

Heavy imports (torch, diffusers, Quark) happen inside the commands, so `--help`, `view` and `env`
answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from diffquant.core.errors import DiffquantError, Terminated, describe_write_error

logger = logging.getLogger("diffquant")


def _add_generation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                   help="prompt (repeatable); default: shapes captions for shapes-sd, the tutorial's rabbit otherwise")
    p.add_argument("--num-images", type=int, help="images in all; prompts are cycled (image k uses seed + k)")
    p.add_argument("--seed", type=int, default=1024, help="seed of the first image (default 1024)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model profile's, e.g. 25 for shapes-sd, "
                                             "50 for SD 1.5, 28 for SD3)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model profile's, e.g. 3 for shapes-sd; "
                                                  "FLUX.1-dev: the distilled guidance input; FLUX.1-schnell: none)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="shapes-sd (the default, embedded), shapes-sd3 (embedded), a Hub id or a local "
                                   "diffusers folder (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1)")
    p.add_argument("--no-t5", action="store_true",
                   help="SD3: load without the T5 text encoder (less memory; prompts read by CLIP only)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (ROCm GPUs are cuda too)")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16 "
                                                   "(bf16: with --no-export only)")


def _add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-prompts", metavar="SOURCE",
                   help="calibration prompts: a .txt/.csv/.jsonl/.parquet file, a dataset folder or a Hugging Face "
                        "dataset id, or 'random' for random inputs (a baseline); default for shapes-sd: captions "
                        "drawn with a seed disjoint from evaluation")
    p.add_argument("--calib-size", type=int, default=64, help="calibration prompts (default 64)")
    p.add_argument("--calib-steps", type=int, help="denoising steps of the capture run (default: --steps)")
    p.add_argument("--calib-timesteps", type=int, default=8,
                   help="timesteps kept per trajectory, spread uniformly (default 8; 0 = all)")
    p.add_argument("--calib-column", help="prompt column (default: caption, TEXT, text or prompt)")
    p.add_argument("--calib-split", default="train", help="dataset split (default train)")


def _add_evaluation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", dest="prompt_source", metavar="SOURCE",
                   help="evaluation prompts, the first --num-images of: a .txt/.csv/.jsonl/.parquet file, a dataset "
                        "folder or a Hugging Face dataset id (streamed), as --calib-prompts")
    p.add_argument("--prompts-column", help="prompt column of --prompts (default: caption, TEXT, text or prompt)")
    p.add_argument("--prompts-split", default="train", help="dataset split of --prompts (default train)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default 8); it does not "
                                                             "change the images")
    p.add_argument("--clip-model", metavar="ID_OR_DIR",
                   help="CLIP model for the CLIP score (and FID's features when InceptionV3's are not on disk), "
                        "e.g. openai/clip-vit-large-patch14 or a local folder")
    p.add_argument("--reference-images", metavar="DIR", help="folder of real images: FID of every image set against "
                                                              "them")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (same options): images already there are not generated again")


# export.INT4_COMPUTE's choices, written out: the CLI imports torch (through export) only when a command runs.
INT4_COMPUTE_CHOICES = ("float", "int8", "auto")
INT4_COMPUTE_HELP = ("how ONNX Runtime multiplies 4-bit Linears: float (dequantized weights, exact to torch), "
                     "int8 (inputs rounded to int8 per block, integer dot products: faster at group 128 and above "
                     "on CPUs with VNNI) or auto (int8 with VNNI/AMX, else float); default $DIFFQUANT_INT4_COMPUTE, "
                     "else float")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffquant", description="Quantize the denoiser of diffusion pipelines "
                                     "(UNet or DiT) with AMD Quark, measure what it costs, export to ONNX.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="debug logs")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads of torch and ONNX Runtime (default: $DIFFQUANT_THREADS, else "
                             "$OMP_NUM_THREADS if set, else the CPUs this process may use)")
    sub = parser.add_subparsers(dest="command", required=True)

    from diffquant.core.recipes import DEFAULT_RECIPES, RECIPES

    recipe_help = "; ".join(f"{n}: {r.description}" for n, r in RECIPES.items())
    p = sub.add_parser("run", help="the whole tutorial: baseline, quantize, compare, export, report")
    _add_model(p)
    _add_generation(p)
    p.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help=f"comma-separated ({recipe_help})")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="fnmatch pattern of module names kept in float, for every recipe (repeatable)")
    p.add_argument("--quantize-all", action="store_true",
                   help="ignore the model profile's measured float layers (e.g. shapes-sd's for the W8A8 int8 "
                        "recipes): quantize every layer the recipe and --exclude allow")
    _add_calibration(p)
    _add_evaluation(p)
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export and its ONNX Runtime check")
    p.add_argument("--export-pipeline", action="store_true",
                   help="also write each recipe's whole pipeline as ONNX in Optimum's layout (pipeline/<recipe>/)")
    p.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "openvino"),
                   help="runtime that generates with each exported denoiser (default onnxruntime)")
    p.add_argument("--out", help="output folder (default ./diffquant-out/<timestamp>/; never overwritten)")
    p.add_argument("--config", metavar="CONFIG_JSON",
                   help="replay the config.json of an earlier run (every other option but --out is ignored)")

    p = sub.add_parser("sensitivity", help="rank layers by the error they add alone; emit a mixed-precision recipe")
    _add_model(p)
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
    _add_calibration(p)
    p.add_argument("--out", required=True, help="folder for sensitivity.json, sensitivity.png and the recipe")

    p = sub.add_parser("generate", help="generate seeded images with a model or a quantized denoiser")
    _add_model(p)
    _add_generation(p)
    p.add_argument("--quantized", help="folder written by `diffquant quantize` (its model is used)")
    p.add_argument("--out", required=True, help="folder for images/ and prompts.json")

    p = sub.add_parser("quantize", help="quantize the denoiser (UNet or transformer) and save it for generate/export")
    _add_model(p)
    p.add_argument("--recipe", required=True, help=f"one of: {', '.join(RECIPES)}")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="fnmatch pattern of module names kept in float (repeatable)")
    p.add_argument("--quantize-all", action="store_true",
                   help="ignore the model profile's measured float layers for this recipe")
    _add_calibration(p)
    p.add_argument("--out", required=True)

    p = sub.add_parser("compare", help="fidelity of generated folders against a baseline folder")
    p.add_argument("baseline", help="folder written by `diffquant generate`")
    p.add_argument("others", nargs="+", help="folders to compare (same prompts and seeds)")
    p.add_argument("--out", required=True, help="folder for comparison.json and grid.png")

    p = sub.add_parser("export", help="export a quantized denoiser to ONNX and check it in ONNX Runtime")
    p.add_argument("quantized", help="folder written by `diffquant quantize`")
    p.add_argument("--device", default="auto")
    p.add_argument("--pipeline", action="store_true",
                   help="write the whole pipeline (text encoder, VAE, scheduler, tokenizer, quantized UNet) in the "
                        "folder layout that Optimum's ORTDiffusionPipeline loads")
    p.add_argument("--int4-compute", choices=INT4_COMPUTE_CHOICES, help=INT4_COMPUTE_HELP)
    p.add_argument("--out", required=True)

    p = sub.add_parser("view", help="open an ONNX file in Netron on 127.0.0.1")
    p.add_argument("onnx", help=".onnx file or a folder holding unet.onnx")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--no-browser", action="store_true", help="only print the URL")

    p = sub.add_parser("bench", help="side-by-side latency, memory and size: torch, fake-quant, ONNX Runtime, OpenVINO")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="pipeline to benchmark (default: shapes-sd)")
    source.add_argument("--arch", help="a real architecture with random weights instead: sd15, sd35-medium or flux (transformers at reduced depth)")
    p.add_argument("--recipe", default="w8a8-int8-ort",
                   help="recipe(s) of the quantized rows, comma-separated, e.g. w8a8-int8-ort,int4-w-gptq "
                        "(default w8a8-int8-ort)")
    p.add_argument("--iterations", type=int, default=10, help="timed denoiser calls per row (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--batch", type=int, default=2, help="denoiser batch (default 2: one image with guidance; Flux: 1)")
    p.add_argument("--images", type=int, default=2, help="images for the time per image (default 2)")
    p.add_argument("--no-compile", action="store_true", help="skip the fake-quant row through torch.compile")
    p.add_argument("--runtime", help="rows to run, comma-separated: torch,onnxruntime,openvino (default: all)")
    p.add_argument("--int4-compute", choices=INT4_COMPUTE_CHOICES, help=INT4_COMPUTE_HELP)
    p.add_argument("--out", help="folder for bench.json, bench.png and the ONNX files")

    p = sub.add_parser("peers", help="diffquant's recipes beside ModelOpt, optimum-quanto, NNCF, torchao, bitsandbytes "
                                     "and GGUF on the same model, captions and fp32 images (8 or 4 bits)")
    from diffquant.peers.options import add_arguments

    add_arguments(p)

    p = sub.add_parser("bench-table", help="the Markdown table of bench.json files (for docs/)")
    p.add_argument("bench_json", nargs="+", help="bench.json written by `diffquant bench`")

    sub.add_parser("env", help="versions, devices, the CPU and what diffquant chose from it")
    return parser


def _cmd_run(args) -> int:
    from diffquant.core.config import RunConfig
    from diffquant.workflow import run

    if args.config:  # replay: the saved config, with only --out changed (a run never overwrites a folder)
        config = RunConfig.load(args.config).replace(out=args.out, resume=args.resume)
    else:
        config = RunConfig(model=args.model, prompts=args.prompts, num_images=args.num_images, seed=args.seed,
                           steps=args.steps, guidance=args.guidance,
                           recipes=[n.strip() for n in args.recipes.split(",")],
                           device=args.device, dtype=args.dtype, no_t5=args.no_t5, export=not args.no_export,
                           export_pipeline=args.export_pipeline, runtime=args.runtime, out=args.out,
                           exclude=args.exclude, quantize_all=args.quantize_all, prompt_source=args.prompt_source,
                           prompt_column=args.prompts_column, prompt_split=args.prompts_split,
                           batch_size=args.batch_size, clip_model=args.clip_model,
                           reference_images=args.reference_images, resume=args.resume,
                           **_calibration_options(args))
    results = run(config)
    from diffquant.evaluate.sharding import processes

    if processes(config.device).is_main_process:  # under `accelerate launch`, the main process reports
        print(summary_table(results))
        print(f"report: {Path(results.out_dir) / 'report.html'}")
    return 0


def _calibration_options(args) -> dict:
    return {"calib_prompts": args.calib_prompts, "calib_size": args.calib_size, "calib_steps": args.calib_steps,
            "calib_timesteps": args.calib_timesteps or None, "calib_column": args.calib_column,
            "calib_split": args.calib_split}


def _cmd_sensitivity(args) -> int:
    from diffquant.core.artifacts import output_folder

    with output_folder(args.out) as out:
        return _sensitivity(args, out)


def _sensitivity(args, out: Path) -> int:
    from diffquant.core.config import RunConfig
    from diffquant.report.sensitivity import sensitivity_report

    config = RunConfig(model=args.model, device=args.device, dtype=args.dtype, no_t5=args.no_t5,
                       quantize_all=args.quantize_all, **_calibration_options(args))
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


def summary_table(results) -> str:
    """A plain-text table of the run's quality, sizes and (labelled) times (`results`: a RunResult)."""
    lines = [f"{'recipe':<16} {'PSNR dB':>8} {'p10':>6} {'worst':>6} {'SSIM':>7} {'ShapeEval':>9} {'SQNR dB':>8} "
             f"{'bits/w':>6} {'ONNX MB':>8} {'gen s*':>7}"]
    baseline_se = results.baseline_shapeeval
    timings = results.timings
    baseline_score = f"{baseline_se['overall']:.3f}" if baseline_se else "n/a"
    lines.append(f"{'baseline':<16} {'':>8} {'':>6} {'':>6} {'':>7} {baseline_score:>9} {'':>8} {'32':>6} "
                 f"{results.denoiser_fp32_bytes / 1e6:>8.1f} {timings.get('generate baseline', 0):>7.1f}")
    for name, r in results.recipes.items():
        q = r.quality
        onnx_mb = f"{r.onnx['size_bytes'] / 1e6:.1f}" if r.onnx else "-"  # - : not exported
        gen = timings.get(f"generate {name} (simulated fake-quant)", float("nan"))
        score = f"{q.shapeeval['overall']:.3f}" if q.shapeeval else "n/a"
        bits = r.layers.get("bits_per_weight")  # absent from results written before it was recorded
        bits = "-" if bits is None else f"{bits:.2f}"
        p10, worst = (f"{v:.2f}" if v is not None else "-" for v in (q.psnr_p10_db, q.psnr_worst_db))
        lines.append(f"{name:<16} {q.psnr_db:>8.2f} {p10:>6} {worst:>6} {q.ssim:>7.4f} {score:>9} {r.sqnr_db:>8.2f} "
                     f"{bits:>6} {onnx_mb:>8} {gen:>7.1f}")
    lines.append("* quantized generation runs Quark fake-quant (simulated): no speedup is claimed. "
                 "p10 / worst: the 10th-percentile and lowest image PSNR. Baseline 'ONNX MB' is the fp32 parameter size. bits/w: stored bits per Linear/Conv2d weight, "
                 "scales and low-rank branch included.")
    return "\n".join(lines + adherence_lines(results) + evaluation_lines(results))


def evaluation_lines(results) -> list[str]:
    """CLIP score and FID per image set (with n), the metrics not computed and why, images/s per process."""
    ev = results.evaluation
    if ev is None:
        return []
    lines = [""]
    sets = [("baseline", results.baseline_scores, None)] + [(n, r.scores, r.quality) for n, r in results.recipes.items()]
    for name, scores, quality in sets:
        found = []
        if scores and scores.clip_score is not None:
            found.append(f"CLIP score {scores.clip_score:.2f}")
        if quality and quality.fid is not None:
            found.append(f"FID vs baseline {quality.fid:.3f}")
        if scores and scores.fid_real is not None:
            found.append(f"FID vs real {scores.fid_real:.3f} (n={scores.n_real})")
        if found:
            lines.append(f"{name} (n={ev.n}): " + ", ".join(found))
    if ev.fid_features and any(r.quality.fid is not None for r in results.recipes.values()):
        lines.append(f"FID features: {ev.fid_features}")
    lines += list(ev.missing)
    rates = {}
    for t in ev.throughput:
        if t.generated:
            rates.setdefault(t.process, []).append((t.generated, t.seconds))
    lines += [f"process {p}: {sum(g for g, _ in v)} images in {sum(s for _, s in v):.1f} s "
              f"({sum(g for g, _ in v) / max(sum(s for _, s in v), 1e-9):.2f} images/s)" for p, v in sorted(rates.items())]
    return lines


def adherence_lines(results) -> list[str]:
    """ShapeEval per attribute, as plain-text lines (none when the prompts are not shapes captions)."""
    from diffquant.report.html import adherence_table

    table = adherence_table(results)
    if table is None:
        return []
    headers, rows = table
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    fmt = lambda cells: "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return ["", "Prompt adherence (ShapeEval):", fmt(headers), *map(fmt, rows)]


def _cmd_generate(args) -> int:
    from diffquant.core.artifacts import output_folder
    from diffquant.core.config import check_settings

    if args.quantized and args.model:
        raise DiffquantError("pass --model or --quantized, not both: a quantized folder names its own model")
    check_settings(args.steps, args.guidance, args.num_images)
    if args.prompts is not None and not all(p.strip() for p in args.prompts):
        raise DiffquantError("empty --prompt: pass a non-empty text, or no --prompt for the model's defaults")
    with output_folder(args.out) as out:
        return _generate(args, out)


def _generate(args, out: Path) -> int:
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
    images = generate(pipe, prompts, seed=args.seed, steps=steps, guidance=guidance,
                      on_image=lambda k, image: save_image(image, out / "images" / f"{k:03d}.png"))
    print(f"wrote {len(images)} images to {out / 'images'}")
    return 0


def _load_generated(folder: str):
    from PIL import UnidentifiedImageError

    from diffquant.evaluate.scoring import read_images

    meta_file = Path(folder) / "prompts.json"
    if not meta_file.is_file():
        raise DiffquantError(f"{folder} has no prompts.json: pass a folder written by `diffquant generate`")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as error:
        raise DiffquantError(f"{meta_file} is not valid JSON ({error}): generate the folder again") from None
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


def _cmd_compare(args) -> int:
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


def _compare(args, out: Path, base_images, loaded: dict) -> None:
    from diffquant.core.artifacts import save_image, write_json
    from diffquant.models.generation import image_grid
    from diffquant.evaluate.metrics import compare

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


def _cmd_quantize(args) -> int:
    from diffquant.core.artifacts import output_folder
    from diffquant.models.generation import default_settings
    from diffquant.models.pipeline import load_pipeline
    from diffquant.quantization.api import layer_report, quantize, save_quantized
    from diffquant.core.recipes import get_recipe
    from diffquant.core.config import RunConfig
    from diffquant.quantization.calibration import calibrate_for_run

    recipe = get_recipe(args.recipe)
    config = RunConfig(model=args.model, **_calibration_options(args))
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


def _cmd_export(args) -> int:
    from diffquant.core.artifacts import output_folder
    from diffquant.export.onnx import export_onnx
    from diffquant.quantization.api import load_quantized

    with output_folder(args.out) as out:
        quantized = load_quantized(args.quantized, args.device, "auto")
        if args.pipeline:
            from diffquant.export.optimum import export_pipeline

            exported = export_pipeline(quantized, out, int4_compute=args.int4_compute)
            print(f"wrote {exported.path} ({exported.size_bytes / 1e6:.1f} MB); run it without diffquant: "
                  f"optimum.onnxruntime.ORTDiffusionPipeline.from_pretrained({str(exported.path)!r})")
            return 0
        result = export_onnx(quantized, out, int4_compute=args.int4_compute)
    print(f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB); ONNX Runtime vs torch: "
          f"max-abs {result.max_abs_error:.2e}, relative {result.relative_error:.2e}")
    return 0


def _cmd_view(args) -> int:
    from diffquant.export.viewer import view, wait

    url = view(args.onnx, args.port, browse=not args.no_browser)
    # Ctrl-C is how the server stops: a process started with SIGINT ignored (a background job, or a parent
    # that ignores it, as one of the test suite's libraries does) would otherwise never stop.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:  # a Ctrl-C right after the message (before wait() listens for it) also stops cleanly
        print(f"Netron serving {args.onnx} at {url} (Ctrl-C to stop)", flush=True)
        wait()
    except KeyboardInterrupt:
        import netron

        netron.stop()
    return 0


def _cmd_bench(args) -> int:
    from diffquant.core.artifacts import output_folder

    with output_folder(args.out) as out:
        return _bench(args, out)


def _bench(args, out: Path) -> int:
    from diffquant.bench.runner import benchmark

    result = benchmark(model=args.model, arch=args.arch, recipe=args.recipe, iterations=args.iterations,
                       warmup=args.warmup, batch=args.batch, images=args.images, out=out,
                       fake_quant_compiled=not args.no_compile, runtimes=args.runtime,
                       int4_compute=args.int4_compute)
    print(result.table())
    from diffquant.report.html import write_table_report

    write_table_report(out, f"diffquant bench: {result.model} on {result.cpu}, {result.threads_note()}",
                       ["configuration", "ran", "kernels", "call ms median", "p90", "x fp32 speed", "s/image", "peak MB",
                        "MB", "x size"],
                       [[r.name + (" (simulated)" if r.simulated else ""), f"{r.runtime} {r.runtime_precision}",
                         r.kernels, r.call_ms_median, r.call_ms_p90, r.speedup, r.image_s, r.peak_rss_mb, r.artifact_mb,
                         r.size_ratio] for r in result.rows],
                       "bench.png", result.profile_lines() + result.notes)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.png'} and {out / 'report.html'}")
    return 0


def _cmd_peers(args) -> int:
    from diffquant.peers.eight import run_from_args

    run_from_args(args)
    return 0


def _cmd_bench_table(args) -> int:
    from diffquant.bench.runner import BenchResult

    for name in args.bench_json:
        path = Path(name)
        if not path.is_file():
            raise DiffquantError(f"no bench.json at {path}: pass the file `diffquant bench --out DIR` wrote")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DiffquantError(f"{path} is not a bench.json ({error}): pass the file `diffquant bench` wrote") from None
        print(BenchResult.from_dict(data).markdown() + "\n")
    return 0


def _cmd_env(args) -> int:
    from importlib import metadata

    for name in ("diffquant", "torch", "diffusers", "transformers", "amd-quark", "onnx", "onnxruntime",
                 "openvino", "torchmetrics", "netron"):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{name:<14} {version}")
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    backend = "ROCm " + torch.version.hip if getattr(torch.version, "hip", None) else \
        ("CUDA " + torch.version.cuda if torch.version.cuda else "CPU build")
    print(f"{'torch build':<14} {backend}; GPU: {gpu}; CPU threads: {torch.get_num_threads()} "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")
    compile_setting = os.environ.get("QUARK_DISABLE_COMPILE")
    print(f"{'quark compile':<14} QUARK_DISABLE_COMPILE={compile_setting or 'unset'} "
          f"(diffquant sets 1 on CPU unless you set it)")
    from diffquant.models.pipeline import shapes_sd_path

    print(f"{'shapes-sd':<14} {shapes_sd_path()}")
    from diffquant.core.cpu import OVERRIDES, decisions

    decided = decisions()
    print(f"{'CPU':<14} {decided.cpu.describe()}")
    print("decided from the CPU (override with the variable named):")
    for name, decision in decided.items():
        print(f"  {name:<19} {decision.value:<6} {OVERRIDES[name][0]:<29} {decision.reason}")
    return 0


COMMANDS = {"run": _cmd_run, "sensitivity": _cmd_sensitivity, "generate": _cmd_generate, "quantize": _cmd_quantize, "compare": _cmd_compare,
            "export": _cmd_export, "view": _cmd_view, "env": _cmd_env, "bench": _cmd_bench,
            "bench-table": _cmd_bench_table, "peers": _cmd_peers}


# Commands that compute (torch or ONNX Runtime threads matter); `view` only serves a file.
_COMPUTE = {"run", "sensitivity", "generate", "quantize", "compare", "export", "bench", "env", "peers"}


def configure_threads(requested: int | None = None) -> int | None:
    """Set torch's CPU threads (ONNX Runtime sessions of a run take the same count); returns the count
    set, or None when the user's OMP_NUM_THREADS decides.

    Order: `requested` (--threads), $DIFFQUANT_THREADS, a user-set $OMP_NUM_THREADS (left to torch),
    else the CPUs this process may run on (its affinity mask, which torch's default ignores).
    """
    # Idle OpenMP workers sleep instead of spinning (read when torch first loads). Measured on 2 cores
    # with a 2-thread training beside it: `generate` of 4 shapes-sd images took 274 s with spinning
    # workers, 11.9 s with passive ones, 10.7 s with one thread.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    source = "--threads"
    if requested is None and os.environ.get("DIFFQUANT_THREADS"):
        source, requested = "DIFFQUANT_THREADS", os.environ["DIFFQUANT_THREADS"]
    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        return None
    if requested is None:
        requested = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        threads = int(requested)
    except ValueError:
        threads = 0
    if threads < 1:
        raise DiffquantError(f"{source} must be a whole number of at least 1, got {requested!r}")
    import torch

    torch.set_num_threads(threads)
    return threads


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `diffquant` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s")
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # Quark's own bars too
        from diffquant.core.progress import set_quiet

        set_quiet(True)
    if not args.verbose:
        import warnings

        warnings.filterwarnings("ignore")  # torch tracer / diffusers deprecation chatter; --verbose shows it
        # diffusers sets its own log level when first imported, so only this reaches its import-time warnings
        # (with optimum-onnx installed: "Multiple distributions found for package optimum").
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        for noisy in ("diffusers", "transformers", "torch.onnx"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    # SIGTERM (kill, a scheduler's timeout) unwinds like Ctrl-C: temporary files are removed.
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        if args.command in _COMPUTE:
            configure_threads(args.threads)
        return COMMANDS[args.command](args)
    except DiffquantError as error:
        print(f"diffquant: error: {error}", file=sys.stderr)
        return 2
    except Terminated:
        print("diffquant: terminated; finished artifacts are complete, nothing half-written was kept", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("diffquant: interrupted; finished artifacts are complete, nothing half-written was kept", file=sys.stderr)
        return 130
    except Exception as error:
        line = describe_write_error(error, getattr(args, "out", None))
        if line is None:
            raise
        print(f"diffquant: error: {line}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
