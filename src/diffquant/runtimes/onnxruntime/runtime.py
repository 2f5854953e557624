"""ONNX Runtime as a diffquant runtime: the exported denoiser in a session, inside a diffusers pipeline,
profiled, and the operators it really runs after its QDQ fusions counted."""

from __future__ import annotations

import json
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from diffquant.passes.qdq_fusion import prepare_for_ort_fusion
from diffquant.runtimes.base import GraphRunner, Runtime, register
from diffquant.runtimes.onnxruntime.session import session

# ONNX Runtime's input types as numpy dtypes (the types an exported denoiser takes).
_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class OrtRunner(GraphRunner):
    """A graph in an ONNX Runtime session (see `session` for the options)."""

    def __init__(self, path: str | Path, threads: int | None = None, providers=None, options=None):
        self.session = session(path, providers, threads, options)
        self.inputs = {i.name: (np.dtype(_NUMPY.get(i.type, np.float32)),
                                tuple(d if isinstance(d, int) else None for d in i.shape))
                       for i in self.session.get_inputs()}

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, feed)[0]


def _optimized_model_options(out_dir: Path, stem: str):
    """Session options that make ONNX Runtime write the graph it runs (after its fusions) to `out_dir`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(out_dir / f"{stem}.optimized.onnx")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     f"{stem}.optimized.onnx.data")
    return options


def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(Counter(node.op_type for node in graph.node).most_common())


@register
class OnnxRuntime(Runtime):
    """ONNX Runtime on CPU (the default providers), with all graph optimizations: Quark's QDQ graphs run
    on integer kernels (MatMulIntegerToFloat, QLinearConv, ...) where the rewrites of `rewrites` let
    its fusions see them."""

    name = "onnxruntime"
    tag, short_name, title = "ort", "ORT", "ONNX Runtime"

    def __init__(self, providers: list[str] | tuple[str, ...] | None = None):
        self.providers = providers

    def runner(self, path, threads=None) -> OrtRunner:
        return OrtRunner(path, threads, self.providers)

    def prepare_graph(self, model, fuse_attention: bool = True) -> dict:
        """ONNX Runtime fuses QDQ into integer kernels only in the shapes its fusions expect
        (`diffquant.passes.qdq_fusion`), and runs attention fastest as one MultiHeadAttention."""
        return prepare_for_ort_fusion(model, fuse_attention).to_dict()

    def optimized_ops(self, path) -> dict[str, int]:
        stem = Path(path).stem
        with tempfile.TemporaryDirectory(prefix="diffquant-ort-") as tmp:
            OrtRunner(path, providers=self.providers, options=_optimized_model_options(Path(tmp), stem))
            return _op_counts(Path(tmp) / f"{stem}.optimized.onnx")

    def profile(self, path, inputs, out_dir, runs: int = 1) -> tuple[dict[str, float], dict[str, int]]:
        """A QLinearConv or MatMulIntegerToFloat is an integer kernel; a Conv or MatMul left beside
        DequantizeLinear nodes ran in float."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = Path(path).parent.name
        options = _optimized_model_options(out_dir, stem)
        options.enable_profiling = True
        options.profile_file_prefix = str(out_dir / stem)
        profiled = OrtRunner(path, providers=self.providers, options=options)
        feed = profiled.feed(inputs)
        for _ in range(runs + 1):
            profiled(feed)
        events = json.loads(Path(profiled.session.end_profiling()).read_text())
        # The first call includes one-time allocations: count only the nodes of the calls after it.
        first_run = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
        warm_from = first_run["ts"] + first_run["dur"]
        per_op = defaultdict(float)
        for event in events:
            if (event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")
                    and event["ts"] >= warm_from):
                per_op[event["args"]["op_name"]] += event["dur"] / 1000 / runs
        return dict(sorted(per_op.items(), key=lambda item: -item[1])), _op_counts(out_dir / f"{stem}.optimized.onnx")


def ort_pipeline(pipe, onnx_path: str | Path, providers=None, threads: int | None = None):
    """A shallow copy of `pipe` whose denoiser runs `onnx_path` in ONNX Runtime (CPU by default; pass
    ["CUDAExecutionProvider"] or ["ROCMExecutionProvider"] on a GPU build of onnxruntime)."""
    return OnnxRuntime(providers).pipeline(pipe, onnx_path, threads)


def profile_operators(path: str | Path, inputs, out_dir: str | Path, runs: int = 1):
    """Where ONNX Runtime spends a denoiser call: see `OnnxRuntime.profile`."""
    return OnnxRuntime().profile(path, inputs, out_dir, runs)


def run_onnx(path: str | Path, inputs, providers=None) -> np.ndarray:
    """Run an exported denoiser in ONNX Runtime on flat torch inputs; returns its output as float32 numpy."""
    return OnnxRuntime(providers).run(path, inputs)
