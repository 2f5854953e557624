"""The whole tutorial as one call: baseline images, each recipe quantized, compared and exported,
then results.json and report.html. `diffquant run` is a thin shell over `run`."""

from __future__ import annotations

import gc
import logging
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from .artifacts import output_folder, save_image, write_json
from .calibration import calibrate_for_run, recording_denoiser_inputs
from .config import RunConfig
from .denoisers import denoiser_of
from .export import export_onnx
from .generation import default_prompts, default_settings, generate, image_grid
from .metrics import compare, prompt_adherence, sqnr_db
from .pipeline import load_pipeline
from .quantization import layer_report, quantize
from .recipes import parse_recipes
from .report import versions, write_report, write_results
from .results import OrtImages, Quality, RecipeResult, RunResult
from .runtimes import get_runtime

logger = logging.getLogger(__name__)
GRID_COLUMNS = 8  # the grid shows the first images; every image is saved and measured
SQNR_RECORDS = 16  # recorded denoiser calls of the evaluation trajectories that the output SQNR averages


def _prompts(pipe, config: RunConfig) -> list[str]:
    if config.prompts:
        n = config.num_images or len(config.prompts)
        return [config.prompts[k % len(config.prompts)] for k in range(n)]
    from .profiles import profile_of

    return default_prompts(pipe, config.num_images or profile_of(pipe).num_images)


# Image folder tag, grid row label and timing label of the runtime that runs the exported denoiser.
_RUNTIME_LABELS = {"onnxruntime": ("ort", "ORT", "ONNX Runtime"), "openvino": ("openvino", "OpenVINO", "OpenVINO")}


def _image_path(label: str, k: int) -> Path:
    return Path("images") / label / f"{k:03d}.png"


def _generate_saved(pipe, prompts: list[str], out_dir: Path, label: str, desc: str, gen: dict):
    """Generate and save each image as soon as its batch is made (Ctrl-C keeps what was generated).

    Returns (images, their paths relative to `out_dir`)."""
    images = generate(pipe, prompts, desc=desc, on_image=lambda k, image: save_image(image, out_dir / _image_path(label, k)),
                      **gen)
    return images, [str(_image_path(label, k)) for k in range(len(images))]


@contextmanager
def _timed(timings: dict, step: str):
    started = time.perf_counter()
    yield
    timings[step] = round(time.perf_counter() - started, 3)


def denoiser_output_sqnr(baseline, quantized, records) -> float:
    """SQNR (dB) of the quantized denoiser's output vs the baseline's over the same recorded calls."""
    with torch.no_grad():
        reference = torch.cat([baseline(**item, return_dict=False)[0].flatten() for item in records])
        test = torch.cat([quantized(**item, return_dict=False)[0].flatten() for item in records])
    return sqnr_db(reference, test)


def run(config: RunConfig | None = None, **overrides) -> RunResult:
    """Run the tutorial end to end; also written to results.json and report.html.

    Args:
        config: a RunConfig (frozen; replay one with `RunConfig.load("out/config.json")`); keyword
            overrides make a changed copy (e.g. `run(recipes=("int8-w",))`).

    Returns:
        The `RunResult`: settings, prompts, per-recipe quality, exports, timings, layer reports and the
        output folder.
    """
    started = time.perf_counter()
    config = (config or RunConfig()).replace(**overrides)
    recipes = parse_recipes(list(config.recipes))  # fail on a bad name before any slow work
    if config.runtime == "openvino" and config.export:
        from .runtimes.openvino.runtime import import_openvino

        import_openvino()  # not installed: say so before any slow work
    if config.export_pipeline:
        from .onnx_pipeline import require_exporter

        require_exporter()  # Optimum missing: say so before any slow work
    with output_folder(config.out) as out_dir:
        return _run(config, recipes, out_dir, started)


def _run(config: RunConfig, recipes, out_dir: Path, started: float) -> RunResult:
    timings: dict[str, float] = {}
    with _timed(timings, "load pipeline"):
        pipe = load_pipeline(config.model, config.device, config.dtype, no_t5=config.no_t5)
    # Written only once the model loaded: a run that fails to start leaves no folder to step around.
    write_json(out_dir / "config.json", config.to_dict())
    family = denoiser_of(pipe)
    settings = default_settings(pipe, config.seed)
    steps = settings.steps if config.steps is None else config.steps
    guidance = settings.guidance if config.guidance is None else config.guidance
    prompts = _prompts(pipe, config)
    results = RunResult(
        out_dir=str(out_dir), status="running", model=config.model or "shapes-sd (embedded)",
        denoiser=type(family.module).__name__, prompts=tuple(prompts),
        settings={"seed": config.seed, "steps": steps, "guidance": guidance}, config=config.to_dict(),
        versions=versions(), timings=timings,
        denoiser_fp32_bytes=sum(p.numel() * 4 for p in family.module.parameters()),
    )
    saved = _SavedResults(out_dir, results)
    try:
        _stages(pipe, config, recipes, out_dir, prompts, steps, guidance, saved)
    except BaseException as error:
        if any(p.name != "config.json" for p in out_dir.iterdir()):  # else the folder is removed
            interrupted = isinstance(error, KeyboardInterrupt)
            saved.update(status="interrupted" if interrupted else "failed",
                         error=None if interrupted else f"{type(error).__name__}: {error}")
        raise
    results = saved.results
    timings["total"] = round(time.perf_counter() - started, 3)
    results = replace(results, status="complete")
    write_results(out_dir, results)
    write_report(out_dir, results)
    logger.info("wrote %s", out_dir / "report.html")
    return results


def _trace_inputs(family, records: list[dict]) -> dict | None:
    """Example inputs for the export of a family whose graph keeps its traced shapes (Flux): one sample
    of a recorded call, so the graph fits the generation's image and text sizes. None: the family's own."""
    if family.dynamic_batch or not records:
        return None
    flat = family.flat_inputs(records[0])
    unbatched = set(family.unbatched_inputs)
    return {k: v if k in unbatched else v[:1] for k, v in flat.items()}


class _SavedResults:
    """The results of a run in progress, rewritten to results.json each time a stage finishes, so an
    interrupted run keeps what it finished."""

    def __init__(self, out_dir: Path, results: RunResult):
        self.out_dir, self.results = out_dir, results

    def update(self, **changes) -> None:
        self.set(replace(self.results, **changes))

    def set(self, results: RunResult) -> None:
        self.results = results
        write_results(self.out_dir, results)


def _stages(pipe, config: RunConfig, recipes, out_dir: Path, prompts: list[str], steps: int, guidance: float,
            saved: _SavedResults) -> None:
    """Baseline, then each recipe quantized, measured and exported."""
    timings = saved.results.timings
    gen = dict(seed=config.seed, steps=steps, guidance=guidance)
    calibration = None
    if any(r.needs_calibration for r in recipes):
        with _timed(timings, "calibrate"):
            calibration, described = calibrate_for_run(pipe, config, steps=steps, guidance=guidance)
        saved.update(calibration=described)

    # The denoiser's inputs on the evaluation trajectories, for each recipe's output SQNR.
    with _timed(timings, "generate baseline"), recording_denoiser_inputs(pipe, steps, timesteps=4) as eval_inputs:
        baseline, paths = _generate_saved(pipe, prompts, out_dir, "baseline", "baseline", gen)
    saved.update(baseline_images=tuple(paths), baseline_shapeeval=prompt_adherence(baseline, prompts))
    rows = {"baseline": baseline}
    family = denoiser_of(pipe)
    records = [eval_inputs[i] for i in range(min(len(eval_inputs), SQNR_RECORDS))]

    for recipe in recipes:
        with _timed(timings, f"quantize {recipe.name}"):
            quantized = quantize(pipe, recipe, calibration=calibration if recipe.needs_calibration else None,
                                 exclude=config.exclude)
        q_module = denoiser_of(quantized).module
        with _timed(timings, f"generate {recipe.name} (simulated fake-quant)"):
            images, image_paths = _generate_saved(quantized, prompts, out_dir, recipe.name, recipe.name, gen)
        rows[recipe.name] = images
        comparison = compare(baseline, images, prompts).to_dict()
        entry = RecipeResult(recipe=recipe.to_dict(), images=tuple(image_paths),
                             quality=Quality.from_comparison(comparison), notes=tuple(comparison["notes"]),
                             sqnr_db=denoiser_output_sqnr(family.module, q_module, records),
                             layers=layer_report(q_module).to_dict())
        if config.export:
            with _timed(timings, f"export {recipe.name}"):
                exported = export_onnx(quantized, out_dir / "onnx" / recipe.name, inputs=_trace_inputs(family, records))
            entry = replace(entry, onnx=exported.to_dict() | {"path": str(exported.path.relative_to(out_dir))})
            runtime_tag, runtime_row, runtime_label = _RUNTIME_LABELS[config.runtime]
            with _timed(timings, f"generate {recipe.name} ({runtime_label})"):
                # The runtime gets the thread count torch was given (the CLI's --threads), not all cores.
                ort = get_runtime(config.runtime).pipeline(pipe, exported.path, threads=torch.get_num_threads())
                ort_images, ort_paths = _generate_saved(ort, prompts, out_dir, f"{recipe.name}-{runtime_tag}",
                                                        f"{recipe.name} {runtime_row}", gen)
            entry = replace(entry, ort=OrtImages(
                tuple(ort_paths), vs_torch=Quality.from_comparison(compare(images, ort_images, prompts).to_dict()),
                vs_baseline=Quality.from_comparison(compare(baseline, ort_images, prompts).to_dict())))
            rows[f"{recipe.name} {runtime_row}"] = ort_images
            if config.export_pipeline:
                from .onnx_pipeline import export_pipeline

                with _timed(timings, f"export pipeline {recipe.name}"):
                    deployed = export_pipeline(quantized, out_dir / "pipeline" / recipe.name, unet_onnx=exported.path)
                entry = replace(entry, pipeline=deployed.to_dict() | {"path": str(deployed.path.relative_to(out_dir))})
        saved.set(saved.results.with_recipe(recipe.name, entry))
        del quantized, q_module
        gc.collect()

    columns = min(len(prompts), GRID_COLUMNS)
    grid = image_grid({label: images[:columns] for label, images in rows.items()},
                      column_labels=[f"#{k} seed {config.seed + k}" for k in range(columns)])
    save_image(grid, out_dir / "grid.png")
    saved.update(grid="grid.png")
