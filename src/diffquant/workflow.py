"""The whole tutorial as one call: baseline images, each recipe quantized, compared and exported,
then results.json and report.html. `diffquant run` is a thin shell over `run`."""

from __future__ import annotations

import gc
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from diffquant.core.artifacts import output_folder, save_image, write_json
from diffquant.quantization.calibration import calibrate_for_run, recording_denoiser_inputs
from diffquant.core.config import RESUME_IGNORED, RunConfig
from diffquant.models.denoisers import denoiser_of
from diffquant.core.errors import DiffquantError
from diffquant.evaluate.scoring import Scorer, read_images
from diffquant.evaluate.sharding import (batches, broadcast, finish, generate_set, image_path, process_device, processes,
                         record_batches)
from diffquant.export.onnx import export_onnx
from diffquant.models.generation import default_prompts, default_settings, generate, image_grid, pipeline_kwargs
from diffquant.evaluate.metrics import are_shapes_captions, sqnr_db
from diffquant.models.pipeline import load_pipeline
from diffquant.models.profiles import profile_of
from diffquant.quantization.api import layer_report, quantize
from diffquant.core.recipes import parse_recipes
from diffquant.report.html import versions, write_report, write_results
from diffquant.core.results import Evaluation, OrtImages, RecipeResult, RunResult
from diffquant.runtimes import RUNTIMES, get_runtime
from diffquant.core.record import record_of

logger = logging.getLogger(__name__)
GRID_COLUMNS = 8  # the grid shows the first images; every image is saved and measured
SQNR_RECORDS = 16  # recorded denoiser calls of the evaluation trajectories that the output SQNR averages
SQNR_TIMESTEPS = 4  # calls recorded per trajectory (spread over its steps)
ALL_PROMPTS = 10**9  # a prompt source without --num-images: all of its prompts


def _prompts(pipe, config: RunConfig, profile) -> list[str]:
    if config.prompt_source:
        from diffquant.quantization.prompt_sources import load_prompts

        return load_prompts(config.prompt_source, config.num_images or ALL_PROMPTS, column=config.prompt_column,
                            split=config.prompt_split, role="evaluation")
    if config.prompts:
        n = config.num_images or len(config.prompts)
        return [config.prompts[k % len(config.prompts)] for k in range(n)]
    return default_prompts(pipe, config.num_images or profile.num_images)


def calibration_overlap(prompts: list[str], calibration_prompts: list[str]) -> list[str]:
    """The evaluation prompts that are also calibration prompts (in evaluation order, once each), with a
    warning naming them: quality measured on the prompts the scales were fitted to flatters the recipe."""
    calibration = set(calibration_prompts)
    overlap = list(dict.fromkeys(p for p in prompts if p in calibration))
    if overlap:
        shown = "; ".join(repr(p) for p in overlap[:3]) + (" ..." if len(overlap) > 3 else "")
        logger.warning("%d of the %d evaluation prompts are also calibration prompts (%s): pass disjoint "
                       "--prompts and --calib-prompts", len(overlap), len(set(prompts)), shown)
    return overlap


def _gguf_stages(ctx: RunContext, quantized, recipe, entry: RecipeResult | None) -> RecipeResult | None:
    """A "gguf" recipe's GGUF file (main process), then every process's share of its images with the file
    loaded by diffusers' own GGUF loader, measured against the torch fake-quant images and the baseline."""
    from diffquant.export.gguf import export_gguf, load_gguf
    from diffquant.quantization.api import with_denoiser

    state, out_dir, prompts, main = ctx.state, ctx.out_dir, ctx.prompts, ctx.main
    path = None
    if main:
        with _timed(ctx.timings, f"export {recipe.name} (GGUF)"):
            written = export_gguf(quantized, out_dir / "gguf" / recipe.name)
        entry = replace(entry, gguf=written.to_dict() | {"path": str(written.path.relative_to(out_dir))})
        path = written.path
    path = Path(broadcast(state, str(path)))
    label = f"{recipe.name}-gguf"
    with _timed(ctx.timings, f"generate {recipe.name} (GGUF in diffusers)"):
        loaded = with_denoiser(ctx.pipe, ctx.family.pipeline_attribute, load_gguf(ctx.pipe, path))
        ctx.throughput.extend(generate_set(state, loaded, prompts, out_dir, label, ctx.gen, ctx.config.batch_size))
    if not main:
        return None
    vs_baseline, _ = ctx.scorer.image_set(label, scores=False)
    vs_torch, _ = ctx.scorer.image_set(label, reference=recipe.name, scores=False)
    _write_card(ctx, quantized, path, "gguf", entry.gguf["size_bytes"], entry,
                ("the GGUF file in diffusers", vs_baseline))
    return replace(entry, gguf_images=OrtImages(_paths(label, prompts), vs_torch=vs_torch, vs_baseline=vs_baseline))


def _write_card(ctx: RunContext, quantized, path: Path, fmt: str, size_bytes: int, entry: RecipeResult,
                drawn) -> None:
    """The exported folder's model card again, now with the run's fidelity: the torch fake-quant images and the
    images the exported file drew (`drawn`: (what drew them, Quality)), each against the fp32 images."""
    from diffquant.export.model_card import base_model_of, facts_for, write_model_card

    module = denoiser_of(quantized).module
    write_model_card(path.parent, facts_for(module, base_model_of(ctx.pipe), fmt, path.name, size_bytes,
                                            _fidelity_rows(ctx, entry, drawn), ctx.gen))


def _fidelity_rows(ctx: RunContext, entry: RecipeResult, drawn) -> tuple:
    """A card's fidelity rows: the torch fake-quant images and `drawn` ((what drew them, Quality)) vs fp32."""
    from diffquant.export.model_card import Fidelity

    return tuple(Fidelity(label, q.n or len(ctx.prompts), q.psnr_db, q.psnr_p10_db, q.psnr_worst_db, q.ssim)
                 for label, q in (("torch fake-quant", entry.quality), drawn) if q is not None)


def _write_pipeline_card(ctx: RunContext, quantized, deployed, entry: RecipeResult, drawn) -> None:
    """The Optimum folder's model card again, with the run's fidelity (its denoiser graph is the one whose
    images `drawn` measured)."""
    from diffquant.export.model_card import base_model_of, write_model_card
    from diffquant.export.optimum import card_facts

    write_model_card(deployed.path, card_facts(deployed, denoiser_of(quantized), base_model_of(ctx.pipe),
                                               _fidelity_rows(ctx, entry, drawn), ctx.gen))


def _plan_fields(record) -> dict:
    """What results.json says of why layers stayed float: the profile's reason, and each reason of the
    layer plan with the layers it kept float (or gave the recipe's fallback)."""
    fields = {"float_reason": record.float_reason}
    if record.plan is not None:
        fields |= {"float_reasons": record.plan.reasons("float"), "fallback_reasons": record.plan.reasons("fallback")}
    return fields


@contextmanager
def _timed(timings: dict, step: str):
    started = time.perf_counter()
    yield
    timings[step] = round(time.perf_counter() - started, 3)


def denoiser_output_sqnr(baseline, quantized, records) -> float:
    """SQNR (dB) of the quantized denoiser's output vs the baseline's over the same recorded calls."""
    from diffquant.models.denoisers import denoiser_for

    tensor = denoiser_for(baseline).output_tensor  # a module that returns a list per sample (Z-Image): stacked
    with torch.no_grad():
        reference = torch.cat([tensor(baseline(**item, return_dict=False)[0]).flatten() for item in records])
        test = torch.cat([tensor(quantized(**item, return_dict=False)[0]).flatten() for item in records])
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
    if config.export:
        from diffquant.quantization.backends import get_backend

        get_backend().check_recipes([r for r in recipes if r.has_onnx_form])  # GGUF-only ones skip ONNX
    if config.runtime == "openvino" and config.export:
        from diffquant.runtimes.openvino.runtime import import_openvino

        import_openvino()  # not installed: say so before any slow work
    if config.export_pipeline:
        from diffquant.export.optimum import require_exporter

        require_exporter()  # Optimum missing: say so before any slow work
    state = processes(config.device)
    try:
        with _run_folder(config, state) as out_dir:
            results = _run(config, recipes, out_dir, started, state)
        if not state.is_main_process:  # the main process measured and wrote the results
            results = RunResult.load(out_dir)
        return results
    finally:
        finish(state)


@contextmanager
def _run_folder(config: RunConfig, state):
    """The run folder, chosen by the main process and shared with the others. With `resume`, `out` is
    reused when it holds a run of the same config (the images on disk are kept)."""
    if not state.is_main_process:
        state.wait_for_everyone()  # the main process chooses (and checks) the folder first
        yield Path(broadcast(state, None))
        return
    if config.resume and (Path(config.out).expanduser() / "config.json").is_file():
        folder = Path(config.out).expanduser()
        previous = RunConfig.load(folder / "config.json")
        if not previous.same_run(config):
            differ = [f for f in config.__dataclass_fields__ if f not in RESUME_IGNORED
                      and getattr(previous, f) != getattr(config, f)]
            raise DiffquantError(f"--resume: {folder} holds a run with other settings ({', '.join(differ)}): pass the "
                                 "same options as that run, or another --out")
        logger.info("resuming the run in %s", folder)
        state.wait_for_everyone()
        yield Path(broadcast(state, str(folder)))
        return
    with output_folder(config.out) as folder:
        state.wait_for_everyone()
        yield Path(broadcast(state, str(folder)))


def _run(config: RunConfig, recipes, out_dir: Path, started: float, state) -> RunResult:
    timings: dict[str, float] = {}
    with _timed(timings, "load pipeline"):
        pipe = load_pipeline(config.model, process_device(state, config.device), config.dtype, no_t5=config.no_t5)
    # Written only once the model loaded: a run that fails to start leaves no folder to step around.
    if state.is_main_process:
        write_json(out_dir / "config.json", config.to_dict())
    family = denoiser_of(pipe)
    profile = profile_of(pipe)
    settings = default_settings(pipe, config.seed)
    steps = settings.steps if config.steps is None else config.steps
    guidance = settings.guidance if config.guidance is None else config.guidance
    prompts = _prompts(pipe, config, profile)
    # a size or clip length the model cannot take: say so now
    video = pipeline_kwargs(pipe, guidance, config.height, config.width, config.frames).get("num_frames")
    sizes = {k: v for k, v in (("height", config.height), ("width", config.width), ("frames", video)) if v}
    results = RunResult(
        out_dir=str(out_dir), status="running", model=config.model or "shapes-sd (embedded)",
        denoiser=type(family.module).__name__, prompts=tuple(prompts),
        settings={"seed": config.seed, "steps": steps, "guidance": guidance, **sizes}, config=config.to_dict(),
        versions=versions(), timings=timings,
        denoiser_fp32_bytes=sum(p.numel() * 4 for p in family.module.parameters()),
    )
    saved = _SavedResults(out_dir, results, write=state.is_main_process)
    scorer = None
    if state.is_main_process:
        scorer = Scorer(out_dir, prompts, config.clip_model, config.reference_images, pipe.device,
                        shapes=are_shapes_captions(prompts), frames=video or 1)
    ctx = RunContext(config=config, pipe=pipe, family=family, profile=profile, prompts=prompts,
                     gen=dict(seed=config.seed, steps=steps, guidance=guidance, height=config.height,
                              width=config.width, frames=config.frames), out_dir=out_dir, state=state,
                     saved=saved, scorer=scorer)
    try:
        _stages(ctx, recipes)
    except BaseException as error:
        if state.is_main_process and any(p.name != "config.json" for p in out_dir.iterdir()):  # else it is removed
            interrupted = isinstance(error, KeyboardInterrupt)
            saved.update(status="interrupted" if interrupted else "failed",
                         error=None if interrupted else f"{type(error).__name__}: {error}")
        raise
    results = saved.results
    timings["total"] = round(time.perf_counter() - started, 3)
    results = replace(results, status="complete")
    if state.is_main_process:
        write_results(out_dir, results)
        write_report(out_dir, results)
        logger.info("wrote %s", out_dir / "report.html")
    state.wait_for_everyone()
    return results


def _trace_inputs(family, records: list[dict]) -> dict | None:
    """Example inputs for the export: a recorded call of the run (one sample of it for a family whose graph keeps
    its traced batch, FLUX.1), since a graph keeps the image and text sizes it was traced with (only the batch is
    dynamic). None (no records): the family's own example inputs."""
    if not records:
        return None
    return family.first_sample(family.graph_inputs(records[0]))


class _SavedResults:
    """The results of a run in progress, rewritten to results.json each time a stage finishes, so an
    interrupted run keeps what it finished."""

    def __init__(self, out_dir: Path, results: RunResult, write: bool = True):
        self.out_dir, self.results, self.write = out_dir, results, write  # only the main process writes

    def update(self, **changes) -> None:
        self.set(replace(self.results, **changes))

    def set(self, results: RunResult) -> None:
        self.results = results
        if self.write:
            write_results(self.out_dir, results)


class _SqnrInputs:
    """The denoiser's inputs of the first evaluation batches (main process), for each recipe's output SQNR:
    recorded while the main process makes them, or made again (not saved) when another process made
    them or a resumed run found them on disk, so the records are the same whatever the process count."""

    def __init__(self, pipe, steps: int) -> None:
        self.pipe, self.steps = pipe, steps
        self.batches = record_batches(SQNR_RECORDS, SQNR_TIMESTEPS)
        self.by_batch: dict[int, list[dict]] = {}

    @contextmanager
    def record(self, batch: int):
        if batch >= self.batches:
            yield None
            return
        with recording_denoiser_inputs(self.pipe, self.steps, timesteps=SQNR_TIMESTEPS) as captured:
            yield captured
        self.by_batch[batch] = list(captured)

    def records(self, prompts: list[str], gen: dict, batch_size: int) -> list[dict]:
        for b, ks in enumerate(batches(len(prompts), batch_size)[:self.batches]):
            if b not in self.by_batch:
                with self.record(b):
                    generate(self.pipe, prompts[ks.start:ks.stop], seed=gen["seed"] + ks.start, steps=gen["steps"],
                             guidance=gen["guidance"], batch_size=batch_size, show_progress=False,
                             height=gen["height"], width=gen["width"], frames=gen["frames"])
        return [r for b in sorted(self.by_batch) for r in self.by_batch[b]][:SQNR_RECORDS]


@dataclass(frozen=True)
class RunContext:
    """What every stage of a run reads, resolved once when the model is loaded: the configuration, the pipeline,
    its denoiser family and profile, the prompts and generation settings, where the run writes, the processes,
    and the accumulators the stages add to (timings, throughput, the results written so far)."""

    config: RunConfig
    pipe: object
    family: object  # the pipeline's Denoiser
    profile: object  # the model's Profile
    prompts: list[str]
    gen: dict  # seed, steps, guidance of every generated image set
    out_dir: Path
    state: object  # the processes (evaluation.processes)
    saved: _SavedResults
    throughput: list = field(default_factory=list)
    scorer: object = None  # the main process's Scorer

    @property
    def main(self) -> bool:
        return self.state.is_main_process

    @property
    def timings(self) -> dict:
        return self.saved.results.timings


def _stages(ctx: RunContext, recipes) -> None:
    """Baseline, then each recipe quantized, measured and exported. Every process generates its share of
    each image set; the main process measures them and writes the results."""
    config, pipe, prompts, out_dir, state, saved = ctx.config, ctx.pipe, ctx.prompts, ctx.out_dir, ctx.state, ctx.saved
    timings, main, gen, throughput, scorer = ctx.timings, ctx.main, ctx.gen, ctx.throughput, ctx.scorer
    steps, guidance = gen["steps"], gen["guidance"]
    overlap: list[str] = []
    calibration = None
    if any(r.needs_calibration for r in recipes):
        # Every process calibrates on the same prompts and seeds (deterministic), instead of receiving the
        # main process's records: no activations (GBs for SDXL/FLUX.1) cross the network, and no process
        # waits longer than it would for the main process's calibration.
        with _timed(timings, "calibrate"):
            calibration, described = calibrate_for_run(pipe, config, steps=steps, guidance=guidance)
        if main:
            overlap = calibration_overlap(prompts, calibration.prompts)
        saved.update(calibration=described)

    def evaluation() -> Evaluation:
        return Evaluation(prompt_source=config.prompt_source or ("given prompts" if config.prompts else
                                                                 "the model's default prompts"),
                          n=len(prompts), processes=state.num_processes, batch_size=config.batch_size,
                          fid_features=scorer.fid_features, clip_model=config.clip_model,
                          reference_images=config.reference_images, missing=tuple(scorer.missing),
                          calibration_overlap=tuple(overlap), throughput=tuple(throughput))

    sqnr_inputs = _SqnrInputs(pipe, steps)
    with _timed(timings, "generate baseline"):
        throughput += generate_set(state, pipe, prompts, out_dir, "baseline", gen, config.batch_size,
                                   record=sqnr_inputs.record if main else None)
    records = []
    if main:
        records = sqnr_inputs.records(prompts, gen, config.batch_size)
        with _timed(timings, "measure baseline"):
            baseline_shapeeval, baseline_scores = scorer.baseline()
        saved.update(baseline_images=_paths("baseline", prompts),
                     baseline_shapeeval=baseline_shapeeval, baseline_scores=baseline_scores,
                     evaluation=evaluation())
    labels = ["baseline"]
    family = ctx.family

    for recipe in recipes:
        with _timed(timings, f"quantize {recipe.name}"):
            quantized = quantize(pipe, recipe, calibration=calibration if recipe.needs_calibration else None,
                                 exclude=config.exclude, profile_exclusions=not config.quantize_all)
        q_module = denoiser_of(quantized).module
        with _timed(timings, f"generate {recipe.name} (simulated fake-quant)"):
            throughput += generate_set(state, quantized, prompts, out_dir, recipe.name, gen, config.batch_size)
        labels.append(recipe.name)
        entry = None
        if main:
            with _timed(timings, f"measure {recipe.name}"):
                quality, scores = scorer.image_set(recipe.name)
            entry = RecipeResult(recipe=recipe.to_dict(), images=_paths(recipe.name, prompts), quality=quality,
                                 notes=tuple(scorer.notes), sqnr_db=denoiser_output_sqnr(family.module, q_module, records),
                                 layers=layer_report(q_module).to_dict() | _plan_fields(record_of(q_module)),
                                 scores=scores)
        if config.export and recipe.has_onnx_form:
            entry = _export_stages(ctx, quantized, recipe, records, entry)
            labels.append(f"{recipe.name}-{get_runtime(config.runtime).tag}")
        if config.export and recipe.format == "gguf":
            entry = _gguf_stages(ctx, quantized, recipe, entry)
            labels.append(f"{recipe.name}-gguf")
        if main:
            saved.set(replace(saved.results.with_recipe(recipe.name, entry), evaluation=evaluation()))
        del quantized, q_module
        gc.collect()

    if main:
        columns = min(len(prompts), GRID_COLUMNS)
        rows = {_row_name(label): read_images([out_dir / image_path(label, k) for k in range(columns)])
                for label in labels}
        grid = image_grid(rows, column_labels=[f"#{k} seed {config.seed + k}" for k in range(columns)])
        save_image(grid, out_dir / "grid.png")
        saved.update(grid="grid.png")


def _row_name(label: str) -> str:
    """Grid row of an image set: "w8a8-int8-ort" -> "w8a8-int8 ORT"."""
    for runtime in RUNTIMES.values():
        if label.endswith(f"-{runtime.tag}"):
            return f"{label[:-len(runtime.tag) - 1]} {runtime.short_name}"
    return label


def _paths(label: str, prompts: list[str]) -> tuple[str, ...]:
    return tuple(str(image_path(label, k)) for k in range(len(prompts)))


def _export_stages(ctx: RunContext, quantized, recipe, records: list[dict],
                   entry: RecipeResult | None) -> RecipeResult | None:
    """The main process exports the quantized denoiser to ONNX (and the pipeline, when asked); every process
    then generates its share of the runtime images (ONNX Runtime or OpenVINO); the main process measures them.
    `records`: the recorded denoiser calls the export check runs."""
    config, pipe, prompts, out_dir, state = ctx.config, ctx.pipe, ctx.prompts, ctx.out_dir, ctx.state
    timings, main, gen, family, scorer = ctx.timings, ctx.main, ctx.gen, ctx.family, ctx.scorer
    path = None
    if main:
        with _timed(timings, f"export {recipe.name}"):
            exported = export_onnx(quantized, out_dir / "onnx" / recipe.name, inputs=_trace_inputs(family, records),
                                   check_inputs=records, runtime=config.runtime)
        entry = replace(entry, onnx=exported.to_dict() | {"path": str(exported.path.relative_to(out_dir))})
        path = exported.path
    path = Path(broadcast(state, str(path)))
    runtime = get_runtime(config.runtime)
    tag = runtime.tag
    with _timed(timings, f"generate {recipe.name} ({runtime.title})"):
        # The runtime gets the thread count torch was given (the CLI's --threads), not all cores.
        runner = runtime.pipeline(pipe, path, threads=torch.get_num_threads())
        ctx.throughput.extend(generate_set(state, runner, prompts, out_dir, f"{recipe.name}-{tag}", gen,
                                           config.batch_size))
    if not main:
        return None
    vs_baseline, _ = scorer.image_set(f"{recipe.name}-{tag}", scores=False)
    vs_torch, _ = scorer.image_set(f"{recipe.name}-{tag}", reference=recipe.name, scores=False)
    _write_card(ctx, quantized, path, "onnx", entry.onnx["size_bytes"], entry, (runtime.title, vs_baseline))
    entry = replace(entry, ort=OrtImages(_paths(f"{recipe.name}-{tag}", prompts), vs_torch=vs_torch,
                                         vs_baseline=vs_baseline))
    if config.export_pipeline:
        from diffquant.export.optimum import export_pipeline

        with _timed(timings, f"export pipeline {recipe.name}"):
            deployed = export_pipeline(quantized, out_dir / "pipeline" / recipe.name, denoiser_onnx=path)
        entry = replace(entry, pipeline=deployed.to_dict() | {"path": str(deployed.path.relative_to(out_dir))})
        _write_pipeline_card(ctx, quantized, deployed, entry, (runtime.title, vs_baseline))
    return entry

