"""The whole tutorial as one call: baseline images, each recipe quantized, compared and exported,
then results.json and report.html. `diffquant run` is a thin shell over `run`."""

from __future__ import annotations

import gc
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .artifacts import output_folder, save_image, write_json
from .errors import DiffquantError
from .calibration import calibrate, recording_unet_inputs
from .export import export_onnx
from .generation import as_prompt_list, check_settings, default_prompts, default_settings, generate, image_grid
from .metrics import compare, prompt_adherence, sqnr_db
from .pipeline import load_pipeline
from .quantize import layer_report, quantize_unet
from .runtimes.onnxruntime import ort_pipeline
from .recipes import DEFAULT_RECIPES, parse_recipes
from .report import versions, write_report, write_results

logger = logging.getLogger(__name__)
CONFIG_VERSION = 1
GRID_COLUMNS = 8  # the grid shows the first images; every image is saved and measured


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

    def validate(self) -> None:
        """Refuse settings that cannot run, before any slow work (one DiffquantError naming the fix)."""
        check_settings(self.steps, self.guidance, self.num_images)
        if self.prompts is not None:
            self.prompts = as_prompt_list(self.prompts)
            if not self.prompts or not all(p.strip() for p in self.prompts):
                raise DiffquantError("empty prompt: pass non-empty --prompt texts, or none for the model's defaults")
        for name in ("calib_size", "calib_steps", "calib_timesteps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                flag = "--" + name.replace("_", "-")
                raise DiffquantError(f"{flag} must be a whole number of at least 1, got {value!r}")
        if str(self.dtype).lower() in ("bf16", "bfloat16") and self.export:
            # Measured: the int8/fp8 weight codes of a bf16 UNet do not match Quark's fake-quantized
            # weights, so the ONNX export fails after all the generation work.
            raise DiffquantError("--dtype bf16 cannot be exported to ONNX: pass --no-export with bf16, or --dtype "
                                 "fp32 (CPU) / fp16 (GPU)")


def _prompts(pipe, config: RunConfig) -> list[str]:
    if config.prompts:
        n = config.num_images or len(config.prompts)
        return [config.prompts[k % len(config.prompts)] for k in range(n)]
    from .pipeline import is_shapes_sd

    return default_prompts(pipe, config.num_images or (6 if is_shapes_sd(pipe) else 3))


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


def calibrate_for_run(pipe, config: RunConfig, steps: int, guidance: float):
    """`calibrate` with a run's calibration options and generation settings.

    Returns (calibration set, a JSON-able description of it)."""
    captured = calibrate(pipe, config.calib_prompts, size=config.calib_size, steps=config.calib_steps or steps,
                         timesteps=config.calib_timesteps, guidance=guidance, column=config.calib_column,
                         split=config.calib_split)
    return captured, captured.description


def unet_output_sqnr(baseline_unet, quantized_unet, inputs) -> float:
    """SQNR (dB) of the quantized UNet's output vs the baseline's over the same recorded inputs."""
    with torch.no_grad():
        reference = torch.cat([baseline_unet(**item, return_dict=False)[0].flatten() for item in inputs])
        test = torch.cat([quantized_unet(**item, return_dict=False)[0].flatten() for item in inputs])
    return sqnr_db(reference, test)


def run(config: RunConfig | None = None, **overrides) -> dict:
    """Run the tutorial end to end and return the results dict (also written to results.json).

    Args:
        config: a RunConfig (not modified); keyword overrides are applied to a copy (e.g.
            `run(recipes=["int8-w"])`).

    Returns:
        The results: settings, prompts, per-recipe metrics, exports, timings, layer reports and the
        output folder under "out_dir".
    """
    started = time.perf_counter()
    unknown = [key for key in overrides if key not in RunConfig.__dataclass_fields__]
    if unknown:
        raise DiffquantError(f"unknown run option {unknown[0]!r}: the options are {', '.join(RunConfig.__dataclass_fields__)}")
    config = replace(config or RunConfig(), **overrides)
    config.validate()
    recipes = parse_recipes(config.recipes)  # fail on a bad name before any slow work
    if config.export_pipeline and not config.export:
        raise DiffquantError("--export-pipeline writes the exported UNet into the pipeline folder: drop --no-export")
    if config.export_pipeline:
        from .onnx_pipeline import require_exporter

        require_exporter()  # Optimum missing: say so before any slow work
    with output_folder(config.out) as out_dir:
        return _run(config, recipes, out_dir, started)


def _run(config: RunConfig, recipes, out_dir: Path, started: float) -> dict:
    timings: dict[str, float] = {}
    with _timed(timings, "load pipeline"):
        pipe = load_pipeline(config.model, config.device, config.dtype)
    # Written only once the model loaded: a run that fails to start leaves no folder to step around.
    write_json(out_dir / "config.json", config.to_dict())
    settings = default_settings(pipe, config.seed)
    steps = settings.steps if config.steps is None else config.steps
    guidance = settings.guidance if config.guidance is None else config.guidance
    prompts = _prompts(pipe, config)
    results: dict = {
        "out_dir": str(out_dir), "status": "running", "model": config.model or "shapes-sd (embedded)",
        "prompts": prompts, "settings": {"seed": config.seed, "steps": steps, "guidance": guidance},
        "config": config.to_dict(), "versions": versions(), "timings": timings, "recipes": {},
        "unet_fp32_bytes": sum(p.numel() * 4 for p in pipe.unet.parameters()),
    }
    try:
        _stages(pipe, config, recipes, out_dir, prompts, steps, guidance, results)
    except BaseException as error:
        if any(p.name != "config.json" for p in out_dir.iterdir()):  # else the folder is removed
            interrupted = isinstance(error, KeyboardInterrupt)
            results["status"] = "interrupted" if interrupted else "failed"
            if not interrupted:
                results["error"] = f"{type(error).__name__}: {error}"
            write_results(out_dir, results)
        raise
    timings["total"] = round(time.perf_counter() - started, 3)
    results["status"] = "complete"
    write_results(out_dir, results)
    write_report(out_dir, results)
    logger.info("wrote %s", out_dir / "report.html")
    return results


def _stages(pipe, config: RunConfig, recipes, out_dir: Path, prompts: list[str], steps: int, guidance: float,
            results: dict) -> None:
    """Baseline, then each recipe quantized, measured and exported; `results` is filled as they finish."""
    timings = results["timings"]
    gen = dict(seed=config.seed, steps=steps, guidance=guidance)
    calibration = None
    if any(r.needs_calibration for r in recipes):
        with _timed(timings, "calibrate"):
            calibration, results["calibration"] = calibrate_for_run(pipe, config, steps=steps, guidance=guidance)

    # The UNet inputs of the evaluation trajectories, for the UNet-output SQNR of each recipe.
    with _timed(timings, "generate baseline"), recording_unet_inputs(pipe, steps, timesteps=4) as eval_inputs:
        baseline, paths = _generate_saved(pipe, prompts, out_dir, "baseline", "baseline", gen)
    results["baseline"] = {"images": paths, "shapeeval": prompt_adherence(baseline, prompts)}
    rows = {"baseline": baseline}
    write_results(out_dir, results)

    for recipe in recipes:
        entry: dict = {"recipe": recipe.to_dict()}
        with _timed(timings, f"quantize {recipe.name}"):
            quantized = quantize_unet(pipe, recipe, calibration=calibration if recipe.needs_calibration else None,
                                      exclude=config.exclude)
        with _timed(timings, f"generate {recipe.name} (simulated fake-quant)"):
            images, entry["images"] = _generate_saved(quantized, prompts, out_dir, recipe.name, recipe.name, gen)
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
                # ONNX Runtime gets the thread count torch was given (the CLI's --threads), not all cores.
                ort = ort_pipeline(pipe, exported.path, threads=torch.get_num_threads())
                ort_images, ort_paths = _generate_saved(ort, prompts, out_dir, f"{recipe.name}-ort",
                                                        f"{recipe.name} ORT", gen)
            entry["ort"] = {"images": ort_paths,
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
