"""The whole tutorial as one call: baseline images, each recipe quantized, compared and exported,
then results.json and report.html. `diffquant run` is a thin shell over `run`."""

from __future__ import annotations

import gc
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .artifacts import new_run_dir, save_image, write_json
from .errors import DiffquantError
from .calibration import recording_unet_inputs
from .export import export_onnx
from .generation import default_prompts, default_settings, generate, image_grid
from .metrics import compare, prompt_adherence, sqnr_db
from .pipeline import load_pipeline
from .quantize import layer_report, quantize_unet
from .runtime import ort_pipeline
from .recipes import DEFAULT_RECIPES, parse_recipes
from .report import versions, write_report, write_results

logger = logging.getLogger(__name__)
CONFIG_VERSION = 1
RANDOM_CALIBRATION = "random"
GRID_COLUMNS = 8  # the grid shows the first images; every image is saved and measured
CALIBRATION_SEED = 31_337  # shapes-sd calibration captions; evaluation captions use other seeds


@dataclass
class RunConfig:
    """Everything that determines a run; written to config.json next to its outputs."""

    model: str | None = None
    prompts: list[str] | None = None
    num_images: int | None = None
    seed: int = 1024
    steps: int | None = None
    guidance: float | None = None
    recipes: list[str] = field(default_factory=lambda: list(DEFAULT_RECIPES))
    device: str = "auto"
    dtype: str = "auto"
    export: bool = True
    export_pipeline: bool = False
    out: str | None = None
    exclude: list[str] = field(default_factory=list)
    calib_prompts: str | None = None
    calib_size: int = 64
    calib_steps: int | None = None
    calib_timesteps: int | None = 8
    calib_column: str | None = None
    calib_split: str = "train"

    def to_dict(self) -> dict:
        return {"type": "RunConfig", "version": CONFIG_VERSION, **asdict(self)}


def resolve_out_dir(out: str | Path | None) -> Path:
    """The folder a run writes to: a new timestamped one unless `out` is new or empty.

    An existing non-empty `out` is never written into: a sibling `<out>-<timestamp>` is used instead.
    """
    if out is None:
        return new_run_dir()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fresh = new_run_dir(out.parent)
        target = out.parent / f"{out.name}-{fresh.name}"
        fresh.rename(target)
        logger.warning("%s exists and is not empty: writing to %s instead", out, target)
        return target
    out.mkdir(parents=True, exist_ok=True)
    return out


def _prompts(pipe, config: RunConfig) -> list[str]:
    if config.prompts:
        n = config.num_images or len(config.prompts)
        return [config.prompts[k % len(config.prompts)] for k in range(n)]
    from .pipeline import is_shapes_sd

    return default_prompts(pipe, config.num_images or (6 if is_shapes_sd(pipe) else 3))


def _save_images(out_dir: Path, label: str, images) -> list[str]:
    paths = []
    for k, image in enumerate(images):
        rel = Path("images") / label / f"{k:03d}.png"
        save_image(image, out_dir / rel)
        paths.append(str(rel))
    return paths


@contextmanager
def _timed(timings: dict, step: str):
    started = time.perf_counter()
    yield
    timings[step] = round(time.perf_counter() - started, 3)


def calibrate(pipe, config: RunConfig, steps: int, guidance: float):
    """Load the calibration prompts and capture UNet inputs with the generation settings.

    Returns (calibration set, a JSON-able description of it)."""
    from .calibration import CalibrationConfig, capture_unet_inputs, random_calibration
    from .pipeline import is_shapes_sd
    from .prompt_sources import load_prompts
    from .shapes.dataset import sample_captions

    if config.calib_prompts == RANDOM_CALIBRATION:  # the naive baseline that real capture is measured against
        items = random_calibration(pipe.unet, n=config.calib_size, sequence_length=pipe.tokenizer.model_max_length)
        return items, {"source": "random inputs (Gaussian latents and text embeddings, uniform timesteps)",
                       "prompts": 0, "unet_calls": len(items),
                       "timesteps": sorted({int(t) for item in items for t in item["timestep"]}, reverse=True),
                       "steps": None}
    default = (lambda n, seed: sample_captions(n, seed=CALIBRATION_SEED + seed)) if is_shapes_sd(pipe) else None
    prompts = load_prompts(config.calib_prompts, config.calib_size, column=config.calib_column,
                           split=config.calib_split, default=default)
    calib_config = CalibrationConfig(size=len(prompts), steps=config.calib_steps or steps,
                                     timesteps=config.calib_timesteps, guidance=guidance)
    captured = capture_unet_inputs(pipe, prompts, calib_config)
    return captured, {"source": config.calib_prompts or "shapes-sd captions (seed disjoint from evaluation)",
                      "prompts": len(prompts), "unet_calls": len(captured),
                      "timesteps": sorted(set(captured.timesteps), reverse=True), "steps": calib_config.steps}


def unet_output_sqnr(baseline_unet, quantized_unet, inputs) -> float:
    """SQNR (dB) of the quantized UNet's output vs the baseline's over the same recorded inputs."""
    with torch.no_grad():
        reference = torch.cat([baseline_unet(**item, return_dict=False)[0].flatten() for item in inputs])
        test = torch.cat([quantized_unet(**item, return_dict=False)[0].flatten() for item in inputs])
    return sqnr_db(reference, test)


def run(config: RunConfig | None = None, **overrides) -> dict:
    """Run the tutorial end to end and return the results dict (also written to results.json).

    Args:
        config: a RunConfig; keyword overrides are applied on top (e.g. `run(recipes=["int8-w"])`).

    Returns:
        The results: settings, prompts, per-recipe metrics, exports, timings, layer reports and the
        output folder under "out_dir".
    """
    started = time.perf_counter()
    config = config or RunConfig()
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise DiffquantError(f"unknown run option {key!r}")
        setattr(config, key, value)
    recipes = parse_recipes(config.recipes)  # fail on a bad name before any slow work
    if config.export_pipeline and not config.export:
        raise DiffquantError("--export-pipeline writes the exported UNet into the pipeline folder: drop --no-export")
    if config.export_pipeline:
        from .onnx_pipeline import require_exporter

        require_exporter()  # Optimum missing: say so before any slow work
    out_dir = resolve_out_dir(config.out)
    write_json(out_dir / "config.json", config.to_dict())
    timings: dict[str, float] = {}

    with _timed(timings, "load pipeline"):
        pipe = load_pipeline(config.model, config.device, config.dtype)
    settings = default_settings(pipe, config.seed)
    steps = config.steps or settings.steps
    guidance = settings.guidance if config.guidance is None else config.guidance
    prompts = _prompts(pipe, config)
    results: dict = {
        "out_dir": str(out_dir), "model": config.model or "shapes-sd (embedded)", "prompts": prompts,
        "settings": {"seed": config.seed, "steps": steps, "guidance": guidance},
        "config": config.to_dict(), "versions": versions(), "timings": timings, "recipes": {},
        "unet_fp32_bytes": sum(p.numel() * 4 for p in pipe.unet.parameters()),
    }
    gen = dict(seed=config.seed, steps=steps, guidance=guidance)
    calibration = None
    if any(r.needs_calibration for r in recipes):
        with _timed(timings, "calibrate"):
            calibration, results["calibration"] = calibrate(pipe, config, steps=steps, guidance=guidance)

    # The UNet inputs of the evaluation trajectories, for the UNet-output SQNR of each recipe.
    with _timed(timings, "generate baseline"), recording_unet_inputs(pipe, steps, timesteps=4) as eval_inputs:
        baseline = generate(pipe, prompts, desc="baseline", **gen)
    results["baseline"] = {"images": _save_images(out_dir, "baseline", baseline),
                           "shapeeval": prompt_adherence(baseline, prompts)}
    rows = {"baseline": baseline}
    write_results(out_dir, results)

    for recipe in recipes:
        entry: dict = {"recipe": recipe.to_dict()}
        with _timed(timings, f"quantize {recipe.name}"):
            quantized = quantize_unet(pipe, recipe, calibration=calibration if recipe.needs_calibration else None,
                                      exclude=config.exclude)
        with _timed(timings, f"generate {recipe.name} (simulated fake-quant)"):
            images = generate(quantized, prompts, desc=recipe.name, **gen)
        entry["images"] = _save_images(out_dir, recipe.name, images)
        rows[recipe.name] = images
        entry["metrics"] = compare(baseline, images, prompts).to_dict()
        entry["unet_sqnr_db"] = unet_output_sqnr(pipe.unet, quantized.unet,
                                                 [eval_inputs[i] for i in range(min(len(eval_inputs), 16))])
        entry["layers"] = layer_report(quantized.unet).to_dict()
        if config.export:
            with _timed(timings, f"export {recipe.name}"):
                exported = export_onnx(quantized, out_dir / "onnx" / recipe.name)
            entry["onnx"] = exported.to_dict() | {"path": str(exported.path.relative_to(out_dir))}
            with _timed(timings, f"generate {recipe.name} (ONNX Runtime)"):
                ort_images = generate(ort_pipeline(pipe, exported.path), prompts, desc=f"{recipe.name} ORT", **gen)
            entry["ort"] = {"images": _save_images(out_dir, f"{recipe.name}-ort", ort_images),
                            "vs_torch": compare(images, ort_images, prompts).to_dict(),
                            "vs_baseline": compare(baseline, ort_images, prompts).to_dict()}
            rows[f"{recipe.name} ORT"] = ort_images
            if config.export_pipeline:
                from .onnx_pipeline import export_pipeline

                with _timed(timings, f"export pipeline {recipe.name}"):
                    deployed = export_pipeline(quantized, out_dir / "pipeline" / recipe.name, unet_onnx=exported.path)
                entry["pipeline"] = deployed.to_dict() | {"path": str(deployed.path.relative_to(out_dir))}
        results["recipes"][recipe.name] = entry
        write_results(out_dir, results)  # finished recipes stay on disk if a later one is interrupted
        del quantized
        gc.collect()

    columns = min(len(prompts), GRID_COLUMNS)
    grid = image_grid({label: images[:columns] for label, images in rows.items()},
                      column_labels=[f"#{k} seed {config.seed + k}" for k in range(columns)])
    save_image(grid, out_dir / "grid.png")
    results["grid"] = "grid.png"
    timings["total"] = round(time.perf_counter() - started, 3)
    write_results(out_dir, results)
    write_report(out_dir, results)
    logger.info("wrote %s", out_dir / "report.html")
    return results
