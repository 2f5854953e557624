"""Put Quark's exported QDQ graph into the form that ONNX Runtime's CPU QDQ fusions recognise, so the
quantized layers really run on integer kernels instead of dequantize-then-float.

ONNX Runtime fuses DequantizeLinear(x), DequantizeLinear(W) -> MatMul into MatMulIntegerToFloat, and
DequantizeLinear(x), DequantizeLinear(W) -> Conv -> QuantizeLinear into QLinearConv (quantizing a
float bias itself). Quark's export stands in the way of the MatMul fusion twice: a Linear's weight
reaches MatMul through a Transpose after its DequantizeLinear, and one quantized activation feeds
several layers (attention's to_q, to_k and to_v) through one shared chain, or through identical
chains that ORT's common-subexpression pass merges into one; the fusion refuses a shared chain.
Two more stand in the way of transformer Linears: torch exports a Linear on a 2-D input (timestep and
pooled-text embedders, AdaLayerNorm modulation) as Gemm with a float bias, which ORT fuses into QGemm
only without one; and ORT's MatMulAddFusion (level 1, before the QDQ fusions of level 2) turns a
Linear's MatMul + Add into a float Gemm wherever the input shape is fully known (a fixed-shape export
such as Flux's): outputs still match torch, but no integer kernel runs.
Every rewrite here is exact. A Conv fuses only when its output is quantized too: that is the
recipe's `conv_output`, not this pass.

Why hand-written: ONNX Runtime's own quantizer builds this form only for graphs it quantizes itself,
and neither Quark nor onnxslim rewrites an existing QDQ graph into it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from diffquant.passes.graph import attribute, drop_unused_initializers, read_tensor_names, set_attribute
from diffquant.passes.graph import consumers as consumers_of

logger = logging.getLogger(__name__)


@dataclass
class FusionReport:
    """How many constant Identity nodes were bypassed, weight transposes folded into the codes, quantized
    inputs split per layer, Gemm biases moved out, MatMul biases shielded from MatMulAddFusion, shared
    weight scales widened and attentions fused into MultiHeadAttention (`attention.fuse_attention`)."""

    bypassed_identities: int
    folded_transposes: int
    split_quantize: int
    distinct_quantize: int
    unbiased_gemms: int = 0
    shielded_biases: int = 0
    widened_scales: int = 0
    fused_attention: int = 0

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _integer_chain(q, initializers: dict) -> bool:
    """A QuantizeLinear to int8/uint8 with constant scale and zero point. fp8 chains are left as they
    are: ONNX Runtime 1.31 would fuse a split fp8 chain into MatMulIntegerToFloat, which rejects fp8."""
    import onnx

    if len(q.input) < 3 or not all(name in initializers for name in q.input[1:3]):
        return False
    return initializers[q.input[2]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


def _transposed(tensor, name: str):
    """The 2-D int8 initializer `tensor`, transposed."""
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(tensor).T), name)


def bypass_constant_identities(model) -> int:
    """Read initializers directly where the export put an Identity in between (Quark's export of a
    model above 2 GB does so for shared scales and zero points), so the rewrites below see them."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    source = {node.output[0]: node.input[0] for node in graph.node
              if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs}
    if not source:
        return 0
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in source:
                node.input[k] = source[name]
    for node in [n for n in graph.node if n.op_type == "Identity" and n.output[0] in source]:
        graph.node.remove(node)
    return len(source)


def _transpose_codes(graph, dq, initializers: dict) -> bool:
    """Make `dq` dequantize the transpose of its 2-D int8 codes (its channel axis moving with them)."""
    import onnx

    codes = initializers.get(dq.input[0])
    if codes is None or len(codes.dims) != 2 or codes.data_type != onnx.TensorProto.INT8:
        return False
    name = f"{codes.name}.T"
    graph.initializer.append(_transposed(codes, name))
    dq.input[0] = name
    scale = initializers[dq.input[1]]
    if len(scale.dims) == 1 and scale.dims[0] > 1:  # per channel: the channel axis moves too
        set_attribute(dq, "axis", 1 - attribute(dq, "axis", 1))
    return True


def fold_weight_transposes(model) -> int:
    """DequantizeLinear(W) -> Transpose -> MatMul becomes DequantizeLinear(W^T) -> MatMul, and
    Gemm(x, DequantizeLinear(W), transB=1) becomes Gemm(x, DequantizeLinear(W^T)) (int8 W): ONNX Runtime
    fuses a weight-only int8 Gemm into MatMulNBits only with transB=0."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers = consumers_of(graph)
    folded = []
    for node in graph.node:
        if node.op_type == "Gemm" and attribute(node, "transB", 0) == 1 and attribute(node, "transA", 0) == 0:
            dq = producers.get(node.input[1])
            if (dq is not None and dq.op_type == "DequantizeLinear" and len(consumers[dq.output[0]]) == 1
                    and _transpose_codes(graph, dq, initializers)):
                set_attribute(node, "transB", 0)
                folded.append(None)
            continue
        if node.op_type != "Transpose" or list(attribute(node, "perm", [])) != [1, 0]:
            continue
        dq = producers.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(consumers[dq.output[0]]) != 1:
            continue
        if _transpose_codes(graph, dq, initializers):
            dq.output[0] = node.output[0]
            folded.append(node)
    for node in folded:
        if node is not None:
            graph.node.remove(node)
    return len(folded)


def split_shared_quantize(model, ops: tuple[str, ...] = ("MatMul", "Conv", "Gemm")) -> int:
    """Give every MatMul/Conv/Gemm that shares a quantized input with other nodes its own
    QuantizeLinear -> DequantizeLinear chain, with its own copies of the scale and zero point.

    Quark quantizes an input read by several layers once (attention's to_q, to_k and to_v; every
    to_k/to_v of the UNet reads one quantized `encoder_hidden_states`). ONNX Runtime fuses none of
    them then, and its common-subexpression pass merges identical chains back, hence the copies of
    the scale and zero point. Re-quantizing the same tensor per layer gives identical codes.
    """
    import onnx

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers = consumers_of(graph)
    copies = 0
    for q in [node for node in graph.node if node.op_type == "QuantizeLinear"]:
        dqs = consumers[q.output[0]]
        if any(dq.op_type != "DequantizeLinear" for dq in dqs):
            continue
        if not _integer_chain(q, initializers):
            continue
        readers = [(dq, reader) for dq in dqs for reader in consumers[dq.output[0]]]
        layers = [(dq, reader) for dq, reader in readers if reader.op_type in ops]
        if len(readers) < 2 or not layers:
            continue
        for dq, layer in layers:
            copies += 1
            scale, zero = (f"{name}_{copies}" for name in q.input[1:3])
            for source, name in ((q.input[1], scale), (q.input[2], zero)):
                graph.initializer.append(_copy(initializers[source], name))
            codes, value = f"{q.output[0]}_{copies}", f"{dq.output[0]}_{copies}"
            position = next(i for i, node in enumerate(graph.node) if node.output[0] == layer.output[0])
            graph.node.insert(position, onnx.helper.make_node(
                "DequantizeLinear", [codes, scale, zero], [value], name=f"{dq.name or dq.output[0]}_{copies}"))
            graph.node.insert(position, onnx.helper.make_node(
                "QuantizeLinear", [q.input[0], scale, zero], [codes], name=f"{q.name or q.output[0]}_{copies}"))
            layer.input[list(layer.input).index(dq.output[0])] = value
    for _ in range(2):  # the DequantizeLinear nodes left unread, then their QuantizeLinear
        used = read_tensor_names(graph)
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in used]
        for node in dead:
            graph.node.remove(node)
    return copies


def distinct_quantize_constants(model) -> int:
    """Give each QuantizeLinear that repeats another's (input, scale, zero point) its own copies of
    the scale and zero point, with its DequantizeLinear readers. Quark quantizes one tensor read by
    several layers with separate but identical chains (one `encoder_hidden_states` chain per to_k and
    to_v); ONNX Runtime's common-subexpression pass would merge them into one shared chain again."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers = consumers_of(graph)
    seen, renamed = set(), 0
    for q in [node for node in graph.node if node.op_type == "QuantizeLinear" and len(node.input) == 3]:
        key = tuple(q.input)
        if key not in seen:
            seen.add(key)
            continue
        if not _integer_chain(q, initializers):
            continue
        readers = consumers[q.output[0]]
        if any(r.op_type != "DequantizeLinear" or list(r.input[1:]) != list(q.input[1:]) for r in readers):
            continue
        renamed += 1
        for k in (1, 2):
            copy = _copy(initializers[q.input[k]], f"{q.input[k]}_q{renamed}")
            graph.initializer.append(copy)
            for node in [q, *readers]:
                node.input[k] = copy.name
    return renamed


def _integer_dq(name: str, producers: dict, initializers: dict) -> bool:
    """`name` is the output of a DequantizeLinear of int8/uint8 codes (a quantized weight or activation)."""
    import onnx

    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or dq.input[2] not in initializers:
        return False
    return initializers[dq.input[2]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


def unbias_quantized_gemms(model) -> int:
    """Gemm(DQ(x), DQ(W), bias) becomes Gemm(DQ(x), DQ(W)) -> Add(bias): ONNX Runtime fuses a quantized
    Gemm into QGemm (float output) only when it has no bias or an int32-quantized one, and re-quantizing
    the float bias would not be exact."""
    import onnx

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    moved = 0
    for gemm in [n for n in graph.node if n.op_type == "Gemm" and len(n.input) == 3 and n.input[2]]:
        if not all(_integer_dq(name, producers, initializers) for name in gemm.input[:2]):
            continue
        if attribute(gemm, "alpha", 1.0) != 1.0 or attribute(gemm, "beta", 1.0) != 1.0:
            continue
        bias, output = gemm.input[2], gemm.output[0]
        del gemm.input[2]
        gemm.output[0] = f"{output}_unbiased"
        position = list(graph.node).index(gemm) + 1
        graph.node.insert(position, onnx.helper.make_node("Add", [gemm.output[0], bias], [output],
                                                          name=f"{gemm.name or output}_bias"))
        moved += 1
    return moved


def shield_matmul_biases(model) -> int:
    """The 1-D bias of a quantized MatMul -> Add becomes (1, N): the same broadcast, but outside the bias
    shapes that ONNX Runtime's MatMulAddFusion accepts for an N-D input, so the MatMul stays a MatMul
    for the QDQ fusion into MatMulIntegerToFloat instead of becoming a float Gemm. (A weight-only MatMul
    needs no shield: ORT fuses it into MatMulNBits before MatMulAddFusion runs.)"""
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers = consumers_of(graph)
    shielded = 0
    for matmul in [n for n in graph.node if n.op_type == "MatMul"]:
        if not all(_integer_dq(name, producers, initializers) for name in matmul.input[:2]):
            continue
        readers = consumers[matmul.output[0]]
        if len(readers) != 1 or readers[0].op_type != "Add":
            continue
        add = readers[0]
        k = 1 - list(add.input).index(matmul.output[0])
        bias = initializers.get(add.input[k])
        if bias is None or len(bias.dims) != 1:
            continue
        shielded += 1
        name = f"{bias.name}_1xN"
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(bias).reshape(1, -1), name))
        add.input[k] = name
    return shielded


def widen_shared_weight_scales(model) -> int:
    """A per-tensor int8 weight scale that another node reads too, or equal in value to another scalar
    initializer, becomes a vector along the output channels (the same value N times; its zero point too): ONNX Runtime's ConstantSharing
    merges equal scalars into one initializer, and its MatMulNBits fusion then takes none of the weights
    that read it (measured on Flux, whose Linears of equal fan-in can share a bit-equal scale)."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers = consumers_of(graph)
    scalars = Counter(numpy_helper.to_array(t).tobytes() for t in graph.initializer
                      if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) == 1)
    widened = 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear" and len(n.input) == 3]:
        codes, scale = initializers.get(dq.input[0]), initializers.get(dq.input[1])
        if codes is None or scale is None or codes.data_type != onnx.TensorProto.INT8 or len(codes.dims) != 2:
            continue
        if scale.dims or (scalars[numpy_helper.to_array(scale).tobytes()] < 2 and len(consumers[scale.name]) < 2):
            continue
        if not all(r.op_type in ("MatMul", "Gemm") and list(r.input).index(dq.output[0]) == 1
                   and attribute(r, "transB", 0) == 0 for r in consumers[dq.output[0]]):
            continue
        n = codes.dims[1]
        value = numpy_helper.to_array(scale)
        graph.initializer.append(numpy_helper.from_array(np.full(n, value, np.float32), f"{codes.name}_scale"))
        graph.initializer.append(numpy_helper.from_array(np.zeros(n, np.int8), f"{codes.name}_zero"))
        dq.input[1], dq.input[2] = f"{codes.name}_scale", f"{codes.name}_zero"
        set_attribute(dq, "axis", 1)
        widened += 1
    return widened


def _copy(tensor, name: str):
    import onnx

    duplicate = onnx.TensorProto()
    duplicate.CopyFrom(tensor)
    duplicate.name = name
    return duplicate


def prepare_for_ort_fusion(model, fuse_attention: bool = True) -> FusionReport:
    """Rewrite `model` (an onnx.ModelProto after `compress_weights`) in place; drops initializers
    that nothing reads any more. `fuse_attention`: also turn each attention into one
    MultiHeadAttention (ONNX Runtime's flash-attention kernel; exact in float)."""
    from diffquant.passes.attention import fuse_attention as fuse

    bypassed = bypass_constant_identities(model)
    folded = fold_weight_transposes(model)
    split = split_shared_quantize(model)
    distinct = distinct_quantize_constants(model)
    report = FusionReport(bypassed, folded, split, distinct, unbias_quantized_gemms(model), shield_matmul_biases(model),
                          widen_shared_weight_scales(model), fuse(model) if fuse_attention else 0)
    drop_unused_initializers(model.graph)
    logger.info("ONNX Runtime fusion form: %s", report.to_dict())
    return report
