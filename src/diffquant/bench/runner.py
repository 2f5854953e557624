"""Side-by-side benchmark: denoiser-call latency (median, p90 after warm-up), time per image, peak memory
and artifact size for torch fp32 and bf16, torch fake-quant (simulated; with and without Quark's
torch.compile), ONNX Runtime fp32 and with the quantized QDQ graph (both with fused attention), and
OpenVINO f32, bf16 and int8 on the same files. Every real row runs in its own process
(`bench_row`), on the same saved inputs, so its peak memory is its own. Ratios are against the first
row of the run (torch fp32 unless filtered out)."""

from __future__ import annotations

import copy
import importlib.util
import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffquant.bench import row as bench_row
from diffquant.report.tables import markdown
from diffquant.core.artifacts import atomic_path, write_json
from diffquant.quantization.backends import backend_of
from diffquant.core.cpu import decisions, kernel_class, resolve_int4_compute
from diffquant.core.errors import DiffquantError
from diffquant.core.provenance import describe, measured
from diffquant.core.recipes import parse_recipes
from diffquant.core.record import record_of
from diffquant.export.onnx import export_fp32_onnx, export_onnx
from diffquant.models.architectures import build
from diffquant.models.denoisers import denoiser_for, denoiser_of
from diffquant.models.profiles import profile_of
from diffquant.quantization.api import quantize_module
from diffquant.quantization.calibration import calibrate, random_calibration
from diffquant.runtimes import get_runtime

logger = logging.getLogger(__name__)
BENCH_VERSION = 4  # 4: the CPU, its decisions and each row's kernel class
DEFAULT_RECIPE = "w8a8-int8-ort"
RUNTIME_CHOICES = ("torch", "onnxruntime", "openvino")


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
    runtime: str = "torch"
    precision: str = "f32"
    # What really ran (OpenVINO runs bf16 only on CPUs with bf16 instructions) and how peak_rss_mb was
    # measured: "own process" (a row process of its own) or "shared" (in the bench process, with earlier rows).
    runtime_precision: str = "f32"
    memory: str = "own process"
    # The kind of kernel that ran on this CPU (`cpu.kernel_class`): "int8 u8s8 VNNI", "int8 u8u8 exact", "bf16 (AMX)", ...
    kernels: str = "float32"
    # The quantization method of the row's graph, named as `diffquant peers` names it ("diffquant:w8a8-int8-ort",
    # "nncf:int8"), so that its speed meets its fidelity (`report.speed_fidelity`); None for the float rows.
    method: str | None = None


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
    # Peak resident memory of the bench process itself: the exports, calibration and fake-quant rows.
    bench_peak_rss_mb: float = 0.0
    # The CPU every row ran on ('AMD EPYC (AVX2, AVX-512, VNNI, bf16)') and what diffquant chose from it.
    cpu: str = ""
    cpu_decisions: dict = field(default_factory=dict)
    threads: int = 0
    # When and with what it was measured: the date (UTC) and the versions of the libraries that ran the rows.
    measured: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"type": "BenchResult", "version": BENCH_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> BenchResult:
        """A result read back from bench.json (version 4 on: the CPU and kernels are in it)."""
        if data.get("type") != "BenchResult" or data.get("version", 0) < 4:
            raise DiffquantError(f"not a bench.json of version 4 or later (type {data.get('type')!r}, version "
                                 f"{data.get('version')!r}): run `diffquant bench` again")
        fields = {k: v for k, v in data.items() if k not in ("type", "version")}
        fields["rows"] = [BenchRow(**row) for row in fields.get("rows", [])]
        return cls(**fields)

    def markdown(self) -> str:
        """The table as Markdown for docs/, headed by the model, CPU, threads, date and versions."""
        provenance = (self.measured or {}) | {"cpu": self.cpu}
        lines = [f"{self.model}, batch {self.batch}, latent {self.latent}, {self.iterations} timed calls per row, "
                 f"{self.threads_note()}; {describe(provenance)}", ""]
        rows = [[r.name + (" (simulated)" if r.simulated else ""), f"{r.runtime} {r.runtime_precision}", r.kernels,
                 f"{r.call_ms_median:,.1f} ms", f"{r.call_ms_p90:,.1f} ms", f"{r.speedup:.2f}x", f"{r.peak_rss_mb:,.0f} MB",
                 f"{r.artifact_mb:,.1f} MB ({r.size_ratio:.0%})"] for r in self.rows]
        lines.append(markdown(["configuration", "ran", "kernels", "call, median", "p90", "vs first row", "peak RSS",
                               "size"], rows))
        return "\n".join(lines + [""] + [f"- {n}" for n in self.profile_lines() + self.notes])

    def table(self) -> str:
        labels = [r.name + (" (simulated)" if r.simulated else "") for r in self.rows]
        width = max([len("configuration")] + [len(label) for label in labels])
        kinds = max([len("kernels")] + [len(r.kernels) for r in self.rows])
        head = (f"{'configuration':<{width}} {'ran':>16} {'kernels':<{kinds}} {'call ms (med)':>13} {'p90':>8} {'x fp32':>7} {'s/image':>8} "
                f"{'first s':>8} {'peak MB':>8} {'size MB':>8} {'x size':>7}")
        lines = [f"CPU: {self.cpu}, {self.threads_note()}", head]
        for label, r in zip(labels, self.rows):
            image = f"{r.image_s:8.2f}" if r.image_s is not None else f"{'n/a':>8}"
            ran = f"{r.runtime} {r.runtime_precision}"
            lines.append(f"{label:<{width}} {ran:>16} {r.kernels:<{kinds}} {r.call_ms_median:>13.1f} {r.call_ms_p90:>8.1f} {r.speedup:>7.2f} {image} "
                         f"{r.first_call_s:>8.2f} {r.peak_rss_mb:>8.0f} {r.artifact_mb:>8.1f} {r.size_ratio:>7.2f}")
        return "\n".join(lines + self.profile_lines() + [f"note: {n}" for n in self.notes])

    def threads_note(self) -> str:
        return f"{self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else "threads unknown"

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
        fig.suptitle(f"{self.model}: batch {self.batch}, latent {self.latent} (* simulated fake-quant)\n"
                     f"{self.cpu}, {self.threads_note()}")
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


_time_calls, _p90 = bench_row._time_calls, bench_row.p90


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def build_arch(arch: str):
    """The real denoiser architecture named by `arch` (see architectures.py) from its config, random weights."""

    return build(arch)


def _nncf(hybrid: bool):
    def make(fp32_onnx, feeds, out_dir):
        from diffquant.runtimes.openvino.nncf_int8 import nncf_int8

        return nncf_int8(fp32_onnx, feeds, hybrid, out_dir)
    return make


def _ort_static(fp32_onnx, feeds, out_dir):
    from diffquant.runtimes.onnxruntime.static import quantize_static_int8

    return quantize_static_int8(fp32_onnx, feeds, out_dir)


# What a CPU user picks instead of diffquant, as bench rows: name -> (runtime, maker(fp32 onnx, feeds, folder) -> file).
PEER_QUANTIZERS = {"nncf:int8": ("openvino", _nncf(False)), "nncf:int8-hybrid": ("openvino", _nncf(True)),
                   "ort:static-int8": ("onnxruntime", _ort_static)}


def _make_peer(name: str, fp32_onnx: Path, feeds: list[dict], folder: Path) -> Path:
    return PEER_QUANTIZERS[name][1](fp32_onnx, feeds, folder)


def _make_peer_in_own_process(name: str, fp32_onnx: Path, feeds: list[dict], folder: Path) -> Path:
    """A peer's graph made in a fresh process: the quantizers load the whole float graph (and ORT's its augmented
    copy) beside what the bench process holds; at SD 1.5 `quantize_static` alone peaks at 17 GB. A process that
    dies (out of memory) raises here, and the caller notes the peer as not made."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_make_peer, name, fp32_onnx, feeds, folder).result()


def _parse_peers(peers) -> tuple[str, ...]:
    chosen = tuple(p for p in (peers.split(",") if isinstance(peers, str) else peers) if p)
    unknown = [p for p in chosen if p not in PEER_QUANTIZERS]
    if unknown:
        raise DiffquantError(f"unknown peer(s) {', '.join(unknown)}: choose from {', '.join(PEER_QUANTIZERS)} "
                             "(comma-separated)")
    if any(p.startswith("nncf") for p in chosen) and importlib.util.find_spec("nncf") is None:
        raise DiffquantError("the nncf peers need NNCF: pip install nncf (or diffquant's extra: pip install -e "
                             "'.[peers]')")
    return chosen


def _parse_runtimes(runtimes) -> tuple[str, ...]:
    if runtimes is None:
        return RUNTIME_CHOICES
    chosen = tuple(runtimes.split(",") if isinstance(runtimes, str) else runtimes)
    unknown = [r for r in chosen if r not in RUNTIME_CHOICES]
    if unknown or not chosen:
        raise DiffquantError(f"unknown runtime(s) {', '.join(unknown) or '(none)'}: choose from "
                             f"{', '.join(RUNTIME_CHOICES)} (comma-separated)")
    if "openvino" in chosen:
        from diffquant.runtimes.openvino.runtime import import_openvino

        import_openvino()
    return chosen


def _release_freed_memory() -> None:
    """Collect garbage and hand the freed heap back to the OS. Without the second step glibc keeps the
    gigabytes of a freed denoiser mapped, and this process's resident memory (which the next
    recipe's fresh denoiser and the profiling sessions add to) never comes down. Hand-written because
    no library wraps glibc's `malloc_trim`; a no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RowFailed(DiffquantError):
    """A row's process failed; `last_line` is the last line it printed (the error)."""

    def __init__(self, message: str, last_line: str):
        super().__init__(message)
        self.last_line = last_line


def _run_in_own_process(spec: bench_row.RowSpec, spec_path: Path) -> dict:
    """Run one row as `python -m diffquant.bench.row` and read its JSON line; a failure surfaces."""
    import json
    import subprocess
    import sys

    spec_path.write_text(spec.to_json())
    done = subprocess.run([sys.executable, "-m", "diffquant.bench.row", str(spec_path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RowFailed(f"bench row {spec.runtime} {spec.precision} failed: {done.stderr.strip()[-2000:]}",
                        (done.stderr.strip().splitlines() or ["(no output)"])[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark(model: str | None = None, arch: str | None = None, recipe: str | tuple[str, ...] = DEFAULT_RECIPE,
              iterations: int = 10, warmup: int = 2, batch: int = 2, images: int = 2, out: str | Path | None = None,
              fake_quant_compiled: bool = True, profile: bool = True,
              runtimes: str | tuple[str, ...] | None = None, int4_compute: str = "float",
              peers: str | tuple[str, ...] = (), height: int | None = None,
              width: int | None = None, frames: int | None = None) -> BenchResult:
    """Measure every configuration side by side, each real row in its own process on the same inputs.

    Args:
        model: a pipeline (None: shapes-sd) whose denoiser is measured, with end-to-end time per image.
        arch: instead of `model`, a real architecture with random weights (denoiser calls only): sd15,
            sd35-medium or flux (the transformers at reduced depth, said in the notes).
        recipe: the quantization recipe(s) of the fake-quant and quantized rows, several comma-separated
            (e.g. an 8-bit and a 4-bit one side by side); activation recipes are calibrated on the
            pipeline's own calibration captions (not its evaluation prompts), or on random inputs for `arch`.
        iterations, warmup: timed denoiser calls after the warm-up calls.
        batch: denoiser batch (2 = one image with classifier-free guidance; a fixed-batch family, Flux, uses 1).
        images: images generated for the end-to-end time per image (pipelines only).
        out: folder for the ONNX files, bench.json and bench.png (default: a temporary folder).
        fake_quant_compiled: also time fake-quant through Quark's torch.compile (slow first call).
        profile: after timing, run each ONNX Runtime row and the OpenVINO int8 row once more under
            their profilers and record the time per operator type and the kernels that ran.
        runtimes: the rows to run by runtime, a subset of `RUNTIME_CHOICES` (default: all).
        int4_compute: how ONNX Runtime multiplies a 4-bit recipe's Linears, "float" or "int8" (see
            `export_onnx`); OpenVINO reads the same graph and chooses its own kernels.
        peers: the 8-bit quantizers a CPU user picks instead (`PEER_QUANTIZERS`: nncf:int8, nncf:int8-hybrid in
            OpenVINO, ort:static-int8 in ONNX Runtime), each made from the same fp32 export and calibration as the
            recipes' rows and measured as a row of its runtime.
        height, width: the image size in pixels the denoiser inputs (and a model's calibration and end-to-end
            images) stand for, both or neither (default: the model's or architecture's own).
        frames: a video model's frames per clip the inputs stand for (default: its profile's for a model; 9 for an
            architecture), 1 + a multiple of its VAE's temporal step; refused for an image model.

    The OpenVINO rows read the file written for ONNX Runtime (one export per recipe): OpenVINO compiles it to
    the same int8 kernels as the plain QDQ file `export_onnx(runtime="openvino")` writes
    (tests/test_openvino.py checks the counts and outputs agree).
    """
    import tempfile

    for label, value, least in (("iterations", iterations, 1), ("warmup", warmup, 0), ("batch", batch, 1),
                                ("images", images, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DiffquantError(f"--{label} must be a whole number of at least {least}, got {value!r}")
    if (height is None) != (width is None):
        raise DiffquantError("pass both --height and --width (the image size the denoiser inputs stand for), or "
                             "neither for the model's own")
    chosen = _parse_runtimes(runtimes)
    recipes = parse_recipes(list(recipe) if isinstance(recipe, tuple) else recipe)
    peers = _parse_peers(peers)
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="diffquant-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    bench = _Bench(model, arch, iterations, warmup, batch, images, out, chosen, resolve_int4_compute(int4_compute),
                   (height, width) if height is not None else None, frames)
    bench.float_rows()
    graphs = bench.quantized_graphs(recipes, fake_quant_compiled, peers)
    profiled = bench.runtime_rows(graphs)
    profiled += bench.peer_rows()
    if profile:
        bench.profile(profiled)
    return bench.finish()


class _Bench:
    """One benchmark run: the denoiser and its saved inputs, the rows measured so far, and how each row is
    measured (its own process, or in this one for the simulated fake-quant rows)."""

    def __init__(self, model: str | None, arch: str | None, iterations: int, warmup: int, batch: int, images: int,
                 out: Path, chosen: tuple[str, ...], int4_compute: str,
                 size: tuple[int, int] | None = None, frames: int | None = None) -> None:
        from safetensors.torch import save_file

        from diffquant.models.pipeline import load_pipeline

        self.model, self.arch, self.out, self.chosen, self.int4_compute = model, arch, out, chosen, int4_compute
        self.iterations, self.warmup, self.images = iterations, warmup, images
        self.decided = decisions()  # every row process inherits the environment, so decides the same
        if arch:
            from diffquant.models.architectures import ARCHITECTURES

            self.pipe, self.module = None, build_arch(arch)
            family, seq = denoiser_for(self.module), ARCHITECTURES[arch].sequence_length
            name = f"{arch} architecture (random weights, {ARCHITECTURES[arch].depth_note})"
            self.arch_spec = (ARCHITECTURES[arch].module_class, ARCHITECTURES[arch].build_config())
        else:
            self.pipe = load_pipeline(model, device="cpu")
            family = denoiser_of(self.pipe)
            self.module, seq = family.module, family.sequence_length(self.pipe)
            name = model or "shapes-sd"
            self.arch_spec = (None, None)
        self.sequence_length, self.size, self.frames = seq, size, frames
        batch = batch if family.dynamic_batch else 1
        self.latent = self._latent(family, size)
        self.clip = {} if frames is None else {"latent_frames": family.latent_frames(self.pipe, frames)}
        self.inputs = family.example_inputs(batch_size=batch, sequence_length=seq, seed=0, latent=self.latent,
                                            **self.clip)
        self.inputs_path = out / "inputs.safetensors"
        save_file({k: v.contiguous() for k, v in self.inputs.items()}, str(self.inputs_path))
        self.threads = torch.get_num_threads()  # every row uses the threads of this process
        self.result = BenchResult(name, batch, list(next(iter(self.inputs.values())).shape[1:]), iterations,
                                  cpu=self.decided.cpu.describe(), cpu_decisions=self.decided.to_dict(),
                                  threads=self.threads, measured=measured())
        self.fp32_mb = sum(p.numel() * p.element_size() for p in self.module.parameters()) / 2**20
        self.attribute = family.pipeline_attribute  # the family holds the module, quantized in place later
        self.prompts = []
        if self.pipe is not None:
            from diffquant.models.generation import default_prompts

            self.prompts = default_prompts(self.pipe, images)

    def _latent(self, family, size: tuple[int, int] | None) -> tuple[int, int] | None:
        """The latent (height, width) of an image `size` in pixels; refuses a size the model cannot make."""
        if size is None:
            return None
        if self.pipe is not None:
            from diffquant.models.generation import pipeline_kwargs

            pipeline_kwargs(self.pipe, height=size[0], width=size[1])
            scale = getattr(self.pipe, "vae_scale_factor", getattr(self.pipe, "vae_scale_factor_spatial", 8))
        else:  # an architecture: the real models' VAEs downscale by 8
            scale, step = 8, 8 * family.latent_patch()
            wrong = [f"{n} {v}" for n, v in zip(("height", "width"), size) if isinstance(v, bool) or v < 1 or v % step]
            if wrong:
                raise DiffquantError(f"{' and '.join(wrong)}: the {self.arch} architecture takes multiples of {step} "
                                     f"pixels, e.g. 512, 768, 1024")
        return size[0] // scale, size[1] // scale

    def own_process(self, label: str, runtime: str, precision: str, path: Path | None, artifact_mb: float,
                    weights: str | None = None, method: str | None = None) -> bool:
        """Measure one row in a process of its own. `precision`: the float precision the row runs in;
        `weights`: the row's precision when its graph holds quantized weights (a QDQ graph in OpenVINO runs
        int8 kernels whatever its float precision). Returns whether the row was measured."""
        spec = bench_row.RowSpec(runtime, precision, str(self.inputs_path), self.iterations, self.warmup,
                                 self.threads, str(path) if path else None, None if self.arch else self.model,
                                 self.arch, 0 if self.arch else self.images, *self.arch_spec,
                                 *(self.size or (None, None)), self.frames)
        try:
            measured = _run_in_own_process(spec, self.out / "row-spec.json")
        except RowFailed as error:  # the other rows still count: the table says which one is missing and why
            logger.warning("%s", error)
            self.result.notes.append(f"{label}: not measured, its process failed: {error.last_line}")
            return False
        self.result.rows.append(BenchRow(
            label, False, measured["call_ms_median"], measured["call_ms_p90"], measured["first_call_s"],
            measured["image_s"], measured["peak_rss_mb"], artifact_mb, runtime=runtime, precision=weights or precision,
            runtime_precision=measured["runtime_precision"],
            kernels=kernel_class(runtime, weights or precision, measured["runtime_precision"], self.decided,
                                 self.int4_compute), method=method))
        logger.info("%s: %.1f ms median, peak %.0f MB", label, measured["call_ms_median"], measured["peak_rss_mb"])
        return True

    def fake_quant(self, label: str, q_module: torch.nn.Module, pipe=None) -> None:
        """A simulated row, timed in this process: the fake-quantized module (and its pipeline, per image)."""

        q_family = denoiser_for(q_module)
        with _PeakRss() as rss, torch.no_grad():
            first, times = _time_calls(lambda: q_family(self.inputs), self.warmup, self.iterations)
            per_image = bench_row.seconds_per_image(pipe, self.prompts, *(self.size or (None, None)), self.frames) \
                if pipe is not None else None
        self.result.rows.append(BenchRow(label, True, statistics.median(times), _p90(times), first, per_image,
                                         rss.peak_mb, self.fp32_mb, memory="shared"))

    def float_rows(self) -> None:
        """torch fp32 (and bf16 where the CPU has it), each in its own process."""
        if "torch" in self.chosen:
            self.own_process("torch fp32", "torch", "f32", None, self.fp32_mb)
            if self.decided.measure_bf16:
                self.own_process("torch bf16", "torch", "bf16", None, self.fp32_mb / 2)

    def _calibration(self, recipes, force: bool = False) -> list[dict] | None:
        """Denoiser inputs for activation recipes (and peers, `force`): the model's own calibration captions
        (drawn apart from its evaluation prompts), its default prompts where it has none, random inputs for an
        architecture."""
        if not force and not any(r.needs_calibration for r in recipes):
            return None

        if self.pipe is None:
            return random_calibration(self.module, 2, self.sequence_length, latent=self.latent, **self.clip)

        shapes = profile_of(self.pipe).prompt_source == "shapes"
        return calibrate(self.pipe, None if shapes else self.prompts, size=8, timesteps=4,
                         frames=self.frames, **dict(zip(("height", "width"), self.size or (None, None))))

    def _float_denoiser(self):
        """A fresh float pipeline (None for an architecture) and denoiser, as the bench started with."""
        from diffquant.models.pipeline import load_pipeline

        if self.arch:
            return None, build_arch(self.arch)
        fresh = load_pipeline(self.model, device="cpu")
        return fresh, denoiser_of(fresh).module

    def quantized_graphs(self, recipes, fake_quant_compiled: bool, peers: tuple[str, ...] = ()) -> list[tuple]:
        """Export the float denoiser, make the `peers`' graphs of it, then quantize each recipe (timing its
        fake-quant rows) and export it.

        Returns (fp32 file, [(recipe, graph form, weight precision, file, MB)]) of the graphs to measure."""

        calibration = self._calibration(recipes, force=bool(peers))
        self.fp32_onnx = export_fp32_onnx(self.module, self.out / "onnx-fp32", inputs=self.inputs)
        family = denoiser_for(self.module)
        flats = [family.first_sample(family.graph_inputs(record)) for record in calibration] if peers else []
        family = None  # it holds the module
        if peers:
            # The peers' quantizers run in processes of their own and load the whole float graph (ONNX Runtime's
            # quantize_static peaked at 17 GB at SD 1.5): this process lets go of its float denoiser meanwhile
            # and builds it again for the recipes (from the same folder, or the same seeded config).
            self.pipe = self.module = None
        _release_freed_memory()  # the float export's copy of the weights
        self.peer_graphs = []
        for name in peers:
            try:
                self.peer_graphs.append((name, *self._peer_graph(name, flats)))
            except Exception as error:  # the other rows still count: the table's notes say which peer is missing
                logger.warning("peer %s: %s", name, error)
                self.result.notes.append(f"{name}: not made, its quantizer failed: "
                                         f"{' '.join(str(error).split())[:300]}")
            _release_freed_memory()
        pipe, module = self.pipe, self.module
        self.pipe = self.module = None
        exports = {}
        for index, recipe in enumerate(recipes):
            if index or module is None:  # the previous recipe (or none) quantized the float module: start afresh
                _release_freed_memory()
                pipe, module = self._float_denoiser()
            # In place: every float row runs in its own process, so this one never holds a float and a
            # quantized denoiser at once.
            # A model's graphs keep the layers its profile measured float for the recipe, as `diffquant run` and
            # `diffquant peers` quantize it: the speed of a row is the speed of the graph whose fidelity is reported.
            rule = profile_of(pipe).keep_float_for(recipe.name) if pipe is not None else None
            q_module = quantize_module(module, recipe, in_place=True, profile_rule=rule,
                                       calibration=calibration if recipe.needs_calibration else None)
            if rule is not None:
                plan = record_of(q_module).plan
                kept = plan.counts()["float"] if plan is not None else 0
                self.result.notes.append(f"{recipe.name}: {kept} layers stay float, as the model profile measured "
                                         f"({rule.reason})")
            if "torch" in self.chosen:
                quantized = None
                if pipe is not None:
                    quantized = copy.copy(pipe)
                    object.__setattr__(quantized, self.attribute, q_module)
                with backend_of(q_module).compiled_fake_quant(False):
                    self.fake_quant(f"torch fake-quant {recipe.name}", q_module, quantized)
                if fake_quant_compiled:
                    with backend_of(q_module).compiled_fake_quant(True):
                        self.fake_quant(f"torch fake-quant {recipe.name} +compile", q_module)
            # Random weights put many activations on rounding ties, so ORT and torch fake-quant differ by
            # more than on a trained UNet: the error is reported, not enforced, for an architecture.
            exported = export_onnx(q_module, self.out / f"onnx-{recipe.name}", inputs=self.inputs,
                                   check=self.arch is None, int4_compute=self.int4_compute)
            self.result.notes.append(
                f"ORT {recipe.name} vs torch fake-quant on one denoiser call: relative L2 error "
                f"{exported.relative_error:.2e}; attentions fused into MultiHeadAttention: "
                f"{exported.fusion.get('fused_attention', 0)}")
            exports[recipe.name] = exported
            pipe = module = q_module = quantized = None
        calibration = None
        _release_freed_memory()
        # 4-bit Linears are com.microsoft.MatMulNBits nodes (OpenVINO reads them as int4 weight decompression),
        # 8-bit weights QDQ pairs.
        nbits = "MatMulNBits" + (", int8 compute" if self.int4_compute == "int8" else "")
        return [(r.name, *((nbits, "int4") if r.four_bit else ("QDQ", "int8")), exports[r.name].path,
                 _dir_mb(exports[r.name].path.parent)) for r in recipes]

    def runtime_rows(self, graphs: list[tuple]) -> list[tuple]:
        """ONNX Runtime and OpenVINO rows of the fp32 graph and each quantized graph; returns (label, runtime,
        file) of the rows to profile."""
        fp32_mb = _dir_mb(self.out / "onnx-fp32")
        measure_bf16 = self.decided.measure_bf16
        profiled = []
        if "onnxruntime" in self.chosen:
            if self.own_process("ORT fp32", "onnxruntime", "f32", self.fp32_onnx, fp32_mb):
                profiled.append(("ORT fp32", "onnxruntime", self.fp32_onnx))
            for name, form, weights, path, q_mb in graphs:
                if self.own_process(label := f"ORT {name} ({form})", "onnxruntime", weights, path, q_mb,
                                    method=f"diffquant:{name}"):
                    profiled.append((label, "onnxruntime", path))
        if "openvino" in self.chosen:
            self.own_process("OpenVINO f32", "openvino", "f32", self.fp32_onnx, fp32_mb)
            if measure_bf16:
                self.own_process("OpenVINO bf16", "openvino", "bf16", self.fp32_onnx, fp32_mb)
            for name, form, weights, path, q_mb in graphs:
                if self.own_process(label := f"OpenVINO {name} ({form})", "openvino", "f32", path, q_mb,
                                    weights=weights, method=f"diffquant:{name}"):
                    profiled.append((label, "openvino", path))
                # What an AMX user would run: integer kernels for the quantized layers, bf16 for what stays
                # float (attention, norms); OpenVINO falls back to f32 where the CPU has no bf16 (runtime_precision).
                if measure_bf16:
                    self.own_process(f"OpenVINO {name} ({form}, bf16 float parts)", "openvino", "bf16", path, q_mb,
                                     weights=weights, method=f"diffquant:{name}")
        return profiled

    def _peer_graph(self, name: str, flats: list[dict]) -> tuple[str, Path, float]:
        """(runtime, file, MB) of a peer's int8 graph made from the fp32 export, calibrated on the calibration calls
        `flats` (the graph's inputs, one dict per call)."""
        runtime, make = PEER_QUANTIZERS[name]
        runner = get_runtime(runtime).runner(self.fp32_onnx)
        feeds = [runner.feed(flat) for flat in flats]
        runner = None
        folder = self.out / f"peer-{name.replace(':', '-')}"
        path = _make_peer_in_own_process(name, self.fp32_onnx, feeds, folder)
        return runtime, path, _dir_mb(path.parent)

    def peer_rows(self) -> list[tuple]:
        """The peers' rows, each in its runtime (int8 weights and activations); returns the rows to profile."""
        profiled = []
        for name, runtime, path, mb in getattr(self, "peer_graphs", []):
            if runtime not in self.chosen:
                continue
            label = f"{get_runtime(runtime).short_name} {name}"
            # as the recipes' rows: ONNX Runtime's row precision is its weights', OpenVINO's its float parts'
            precision = "int8" if runtime == "onnxruntime" else "f32"
            if self.own_process(label, runtime, precision, path, mb, weights="int8", method=name):
                profiled.append((label, runtime, path))
        return profiled

    def profile(self, profiled: list[tuple]) -> None:
        for label, runtime, path in profiled:
            self.result.profiles[label], self.result.optimized_ops[label] = get_runtime(runtime).profile(
                path, self.inputs, self.out / "profile")

    def finish(self) -> BenchResult:
        """Ratios against the first row, the notes, bench.json and bench.png."""
        result, decided = self.result, self.decided
        if self.arch:
            from diffquant.models.architectures import ARCHITECTURES

            if ARCHITECTURES[self.arch].reduced_depth:
                result.notes.append(f"{self.arch}: real widths and heads, {ARCHITECTURES[self.arch].depth_note}; a "
                                    "block's time is real, the whole model's scales with depth")
        if not result.rows:
            raise DiffquantError("no row could be measured: " + "; ".join(result.notes))
        base = result.rows[0]
        for row in result.rows:
            row.speedup = base.call_ms_median / row.call_ms_median
            row.size_ratio = row.artifact_mb / base.artifact_mb
        if not decided.measure_bf16:
            result.notes.append(f"bf16 rows not measured: {decided.bench_bf16.reason} (DIFFQUANT_BENCH_BF16=1 "
                                "measures them anyway)")
        for row in result.rows:
            if row.precision == "bf16" and row.runtime_precision != "bf16":
                result.notes.append(f"{row.name}: bf16 was asked, this CPU has no bf16 instructions and it ran "
                                    f"{row.runtime_precision}")
        result.notes.append("fake-quant rows quantize and dequantize in float: simulated, never a real speedup")
        result.notes.append("peak MB: each real row ran in its own process (its own peak resident memory); the "
                            "simulated fake-quant rows ran in the bench process (with what it held)")
        result.bench_peak_rss_mb = bench_row.peak_rss_mb()
        result.notes.append(f"the bench process itself (exports, calibration, fake-quant rows) peaked at "
                            f"{result.bench_peak_rss_mb:.0f} MB")
        write_json(self.out / "bench.json", result.to_dict())
        result.plot(self.out / "bench.png")
        return result
