"""Stage 7, report: results.json (machine-readable, with a schema version) and a self-contained
report.html (images inlined, user text escaped)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from diffquant.core.artifacts import write_json, write_text
from diffquant.core.results import Quality, RunResult
from diffquant.core.cpu import decisions
from diffquant.core.provenance import measured
from diffquant.runtimes import get_runtime

_PACKAGES = ("diffquant", "torch", "diffusers", "transformers", "amd-quark", "onnx", "onnxruntime", "torchmetrics")


def versions() -> dict[str, str]:
    """The date, versions of Python and the packages a result depends on, the CPU its times were measured on,
    and whether ONNX Runtime computed int8 products exactly there (`diffquant.core.cpu`)."""

    decided = decisions()
    now = measured(_PACKAGES)
    found = {"date": now["date"], "python": now["versions"].pop("python"), "cpu": now["cpu"],
             "ort exact int8": f"{decided.ort_exact_int8.value} ({decided.ort_exact_int8.reason})"}
    return found | {name: now["versions"].get(name, "not installed") for name in _PACKAGES}


def write_results(out_dir: Path, results: RunResult) -> Path:
    """Write results.json atomically (a versioned `RunResult`)."""
    return write_json(Path(out_dir) / "results.json", results.to_dict())


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_ADHERENCE_LABELS = {"background": "background", "color": "colour", "shape": "shape", "size": "size",
                     "position": "position"}


def runtime_name(results: RunResult) -> str:
    """Short name of the runtime that ran the exported denoiser ("ORT" or "OpenVINO")."""

    return get_runtime(results.config.get("runtime", "onnxruntime")).short_name


def adherence_table(results: RunResult) -> tuple[list[str], list[list[str]]] | None:
    """ShapeEval per attribute (with n) for the baseline, each recipe and its ONNX Runtime images, and
    the share of images whose detections agree with the baseline's; None when prompts are not shapes captions.

    Returns (headers, rows) of plain strings, shared by report.html and the terminal table."""
    baseline = results.baseline_shapeeval
    if not baseline:
        return None
    names = [a for a in _ADHERENCE_LABELS if a in baseline]
    headers = (["images"] + [f"{_ADHERENCE_LABELS[a]} (n={int(baseline[f'n_{a}'])})" for a in names]
               + [f"all named (n={len(results.prompts)})", "agree with fp32"])

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    def row(label: str, shapeeval: dict, agreement: dict | None) -> list[str]:
        return ([label] + [pct(shapeeval.get(a)) for a in names]
                + [pct(shapeeval.get("overall")), pct((agreement or {}).get("all"))])

    rows = [row("baseline (fp32)", baseline, None)]
    for name, r in results.recipes.items():
        rows.append(row(name, r.quality.shapeeval or {}, r.quality.shapeeval_agreement))
        if r.ort is not None:
            rows.append(row(f"{name} {runtime_name(results)}", r.ort.vs_baseline.shapeeval or {}, r.ort.vs_baseline.shapeeval_agreement))
    return headers, rows


def render_html(out_dir: Path, results: RunResult) -> str:
    """The report page for a run folder: every figure inlined, so the file stands alone."""
    out_dir = Path(out_dir)
    e = html.escape
    denoiser = results.denoiser
    parts = [f"<h1>diffquant report: {e(results.model)}</h1><p>denoiser: {e(denoiser)}</p>"]
    parts.append("<h2>Prompts</h2><ol>" + "".join(f"<li>{e(p)}</li>" for p in results.prompts) + "</ol>")
    settings = results.settings
    parts.append(f"<p>seed {e(str(settings['seed']))} (image k uses seed + k), "
                 f"{e(str(settings['steps']))} steps, guidance {e(str(settings['guidance']))}</p>")
    if results.grid:
        clips = (f" Each cell is a clip of {e(str(settings['frames']))} frames, left to right."
                 if settings.get("frames") else "")
        parts.append(f"<h2>Images</h2><p>Rows: baseline, then each recipe; columns: prompts.{clips}</p>"
                     + _img(out_dir / results.grid, "comparison grid"))

    calibration = results.calibration
    if calibration:
        timesteps = calibration["timesteps"]
        shown = ", ".join(map(str, timesteps[:12])) + (f" ... ({len(timesteps)} in all)" if len(timesteps) > 12 else "")
        trajectory = f" of a {calibration['steps']}-step trajectory" if calibration.get("steps") else ""
        parts.append(f"<h2>Calibration</h2><p>{e(str(calibration['denoiser_calls']))} {e(denoiser)} calls from "
                     f"{e(str(calibration['prompts']))} prompts of {e(str(calibration['source']))} "
                     f"(both guidance halves where the pipeline uses them), at timesteps {e(shown)}"
                     f"{e(trajectory)}.</p>")
    baseline_se = results.baseline_shapeeval
    rows = []
    if baseline_se:
        rows.append(["baseline", "-", "-", "-", _fmt(baseline_se.get("overall"), 3), "-", "32"])
    for name, r in results.recipes.items():
        q: Quality = r.quality
        rows.append([e(name), _fmt(q.psnr_db), _fmt(q.psnr_p10_db), _fmt(q.psnr_worst_db), _fmt(q.ssim, 4),
                     _fmt(q.lpips, 4), _fmt(q.shapeeval.get("overall"), 3) if q.shapeeval else "n/a", _fmt(r.sqnr_db),
                     _fmt(r.layers.get("bits_per_weight"))])
    parts.append("<h2>Quality vs baseline</h2>" + _table(
        ["recipe", "PSNR mean (dB)", "PSNR p10", "PSNR worst", "SSIM", "LPIPS", "ShapeEval overall",
         "denoiser output SQNR (dB)", "bits per weight (Linear/Conv2d; scales and low-rank branch included)"], rows))
    parts.extend(_frame_parts(results))
    parts.extend(_worst_images(out_dir, results))
    adherence = adherence_table(results)
    if adherence:
        headers, adherence_rows = adherence
        parts.append("<h2>Prompt adherence (ShapeEval)</h2><p>Share of images whose detected attribute matches "
                     "the caption, over the captions that name it; <i>agree with fp32</i>: share of images "
                     "whose five detected attributes equal those of the baseline image of the same seed.</p>"
                     + _table(headers, [[e(c) for c in r] for r in adherence_rows]))
    parts.extend(_evaluation_parts(results))
    notes = sorted({n for r in results.recipes.values() for n in r.notes})
    parts.extend(f"<p class=note>{e(n)}</p>" for n in notes)

    size_rows = []
    fp32_bytes = results.denoiser_fp32_bytes or 1
    for name, r in results.recipes.items():
        onnx = r.onnx
        if onnx:
            size_rows.append([e(name), _fmt(onnx["size_bytes"] / 1e6), _fmt(onnx["size_bytes"] / fp32_bytes),
                              _fmt(onnx["max_abs_error"], 5), _fmt(onnx["relative_error"], 5),
                              _fmt(r.ort.vs_torch.psnr_db if r.ort else None),
                              e(json.dumps(onnx.get("weight_dtypes", {})))])
    if size_rows:
        runtime = runtime_name(results)
        parts.append("<h2>ONNX exports (checked in ONNX Runtime)</h2>" + _table(
            ["recipe", "size (MB)", "x fp32 params", "ORT vs torch max-abs", "ORT vs torch relative L2",
             f"{runtime} images vs torch fake-quant PSNR (dB)", "initializer dtypes"], size_rows))
        parts.append(f"<p>fp32 {e(denoiser)} parameters: {_fmt(results.denoiser_fp32_bytes / 1e6)} MB</p>")

    timing_rows = [[e(step), _fmt(seconds)] for step, seconds in results.timings.items()]
    parts.append("<h2>Timings (s)</h2>" + _table(["step", "seconds"], timing_rows))
    parts.append("<p class=note>Quantized generation runs Quark's fake quantization (quantize then dequantize "
                 "in float): its times are <b>simulated</b> and show no speedup; real low-precision speed "
                 "needs an int8/fp8 runtime path.</p>")
    parts.append("<h2>Layers</h2>")
    for name, r in results.recipes.items():
        layers = r.layers
        parts.append(f"<details><summary>{e(name)}: {layers['n_quantized']} quantized, "
                     f"{layers['n_float']} float</summary><p>float: {e(', '.join(layers['float']) or 'none')}"
                     f"</p>{_float_reason(layers)}</details>")
    parts.append("<h2>Versions</h2>" + _table(["package", "version"],
                                                [[e(k), e(v)] for k, v in results.versions.items()]))
    parts.append("<h2>Configuration</h2><pre>" + e(json.dumps(results.config, indent=2)) + "</pre>")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>diffquant report</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")


def _frame_parts(results: RunResult) -> list[str]:
    """Clips: each recipe's fidelity frame by frame (the table above measures each clip whole)."""
    rows = [[html.escape(name), str(f.n_frames), _fmt(f.psnr_db), _fmt(f.psnr_worst_db), _fmt(f.ssim, 4),
             _fmt(f.ssim_worst, 4), ", ".join(f"{v:.1f}" for v in f.psnr_db_by_frame)]
            for name, r in results.recipes.items() if (f := r.quality.frames) is not None]
    if not rows:
        return []
    return ["<h2>Frame by frame</h2><p>Every frame of every clip against the baseline's frame of the same seed: "
            "mean and worst over all frames, and the mean PSNR of each frame index.</p>"
            + _table(["recipe", "frames per clip", "frame PSNR mean (dB)", "worst frame PSNR", "frame SSIM mean",
                      "worst frame SSIM", "PSNR by frame index (dB)"], rows)]


def _worst_images(out_dir: Path, results: RunResult) -> list[str]:
    """Each recipe's images of lowest PSNR (`WORST_SHOWN`), each beside the baseline image of its seed."""
    e = html.escape
    parts = []
    for name, r in results.recipes.items():
        per_image = r.quality.per_image
        if per_image is None or not results.baseline_images:
            continue
        cells = []
        for k in per_image.worst():
            if k >= len(r.images) or k >= len(results.baseline_images):
                continue
            caption = (f"image {k} ({e(results.prompts[k % len(results.prompts)])}): "
                       f"{per_image.psnr_db[k]:.2f} dB, SSIM {per_image.ssim[k]:.4f}")
            cells.append(f"<figure class=worst>{_img(out_dir / results.baseline_images[k], f'fp32 image {k}')}"
                         f"{_img(out_dir / r.images[k], f'{name} image {k}')}<figcaption>{caption}</figcaption></figure>")
        if cells:
            parts.append(f"<h3>{e(name)}: its worst images (fp32 left)</h3>" + "".join(cells))
    if parts:
        parts.insert(0, "<h2>Worst images</h2><p>The images of each recipe furthest from the baseline (lowest "
                        "PSNR), each beside the baseline image of the same prompt and seed.</p>")
    return parts


def _float_reason(layers: dict) -> str:
    """Why layers stayed float (or took the recipe's fallback) for this recipe: each reason of its layer plan
    with how many layers it covers; older results hold the profile's reason alone, or nothing."""
    e = html.escape
    items = [f"<li>float, {e(reason)}: {len(names)}</li>" for reason, names in layers.get("float_reasons", {}).items()]
    items += [f"<li>fallback, {e(reason)}: {len(names)}</li>"
              for reason, names in layers.get("fallback_reasons", {}).items()]
    if items:
        return "<p>why:</p><ul>" + "".join(items) + "</ul>"
    reason = layers.get("float_reason")
    return f"<p>why: {e(reason)}</p>" if reason else ""


def _evaluation_parts(results: RunResult) -> list[str]:
    """The evaluation: prompt source and n, CLIP score and FID (with the features used) per image set, the
    metrics not computed and why, and each process's throughput."""
    ev = results.evaluation
    if ev is None:
        return []
    e = html.escape
    parts = [f"<h2>Evaluation</h2><p>{ev.n} prompts from {e(ev.prompt_source)}, {ev.processes} process(es), "
             f"batches of {ev.batch_size}; FID features: {e(ev.fid_features or 'none')}"
             + (f"; CLIP model {e(ev.clip_model)}" if ev.clip_model else "") + "</p>"]
    rows = []
    sets = [("baseline", results.baseline_scores, None)] + [(n, r.scores, r.quality) for n, r in results.recipes.items()]
    for name, scores, quality in sets:
        rows.append([e(name), _fmt(scores.n if scores else None), _fmt(scores.clip_score if scores else None),
                     _fmt(quality.fid, 3) if quality else "-",
                     _fmt(scores.fid_real if scores else None, 3) + (f" (n={scores.n_real})" if scores and
                                                                     scores.n_real else "")])
    parts.append(_table(["images", "n", "CLIP score", "FID vs baseline", "FID vs real images"], rows))
    parts.extend(f"<p class=note>{e(line)}</p>" for line in ev.missing)
    if ev.calibration_overlap:
        parts.append(f"<p class=note>{len(ev.calibration_overlap)} evaluation prompts are also calibration prompts "
                     f"(first: {e(ev.calibration_overlap[0])})</p>")
    throughput = [[t.process, e(t.images), t.generated, t.skipped, _fmt(t.seconds), _fmt(t.images_per_s, 3)]
                  for t in ev.throughput]
    if throughput:
        parts.append("<h3>Throughput per process</h3>" + _table(
            ["process", "images", "generated", "already on disk", "seconds", "images/s"], throughput))
    return parts


_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
          "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
          "img{max-width:100%;image-rendering:pixelated}.note{color:#555}pre{background:#f6f6f6;padding:1em}"
          "figure.worst{display:inline-block;margin:0 1em 1em 0}figure.worst img{width:128px;margin-right:2px}"
          "figcaption{font-size:small;max-width:260px}")


def write_table_report(out_dir: Path, title: str, headers: list[str], rows: list[list], chart: str | None,
                       notes: list[str] = ()) -> Path:
    """A self-contained report.html of one table and one chart (sensitivity, bench)."""
    e = html.escape
    body = [f"<h1>{e(title)}</h1>", _table(headers, [[_fmt(c) for c in row] for row in rows])]
    if chart:
        body.append(_img(Path(out_dir) / chart, title))
    body.extend(f"<p class=note>{e(n)}</p>" for n in notes)
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{e(title)}</title><style>{_STYLE}</style>"
            f"</head><body>{''.join(body)}</body></html>")
    return write_text(Path(out_dir) / "report.html", page)


def write_report(out_dir: Path, results: RunResult) -> Path:
    """Write report.html atomically into `out_dir`."""
    return write_text(Path(out_dir) / "report.html", render_html(out_dir, results))
