"""ONNX Runtime sessions as diffquant opens them: every graph optimization (QDQ fusion into integer
kernels), int8 products computed exactly on every CPU, providers checked with one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffquant.core.errors import DiffquantError
from diffquant.core.cpu import decisions

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
# On x86 CPUs, ONNX Runtime's int8 MatMul/Conv kernels multiply u8 activations by s8 weights. Without
# VNNI (AVX2-only CPUs such as AMD EPYC before Zen 4, AVX-512 before Cascade Lake) they use vpmaddubsw,
# which adds each pair of products in int16 and saturates once the pair passes 32767; with int8
# weights beyond [-64, 63] that silently changes results (7% of a fused Linear's outputs in the
# tests; 7.3% instead of 0.6% relative error on shapes-sd W8A8). This key makes ORT store such
# weights as u8 (+128, zero point moved with them: the same products) for its exact u8u8 kernels.
# ORT would act on it on VNNI/AMX CPUs too, where the u8s8 kernels are exact and faster: `diffquant.core.cpu`
# decides (DIFFQUANT_ORT_EXACT_INT8 overrides it).
EXACT_INT8_PRODUCTS = "session.x64quantprecision"


def int8_products_saturate() -> bool:
    """True when ONNX Runtime sessions compute int8 products exactly (u8 x u8): `cpu.decisions()`."""

    return decisions().exact_int8


def _quantizes_activations_to_fp8(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    fp8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    return any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in fp8 for n in graph.node)


def session_options(options=None, optimize: bool = True):
    """diffquant's ONNX Runtime session options: all graph optimizations (QDQ fusion into integer
    kernels; `optimize=False` runs the graph as written), warnings only, and int8 products computed
    exactly (`EXACT_INT8_PRODUCTS` where `cpu.decisions()` says: the CPU lacks VNNI, or forced). Sets them on `options` when given, else on new options."""
    import onnxruntime as ort

    options = options or ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    if int8_products_saturate():
        options.add_session_config_entry(EXACT_INT8_PRODUCTS, "1")
    return options


def session(path: str | Path, providers: list[str] | tuple[str, ...] | None = None, threads: int | None = None,
            options=None):
    """An ONNX Runtime session with `session_options` (QDQ fusion into integer kernels).

    A graph with fp8 activations runs without the QDQ fusion pass: it has no integer kernel to fuse
    into, and ONNX Runtime 1.31's pass moves fp8 tensors through Transpose, which has no fp8 kernel
    (an invalid-graph error at load)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise DiffquantError(f"no ONNX file at {path}: export one with `diffquant export` or `run`")
    available = ort.get_available_providers()
    providers = list(providers or DEFAULT_PROVIDERS)
    missing = [p for p in providers if p not in available]
    if missing:
        raise DiffquantError(f"ONNX Runtime provider(s) {', '.join(missing)} not available here "
                             f"(available: {', '.join(available)}): install onnxruntime-gpu / onnxruntime-rocm")
    options = session_options(options)
    if threads:
        options.intra_op_num_threads = threads
    disabled = ["QDQSelectorActionTransformer"] if _quantizes_activations_to_fp8(path) else None
    return ort.InferenceSession(str(path), options, providers=providers, disabled_optimizers=disabled)


def session_feed(session_, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The numpy feed of `session_`'s inputs, taken by name from torch `inputs`."""
    return {i.name: inputs[i.name].detach().cpu().numpy() for i in session_.get_inputs()}
