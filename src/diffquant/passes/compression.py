"""Compression pass over a traced QDQ export: every quantized weight becomes a low-precision
initializer (INT8, or FLOAT8E4M3FN) feeding DequantizeLinear, its codes handed over by the quantization
backend (`WeightCodes`) so that dequantizing gives the backend's fake-quantized weights bit for bit.

Why hand-written: Quark folds int8 weights itself but re-rounds them in ONNX (a tensor's extreme sits
at +-127.5 steps and a few codes come out one step off), and keeps fp8 weights in float behind a
QuantizeLinear; no library rewrites a graph from codes it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffquant.passes.codes import WeightCodes
from diffquant.passes.graph import drop_unused_initializers

logger = logging.getLogger(__name__)


@dataclass
class CompressionReport:
    """What the pass changed and the proof that it is exact."""

    layers: int
    int8_layers: int
    fp8_layers: int
    bit_exact_layers: int
    bytes_before: int
    bytes_after: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _initializer(name: str, codes: torch.Tensor):
    import onnx
    from onnx import numpy_helper

    if codes.dtype == torch.int8:
        return numpy_helper.from_array(codes.numpy(), name)
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT8E4M3FN, dims=list(codes.shape))
    tensor.raw_data = codes.view(torch.uint8).numpy().tobytes()
    return tensor


def _tensor_bytes(tensor) -> int:
    """Bytes of an initializer's values, whether they are in the graph or in an external data file."""
    import onnx

    return int(np.prod(tensor.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def compress_weights(model, codes_of: Callable[[str], WeightCodes], layer_of: Callable[[object], str | None],
                     base_dir: str = "") -> CompressionReport:
    """Rewrite `model` (an onnx.ModelProto traced from a quantized denoiser) in place: each DequantizeLinear
    for which `layer_of(node)` names a layer reads that layer's codes, `codes_of(layer)`, instead.

    The float weights it replaces are never read (the codes come from the backend), so `model` may be loaded
    without its external data: the scales and zero points it reads are then read from `base_dir`.

    Raises:
        AssertionError: a graph's scale differs from the backend's, or a dequantized weight would not equal
            the backend's fake-quantized weight exactly.
    """
    import onnx

    graph = model.graph
    before = sum(_tensor_bytes(t) for t in graph.initializer)
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def value(name: str) -> np.ndarray | None:
        """A constant's values: an initializer or, in the graph as traced (before Quark's passes fold
        them), a Constant node's tensor or an Identity of either (the tracer shares equal constants so);
        None when `name` is none of these."""
        if name in initializers:
            return onnx.numpy_helper.to_array(initializers[name], base_dir)
        node = producers.get(name)
        if node is not None and node.op_type == "Identity":
            return value(node.input[0])
        if node is not None and node.op_type == "Constant":
            tensor = next((a.t for a in node.attribute if a.name == "value"), None)
            return None if tensor is None else onnx.numpy_helper.to_array(tensor)
        return None
    dropped_nodes, counts = [], {"int8": 0, "fp8": 0}
    exact = 0
    for node in list(graph.node):
        layer = layer_of(node) if node.op_type == "DequantizeLinear" else None
        if layer is None:
            continue
        stored = codes_of(layer)
        codes, kind = stored.codes, stored.kind
        onnx_scale = value(node.input[1]).astype(np.float32)
        assert np.array_equal(onnx_scale.reshape(-1), stored.scale.reshape(-1).numpy()), f"{node.name}: scale differs"
        exact += stored.exact
        source = node.input[0]
        if source in producers and producers[source].op_type == "QuantizeLinear":
            dropped_nodes.append(producers[source])  # fp8: float weight -> QuantizeLinear, folded here
        name = f"{layer}.weight_{kind}"
        graph.initializer.append(_initializer(name, codes))
        node.input[0] = name
        # Symmetric codes: Quark shares one scalar zero point even for per-channel scales, which ONNX
        # Runtime rejects (none or one per channel). int8 codes get zeros shaped like their scale: with
        # no zero point, ORT's exact-int8 option (runtimes.onnxruntime.session.EXACT_INT8_PRODUCTS) rewrites a per-channel
        # DequantizeLinear that it does not fuse to u8 with a scalar zero point, and then rejects it.
        if len(node.input) == 3:
            zero = value(node.input[2])
            assert zero is None or not zero.any(), f"{node.name}: non-zero zero point"
            del node.input[2]
        if kind == "int8":
            zero = onnx.numpy_helper.from_array(np.zeros(onnx_scale.shape, np.int8), f"{name}_zero")
            graph.initializer.append(zero)
            node.input.append(zero.name)
        counts[kind] += 1
    for node in dropped_nodes:
        graph.node.remove(node)
    drop_unused_initializers(graph)
    layers = counts["int8"] + counts["fp8"]
    if exact != layers:
        raise AssertionError(f"only {exact} of {layers} compressed weights dequantize to the backend's exactly")
    after = sum(_tensor_bytes(t) for t in graph.initializer)
    logger.info("compressed %d weights (%d int8, %d fp8): initializers %.1f -> %.1f MB, all bit-exact",
                layers, counts["int8"], counts["fp8"], before / 2**20, after / 2**20)
    return CompressionReport(layers, counts["int8"], counts["fp8"], exact, before, after)


def compress_weights_in_file(path: Path, codes_of: Callable[[str], WeightCodes],
                             layer_of: Callable[[object], str | None]) -> CompressionReport:
    """`compress_weights` on the ONNX file at `path`, rewritten in place.

    Only the graph, the scales and the tensors that stay are read: the float weights being replaced
    stay on disk, so a model of gigabytes is never in memory as float (an SD 1.5 UNet: 3.4 GB of
    float weights in, 0.9 GB of codes out)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    model = onnx.load(str(path), load_external_data=False)
    report = compress_weights(model, codes_of, layer_of, str(path.parent))
    load_external_data_for_model(model, str(path.parent))  # what stays: codes are in memory already
    onnx.save_model(model, str(path))  # external data again when large (export._external_data_saves)
    return report
