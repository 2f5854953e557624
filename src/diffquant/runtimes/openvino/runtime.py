"""OpenVINO as a diffquant runtime. It reads the exported ONNX file directly: a QDQ graph goes through
its low-precision transformations (QuantizeLinear/DequantizeLinear become FakeQuantize and int8
weights), so quantized Convolutions and Linears run int8 kernels; com.microsoft.MultiHeadAttention is
read as attention. `precision` is the float precision it may use: "f32" is forced with
INFERENCE_PRECISION_HINT (on AMX/AVX512-BF16 CPUs OpenVINO otherwise runs "fp32" models in bf16), and
"bf16" asks for bf16, which OpenVINO honours only where the CPU has bf16 instructions (the row says
what it ran: `runtime_precision`).

openvino is an optional dependency (`pip install 'diffquant[openvino]'`)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from diffquant.core.errors import DiffquantError
from diffquant.runtimes.base import GraphRunner, Runtime, register

PRECISIONS = ("f32", "bf16")
# Runtime-model layer types that do the arithmetic: their precision says whether int8 kernels run.
COMPUTE_LAYERS = ("Convolution", "FullyConnected", "MatMul", "Deconvolution", "ScaledDotProductAttention",
                  "Subgraph", "GroupConvolution")


def import_openvino():
    """The openvino module, or one line saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise DiffquantError("OpenVINO is not installed: pip install 'diffquant[openvino]' "
                             "(or pip install openvino)") from None
    return openvino


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise DiffquantError(f"unknown OpenVINO precision {precision!r}: use one of {', '.join(PRECISIONS)}")


def _numpy_dtype(element_type) -> np.dtype:
    return np.dtype(element_type.to_dtype())


class OvRunner(GraphRunner):
    """A graph compiled by OpenVINO for the CPU, with one infer request reused for every call."""

    def __init__(self, path: str | Path, threads: int | None = None, precision: str = "f32",
                 profiling: bool = False):
        ov = import_openvino()
        path = Path(path)
        if not path.is_file():
            raise DiffquantError(f"no ONNX file at {path}: export one with `diffquant export` or `run`")
        _check_precision(precision)
        core = ov.Core()
        model = core.read_model(str(path))
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": profiling}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(model, "CPU", config)
        del model  # the compiled model holds its own copy of the weights
        self.request = self.compiled.create_infer_request()
        # Keyed by each Parameter's own name, the ONNX graph input's: a port also takes the names of the no-op Casts
        # OpenVINO folds into it (FLUX.1's timestep and guidance), and `get_any_name` may answer one of those.
        self.inputs = {port.get_node().get_friendly_name(): (_numpy_dtype(port.get_element_type()),
                                             tuple(d.get_length() if d.is_static else None
                                                   for d in port.get_partial_shape()))
                       for port in self.compiled.inputs}

    @property
    def runtime_precision(self) -> str:
        """The float precision OpenVINO chose for this CPU (f32 where bf16 was asked but is not supported)."""
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        self.request.infer(feed)
        return self.request.get_output_tensor(0).data.copy()

    def kernel_precisions(self) -> dict[str, int]:
        """'<layer type> <precision>' -> how many such layers of the runtime model (compute layers only)."""
        counts = Counter()
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            layer = info["layerType"].astype(str)
            if layer.startswith(COMPUTE_LAYERS):
                counts[f"{layer} {info['runtimePrecision'].astype(str)}"] += 1
        return dict(counts.most_common())


def kernel_precisions(path: str | Path, precision: str = "f32") -> dict[str, int]:
    """How many compute layers OpenVINO runs in each precision ('Convolution u8', 'FullyConnected i8',
    'FullyConnected f32', ...) for the ONNX file at `path`: int8 kernels show as i8/u8."""
    return OvRunner(path, precision=precision).kernel_precisions()


@register
class OpenVino(Runtime):
    """OpenVINO on CPU with a forced float precision ("f32" or "bf16"); QDQ graphs run int8 kernels."""

    name = "openvino"
    tag, short_name, title = "openvino", "OpenVINO", "OpenVINO"

    def __init__(self, precision: str | None = None):
        """`precision`: None follows `cpu.decisions()` (DIFFQUANT_OPENVINO_PRECISION, else f32)."""
        if precision is None:
            from diffquant.core.cpu import decisions

            precision = decisions().openvino_precision.value
        _check_precision(precision)
        self.precision = precision

    def runner(self, path, threads=None) -> OvRunner:
        return OvRunner(path, threads, self.precision)

    def optimized_ops(self, path) -> dict[str, int]:
        """The compute layers of OpenVINO's runtime model by type and precision (see `kernel_precisions`)."""
        return kernel_precisions(path, self.precision)

    def profile(self, path, inputs, out_dir, runs: int = 1) -> tuple[dict[str, float], dict[str, int]]:
        """Milliseconds per call by executed layer type, from OpenVINO's per-layer counters (`out_dir`
        receives nothing: OpenVINO keeps them in memory)."""
        runner = OvRunner(path, precision=self.precision, profiling=True)
        feed = runner.feed(inputs)
        runner(feed)
        per_op = defaultdict(float)
        for _ in range(runs):
            runner(feed)
            for info in runner.request.get_profiling_info():
                per_op[info.node_type] += info.real_time.total_seconds() * 1000 / runs
        return dict(sorted(per_op.items(), key=lambda item: -item[1])), runner.kernel_precisions()


def openvino_pipeline(pipe, onnx_path: str | Path, precision: str = "f32", threads: int | None = None):
    """A shallow copy of `pipe` whose denoiser is `onnx_path` compiled by OpenVINO (see `OpenVino`)."""
    return OpenVino(precision).pipeline(pipe, onnx_path, threads)
