"""`diffquant run`: the whole tutorial (baseline, quantize, compare, export, report), and the plain-text
tables that print its results."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffquant.cli.base import Command
from diffquant.cli.options import add_calibration, add_evaluation, add_generation, add_model, calibration_options
from diffquant.core.config import RunConfig
from diffquant.core.recipes import DEFAULT_RECIPES, RECIPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    recipe_help = "; ".join(f"{n}: {r.description}" for n, r in RECIPES.items())
    add_model(p)
    add_generation(p)
    p.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help=f"comma-separated ({recipe_help})")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="fnmatch pattern of module names kept in float, for every recipe (repeatable)")
    p.add_argument("--quantize-all", action="store_true",
                   help="ignore the model profile's measured float layers (e.g. shapes-sd's for the W8A8 int8 "
                        "recipes): quantize every layer the recipe and --exclude allow")
    add_calibration(p)
    add_evaluation(p)
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export and its ONNX Runtime check")
    p.add_argument("--export-pipeline", action="store_true",
                   help="also write each recipe's whole pipeline as ONNX in Optimum's layout (pipeline/<recipe>/)")
    p.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "openvino"),
                   help="runtime that generates with each exported denoiser (default onnxruntime)")
    p.add_argument("--out", help="output folder (default ./diffquant-out/<timestamp>/; never overwritten)")
    p.add_argument("--config", metavar="CONFIG_JSON",
                   help="replay the config.json of an earlier run (every other option but --out is ignored)")


def main(args: argparse.Namespace) -> int:
    from diffquant.workflow import run

    if args.config:  # replay: the saved config, with only --out changed (a run never overwrites a folder)
        config = RunConfig.load(args.config).replace(out=args.out, resume=args.resume)
    else:
        config = RunConfig(model=args.model, prompts=args.prompts, num_images=args.num_images, seed=args.seed,
                           steps=args.steps, guidance=args.guidance, height=args.height, width=args.width, frames=args.frames,
                           recipes=[n.strip() for n in args.recipes.split(",")],
                           device=args.device, dtype=args.dtype, no_t5=args.no_t5, export=not args.no_export,
                           export_pipeline=args.export_pipeline, runtime=args.runtime, out=args.out,
                           exclude=args.exclude, quantize_all=args.quantize_all, prompt_source=args.prompt_source,
                           prompt_column=args.prompts_column, prompt_split=args.prompts_split,
                           batch_size=args.batch_size, clip_model=args.clip_model,
                           reference_images=args.reference_images, resume=args.resume,
                           **calibration_options(args))
    results = run(config)
    from diffquant.evaluate.sharding import processes

    if processes(config.device).is_main_process:  # under `accelerate launch`, the main process reports
        print(summary_table(results))
        print(f"report: {Path(results.out_dir) / 'report.html'}")
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
        if r.gguf:
            g = r.gguf
            vs_torch = r.gguf_images.vs_torch.psnr_db if r.gguf_images else None
            drawn = "-" if vs_torch is None else ("identical" if vs_torch >= 100 else f"{vs_torch:.2f} dB")
            lines.append(f"  {name} GGUF {g['gguf_type']}: {g['path']} {g['size_bytes'] / 1e6:.1f} MB; diffusers' loader "
                         f"read {g['loaded_layers']} block Linears ({g['exact_layers']} bit-exact); its images vs "
                         f"torch: {drawn}")
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


COMMAND = Command("run", "the whole tutorial: baseline, quantize, compare, export, report", add_arguments, main)
