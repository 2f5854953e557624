"""The 4-bit ONNX pass: every Linear with int4 per-group weights becomes one `com.microsoft.MatMulNBits`
(bits 4, block_size = the group size), which ONNX Runtime's CPU provider runs on its 4-bit MLAS kernels.

The backend traces those Linears as plain float Linears (Quark's exporter cannot write per-group weights)
and hands over their codes (`WeightCodes`); `to_matmul_nbits` then replaces each one's MatMul or Gemm with
MatMulNBits. Why hand-packed rather than ONNX Runtime's `MatMulNBitsQuantizer`: that quantizer computes its
own scales and codes from the float weights; here codes and scales are the backend's, so that ORT
dequantizes to exactly the torch fake-quantized weights. The layout is the contrib op's
(onnxruntime/core/graph/contrib_ops, `MatMulNBits`): B (N, K / block_size, block_size / 2) uint8, two
codes per byte with the first in the low nibble, scales (N, K / block_size) in A's float type, and no
zero_points input, which means 8 for 4 bits: stored nibble = int4 code + 8.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from diffquant.passes.codes import WeightCodes, pack_nibbles
from diffquant.passes.graph import drop_unused_initializers, scope_layer

logger = logging.getLogger(__name__)
MS_DOMAIN = "com.microsoft"
# MatMulNBits' accuracy_level: the lowest precision of A it may compute with. 0 (unset) dequantizes
# B and multiplies in float; 4 lets MLAS quantize A to int8 per block and use integer dot products.
# Measured on shapes-sd (int4-w, group 32, 83 MatMulNBits; batch 2, 16 tokens; 1 thread, AVX2 CPU
# without VNNI; median of 20 calls): level 0 53.8 ms per call, relative L2 error vs torch 5.6e-7;
# level 4 59.2 ms, 3.6e-3 (ORT fp32: 53.3 ms). Level 4 is slower here and 6000x less exact: 0 it is.
# On a 2-core Xeon with AVX512-VNNI and AMX (ORT 1.32, one MatMulNBits at SD3.5-medium's widths, 1,357
# tokens, 2 threads, medians of 20), level 4 against an fp32 MatMul of the same shape depends on the
# block: 0.73-0.87x at block 32, 0.86-0.96x at 64, 1.14-1.26x at 128, 1.32-1.42x at 256; level 0 is
# 0.91-0.94x at every block. So the default stays exact, and `export_onnx(int4_compute="int8")` asks
# for level 4.
ACCURACY_LEVEL = 0
# ORT vs torch at accuracy_level 0: the dequantized weights are torch's bit for bit, only the float
# summation order differs. Measured: 5.6e-7 relative L2 error on shapes-sd (above); 1e-4 still fails
# a wrong graph (the nibbles of each byte swapped: 38% on the tiny UNet).
MAX_RELATIVE_ERROR_NBITS = 1e-4


@dataclass
class NBitsReport:
    """How many Linears became MatMulNBits (`layers`), all with the backend's codes bit for bit (`bit_exact_layers`)."""

    layers: int
    bit_exact_layers: int
    block_size: int
    accuracy_level: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


# Node names of a Linear's product: torch's, and onnxslim's Gemm that replaces a fixed-shape MatMul (+ Add)
# between two Reshapes (named after the MatMul's output; Quark runs onnxslim before this rewrite).
_PRODUCT_NAMES = {"MatMul": ("MatMul",), "Gemm": ("Gemm", "MatMul_output_0")}


def _layer_of(node, names=None) -> str | None:
    """'/unet/down_blocks.1/attentions.0/proj_in/MatMul' -> 'down_blocks.1.attentions.0.proj_in' (the
    first path part is the export wrapper's attribute holding the denoiser)."""
    parts = node.name.split("/")
    if node.op_type not in _PRODUCT_NAMES or len(parts) < 4 or parts[-1] not in _PRODUCT_NAMES[node.op_type]:
        return None
    return scope_layer(parts[2:-1], names)


def _gemm_transposes_b(node) -> bool:
    """Whether a Gemm is x @ W.T + b (torch's Linear, True) or x @ W + b (onnxslim's, False); raises for
    any other Gemm."""
    import onnx

    values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if values.get("transA", 0) != 0 or values.get("alpha", 1.0) != 1.0 or values.get("beta", 1.0) != 1.0:
        raise AssertionError(f"{node.name}: a Gemm that is not x @ W.T + b")
    return values.get("transB", 0) == 1


def to_matmul_nbits(model, layers: dict[str, WeightCodes], accuracy_level: int = ACCURACY_LEVEL) -> NBitsReport:
    """Rewrite `model` (an onnx.ModelProto traced with the int4 Linears as plain float Linears) in place: the
    MatMul (or Gemm with its bias) of each layer in `layers` becomes MatMulNBits with its codes and scales.

    Raises:
        AssertionError: a layer was not found exactly once, or its codes would not dequantize to the
            backend's fake-quantized weight bit for bit.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    found: dict[str, int] = {}
    exact, block_sizes = 0, set()
    nodes = []
    for node in graph.node:
        name = _layer_of(node, layers)
        if name not in layers:
            nodes.append(node)
            continue
        transposed = node.op_type == "Gemm" and _gemm_transposes_b(node)
        stored = layers[name]
        nibbles, scale = stored.codes, stored.scale  # (N, K), (N, K / group)
        n, k = nibbles.shape
        group = stored.group
        exact += stored.exact
        block_sizes.add(group)
        weight = initializers.get(node.input[1])
        if weight is None or tuple(weight.dims) != ((n, k) if transposed else (k, n)):
            raise AssertionError(f"{node.name}: its weight is not the constant ({k}, {n}) of layer {name}")
        packed = pack_nibbles(nibbles).reshape(n, k // group, group // 2)
        b = numpy_helper.from_array(packed.numpy(), f"{name}.weight_uint4")
        scale_type = np.float16 if stored.float_dtype == torch.float16 else np.float32  # A's type (T1)
        scales = numpy_helper.from_array(scale.numpy().astype(scale_type), f"{name}.weight_scale")
        graph.initializer.extend([b, scales])
        inputs = [node.input[0], b.name, scales.name]
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            inputs += ["", "", node.input[2]]  # no zero_points (8), no g_idx, the bias
        attributes = {"K": k, "N": n, "bits": 4, "block_size": group}
        if accuracy_level:
            attributes["accuracy_level"] = accuracy_level
        nodes.append(onnx.helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}NBits",
                                           domain=MS_DOMAIN, **attributes))
        found[name] = found.get(name, 0) + 1
    missing = [n for n in layers if found.get(n) != 1]
    if missing:
        raise AssertionError(f"{len(missing)} int4 Linears were not found once as MatMul/Gemm in the export: "
                             f"{', '.join(missing[:5])}")
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    drop_unused_initializers(graph)
    if exact != len(layers):
        raise AssertionError(f"only {exact} of {len(layers)} MatMulNBits weights dequantize to the backend's exactly")
    logger.info("%d int4 Linears -> MatMulNBits (block %s, accuracy_level %d), all bit-exact", len(layers),
                "/".join(map(str, sorted(block_sizes))), accuracy_level)
    return NBitsReport(len(layers), exact, max(block_sizes, default=0), accuracy_level)
