"""Side-by-side benchmark: denoiser-call latency (median, p90 after warm-up), time per image, peak memory
and artifact size for torch fp32, torch fake-quant (simulated; with and without Quark's
torch.compile), ONNX Runtime fp32 and ONNX Runtime with the quantized QDQ graph. Ratios are against
the torch fp32 row, measured in the same process and run."""

from __future__ import annotations

import copy
import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .artifacts import atomic_path, write_json
from .backends.quark.internals import quark_compile
from .errors import DiffquantError

logger = logging.getLogger(__name__)
BENCH_VERSION = 2
DEFAULT_RECIPE = "w8a8-int8-ort"


@dataclass
class BenchRow:
    """One configuration's measurements; times in milliseconds/seconds, sizes in MB."""

    name: str
    simulated: bool
    call_ms_median: float
    call_ms_p90: float
    first_call_s: float
    image_s: float | None
    peak_rss_mb: float
    artifact_mb: float
    speedup: float = 1.0
    size_ratio: float = 1.0


@dataclass
class BenchResult:
    model: str
    batch: int
    latent: list[int]
    iterations: int
    rows: list[BenchRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # ONNX Runtime rows: milliseconds per UNet call by operator type (from ORT's profiler), and the
    # operator counts of the graph ORT actually ran after its fusions.
    profiles: dict[str, dict[str, float]] = field(default_factory=dict)
    optimized_ops: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"type": "BenchResult", "version": BENCH_VERSION, **asdict(self)}

    def table(self) -> str:
        labels = [r.name + (" (simulated)" if r.simulated else "") for r in self.rows]
        width = max([len("configuration")] + [len(label) for label in labels])
        head = (f"{'configuration':<{width}} {'call ms (med)':>13} {'p90':>8} {'x fp32':>7} {'s/image':>8} "
                f"{'first s':>8} {'peak MB':>8} {'size MB':>8} {'x size':>7}")
        lines = [head]
        for label, r in zip(labels, self.rows):
            image = f"{r.image_s:8.2f}" if r.image_s is not None else f"{'n/a':>8}"
            lines.append(f"{label:<{width}} {r.call_ms_median:>13.1f} {r.call_ms_p90:>8.1f} {r.speedup:>7.2f} {image} "
                         f"{r.first_call_s:>8.2f} {r.peak_rss_mb:>8.0f} {r.artifact_mb:>8.1f} {r.size_ratio:>7.2f}")
        return "\n".join(lines + self.profile_lines() + [f"note: {n}" for n in self.notes])

    def profile_lines(self, top: int = 6) -> list[str]:
        """One line per profiled ONNX Runtime row: its most expensive operator types."""
        lines = []
        for name, profile in self.profiles.items():
            ranked = sorted(profile.items(), key=lambda item: -item[1])[:top]
            lines.append(f"profile {name}: " + ", ".join(f"{op} {ms:.0f} ms" for op, ms in ranked))
        return lines

    def plot(self, path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [r.name + ("*" if r.simulated else "") for r in self.rows]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.5))
        left.barh(names, [r.call_ms_median for r in self.rows], color="#4a7")
        left.set_xlabel("denoiser call, median ms (lower is better)")
        right.barh(names, [r.artifact_mb for r in self.rows], color="#47a")
        right.set_xlabel("artifact size, MB")
        right.set_yticks([])
        fig.suptitle(f"{self.model}: batch {self.batch}, latent {self.latent} (* simulated fake-quant)")
        fig.tight_layout()
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        return Path(path)


class _PeakRss:
    """Samples this process's resident memory in a thread; `peak_mb` is the maximum seen."""

    def __init__(self, every_s: float = 0.02):
        import psutil

        self._process, self._every, self.peak_mb = psutil.Process(), every_s, 0.0
        self._stop = threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._process.memory_info().rss / 2**20)
            time.sleep(self._every)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _time_calls(call, warmup: int, iterations: int) -> tuple[float, list[float]]:
    started = time.perf_counter()
    call()
    first = time.perf_counter() - started
    for _ in range(max(warmup - 1, 0)):
        call()
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return first, times


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def build_arch(arch: str):
    """The real denoiser architecture named by `arch` (see architectures.py) from its config, random weights."""
    from .architectures import build

    return build(arch)


def benchmark(model: str | None = None, arch: str | None = None, recipe: str = DEFAULT_RECIPE, iterations: int = 10,
              warmup: int = 2, batch: int = 2, images: int = 2, out: str | Path | None = None,
              fake_quant_compiled: bool = True, profile: bool = True) -> BenchResult:
    """Measure every configuration side by side in this process.

    Args:
        model: a pipeline (None: shapes-sd) whose denoiser is measured, with end-to-end time per image.
        arch: instead of `model`, a real architecture with random weights (denoiser calls only): sd15,
            sd35-medium or flux (the transformers at reduced depth, said in the notes).
        recipe: the quantization recipe of the fake-quant and ORT-quantized rows (activation recipes
            are calibrated on the pipeline's own captured inputs, or on random inputs for `arch`).
        iterations, warmup: timed denoiser calls after the warm-up calls.
        batch: denoiser batch (2 = one image with classifier-free guidance; a fixed-batch family, Flux, uses 1).
        images: images generated for the end-to-end time per image (pipelines only).
        out: folder for the ONNX files, bench.json and bench.png (default: a temporary folder).
        fake_quant_compiled: also time fake-quant through Quark's torch.compile (slow first call).
        profile: after timing, run each ONNX Runtime row once more under ORT's profiler and record the
            time per operator type (where the time goes: which layers run integer kernels).
    """
    import tempfile

    from .calibration import CalibrationConfig, capture_denoiser_inputs, random_calibration
    from .denoisers import denoiser_for, denoiser_of
    from .export import export_fp32_onnx, export_onnx
    from .generation import default_prompts, generate
    from .pipeline import load_pipeline
    from .quantization import quantize_module
    from .recipes import get_recipe
    from .runtimes.onnxruntime import OnnxRuntime, ort_pipeline, profile_operators

    for label, value, least in (("iterations", iterations, 1), ("warmup", warmup, 0), ("batch", batch, 1),
                                ("images", images, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DiffquantError(f"--{label} must be a whole number of at least {least}, got {value!r}")
    recipe = get_recipe(recipe)
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="diffquant-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    if arch:
        from .architectures import ARCHITECTURES

        pipe, module = None, build_arch(arch)
        family, seq = denoiser_for(module), ARCHITECTURES[arch].sequence_length
        name = f"{arch} architecture (random weights, {ARCHITECTURES[arch].depth_note})"
    else:
        pipe = load_pipeline(model, device="cpu")
        family = denoiser_of(pipe)
        module, seq = family.module, family.sequence_length(pipe)
        name = model or "shapes-sd"
    batch = batch if family.dynamic_batch else 1
    inputs = family.example_inputs(batch_size=batch, sequence_length=seq, seed=0)
    result = BenchResult(name, batch, list(next(iter(inputs.values())).shape[1:]), iterations)
    prompts = default_prompts(pipe, images) if pipe is not None else []

    def image_seconds(p) -> float | None:
        if p is None:
            return None
        started = time.perf_counter()
        generate(p, prompts, seed=0, batch_size=len(prompts))
        return (time.perf_counter() - started) / len(prompts)

    def measure(label: str, call, artifact_mb: float, simulated: bool = False, p=None) -> None:
        with _PeakRss() as rss, torch.no_grad():
            first, times = _time_calls(call, warmup, iterations)
            per_image = image_seconds(p)
        result.rows.append(BenchRow(label, simulated, statistics.median(times), _p90(times), first, per_image,
                                    rss.peak_mb, artifact_mb))
        logger.info("%s: %.1f ms median", label, statistics.median(times))

    fp32_mb = sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20
    measure("torch fp32", lambda: family(inputs), fp32_mb, p=pipe)

    if recipe.needs_calibration:
        calibration = (capture_denoiser_inputs(pipe, default_prompts(pipe, 8), CalibrationConfig(size=8, timesteps=4))
                       if pipe is not None else random_calibration(module, 2, seq))
    else:
        calibration = None
    q_module = quantize_module(module, recipe, calibration=calibration)
    q_family = denoiser_for(q_module)
    quantized = None
    if pipe is not None:
        quantized = copy.copy(pipe)
        object.__setattr__(quantized, family.pipeline_attribute, q_module)
    with quark_compile(False):
        measure(f"torch fake-quant {recipe.name}", lambda: q_family(inputs), fp32_mb, True,
                quantized if pipe is not None else None)
    if fake_quant_compiled:
        with quark_compile(True):
            measure(f"torch fake-quant {recipe.name} +compile", lambda: q_family(inputs), fp32_mb, True)

    fp32_onnx = export_fp32_onnx(module, out / "onnx-fp32", inputs=inputs)
    threads = torch.get_num_threads()  # ONNX Runtime rows use the threads torch rows use
    fp32_runner = OnnxRuntime().runner(fp32_onnx, threads)
    measure("ORT fp32", lambda: fp32_runner.run(inputs), _dir_mb(out / "onnx-fp32"),
            p=ort_pipeline(pipe, fp32_onnx, threads=threads) if pipe is not None else None)
    fp32_runner = None  # frees the float session before the quantized export
    # Random weights put many activations on rounding ties, so ORT and torch fake-quant differ by
    # more than on a trained UNet: the error is reported, not enforced, for an architecture.
    q_export = export_onnx(q_module, out / f"onnx-{recipe.name}", inputs=inputs, check=arch is None)
    result.notes.append(f"ORT {recipe.name} vs torch fake-quant on one denoiser call: relative L2 error "
                        f"{q_export.relative_error:.2e}")
    q_runner = OnnxRuntime().runner(q_export.path, threads)
    q_label = f"ORT {recipe.name} (QDQ)"
    measure(q_label, lambda: q_runner.run(inputs), _dir_mb(out / f"onnx-{recipe.name}"),
            p=ort_pipeline(pipe, q_export.path, threads=threads) if pipe is not None else None)
    q_runner = None
    if profile:
        for label, path in (("ORT fp32", fp32_onnx), (q_label, q_export.path)):
            result.profiles[label], result.optimized_ops[label] = profile_operators(path, inputs, out / "profile")

    if arch and ARCHITECTURES[arch].reduced_depth:
        result.notes.append(f"{arch}: real widths and heads, {ARCHITECTURES[arch].depth_note}; a block's time is "
                            "real, the whole model's scales with depth")
    base = result.rows[0]
    for row in result.rows:
        row.speedup = base.call_ms_median / row.call_ms_median
        row.size_ratio = row.artifact_mb / base.artifact_mb
    result.notes.append("fake-quant rows quantize and dequantize in float: simulated, never a real speedup")
    result.notes.append("peak MB is this process's resident memory during the row (it includes earlier rows)")
    write_json(out / "bench.json", result.to_dict())
    result.plot(out / "bench.png")
    return result
