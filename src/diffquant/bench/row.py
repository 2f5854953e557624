"""One benchmark row in its own process, so that its peak resident memory is its own:

    python -m diffquant.bench.row SPEC.json      # prints one JSON line: the row's measurements

The spec says what to run (`torch` with a dtype, or a registered runtime with a graph and a precision),
on which saved inputs, how often, and (for a pipeline) how many images to time end to end."""

from __future__ import annotations

import contextlib
import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class RowSpec:
    """What one row runs: `runtime` "torch" (the float module, `precision` "f32" or "bf16") or a runtime
    name with the ONNX file `path` and its `precision`; `inputs` is a safetensors file of flat inputs."""

    runtime: str
    precision: str
    inputs: str
    iterations: int
    warmup: int
    threads: int
    path: str | None = None
    model: str | None = None
    arch: str | None = None
    images: int = 0
    arch_class: str | None = None  # an architecture's diffusers class and config (random weights, seed 0)
    arch_config: dict | None = None
    height: int | None = None  # the image size of the end-to-end images (None: the model's)
    width: int | None = None
    frames: int | None = None  # a video model's frames per clip of the end-to-end clips

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _time_calls(call, warmup: int, iterations: int) -> tuple[float, list[float]]:
    """(first call in seconds, the timed calls in milliseconds after `warmup` calls in all)."""
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


def seconds_per_image(pipe, prompts: list[str], height: int | None = None, width: int | None = None,
                      frames: int | None = None) -> float:
    """Wall seconds per image (a video model's clip) of one batch of `prompts` through `pipe` (seed 0)."""
    from diffquant.models.generation import generate

    started = time.perf_counter()
    generate(pipe, prompts, seed=0, batch_size=len(prompts), height=height, width=width, frames=frames)
    return (time.perf_counter() - started) / len(prompts)


def p90(values: list[float]) -> float:
    """The 90th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB. On Linux VmHWM: getrusage's ru_maxrss survives fork
    and exec, so a row process started by a bench that had peaked at 21 GB would report 21 GB too."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def _torch_module(spec: RowSpec):
    if spec.arch:
        import diffusers

        torch.manual_seed(0)  # the weights architectures.build gives the bench process
        return None, getattr(diffusers, spec.arch_class).from_config(spec.arch_config).eval()
    from diffquant.models.denoisers import denoiser_of
    from diffquant.models.pipeline import load_pipeline

    pipe = load_pipeline(spec.model, device="cpu")
    return pipe, denoiser_of(pipe).module


def run_row(spec: RowSpec) -> dict:
    """Measure the row described by `spec` in this process: call latency, first call, time per image
    (pipelines), peak resident memory of the process, and what precision really ran."""
    from safetensors.torch import load_file

    from diffquant.models.denoisers import denoiser_for
    from diffquant.runtimes import get_runtime

    torch.set_num_threads(spec.threads)
    inputs = load_file(spec.inputs)
    pipe = timed_pipe = None
    runtime_precision = spec.precision
    autocast = contextlib.nullcontext()
    if spec.runtime == "torch":
        pipe, module = _torch_module(spec)
        if spec.precision == "bf16":
            module.to(torch.bfloat16)
            inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
        family = denoiser_for(module)
        # Autocast casts what diffusers computes in float32 on the way (the timestep embedding) for the
        # bf16 weights; with f32 it is off.
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.precision == "bf16")

        def call():
            with autocast:
                return family(inputs)

        timed_pipe = pipe
    else:
        runtime = (get_runtime("openvino").__class__(spec.precision) if spec.runtime == "openvino"
                   else get_runtime(spec.runtime))
        runner = runtime.runner(spec.path, spec.threads)
        runtime_precision = getattr(runner, "runtime_precision", spec.precision)
        feed = runner.feed(inputs)

        def call():
            return runner(feed)

        if spec.images and (spec.model is not None or not spec.arch):
            from diffquant.models.pipeline import load_pipeline

            pipe = load_pipeline(spec.model, device="cpu")
            timed_pipe = runtime.pipeline(pipe, spec.path, spec.threads)
    with torch.no_grad():
        first, times = _time_calls(call, spec.warmup, spec.iterations)
        image_s = None
        if timed_pipe is not None and spec.images:
            from diffquant.models.generation import default_prompts

            with autocast:
                image_s = seconds_per_image(timed_pipe, default_prompts(pipe, spec.images), spec.height, spec.width,
                                            spec.frames)
    peak_mb = peak_rss_mb()
    return {"call_ms_median": statistics.median(times), "call_ms_p90": p90(times), "first_call_s": first,
            "image_s": image_s, "peak_rss_mb": peak_mb, "runtime_precision": runtime_precision}


def main(argv: list[str] | None = None) -> int:
    import logging
    import os

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("QUARK_DISABLE_COMPILE", "1")
    argv = sys.argv[1:] if argv is None else argv
    spec = RowSpec(**json.loads(Path(argv[0]).read_text()))
    print(json.dumps(run_row(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
