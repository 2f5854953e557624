"""Fused attention for ONNX Runtime's CPU: each scaled-dot-product attention of an exported denoiser
becomes one `com.microsoft.MultiHeadAttention`, whose CPU kernel runs flash attention (tiles of the
scores, never the whole S x S matrix) when there is no mask, bias or past.

torch's ONNX export of `F.scaled_dot_product_attention` (diffusers' AttnProcessor2_0), per head split:

    q:  Reshape(to_q, [B, -1, H, D]) -> Transpose(0,2,1,3) -> Mul(f)     # f = sqrt(scale)
    k:  Reshape(to_k, [B, -1, H, D]) -> Transpose(0,2,3,1) -> Mul(f)
    v:  Reshape(to_v, [B, -1, H, D]) -> Transpose(0,2,1,3)
    MatMul(q, k) -> Softmax(-1) -> MatMul(., v) -> Transpose(0,2,1,3) -> Reshape([B, -1, H*D])

becomes MultiHeadAttention(to_q, to_k, to_v, num_heads=H) writing the last Reshape's output. The
scale f is either computed from the head width (torch's default 1/sqrt(D), MultiHeadAttention's
default too) or a constant (an explicit scale, written as the `scale` attribute). The projections
before it are untouched: in a QDQ graph they stay MatMulIntegerToFloat, and the attention itself
runs in float, as before. Self- and cross-attention match alike (K and V may have another length).

Why hand-written: ORT's transformer optimizer does not take QDQ graphs, and onnxscript 0.7's
`ort_fusions.fuse_sdpa` matched none of shapes-sd's 14 attentions (it needs a constant scale; this
export computes it from the shape).
"""

from __future__ import annotations

import logging

from diffquant.passes.graph import attribute, consumers

logger = logging.getLogger(__name__)
MS_DOMAIN = "com.microsoft"


class _Graph:
    """Producers, consumers and constant values of a graph's tensors."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers = consumers(graph)
        self.initializers = {t.name: t for t in graph.initializer}
        self._array = numpy_helper.to_array
        # ranks the exporter recorded (value_info), where known: a head split must start from (B, S, H*D)
        self.ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in graph.value_info
                      if v.type.tensor_type.HasField("shape")}

    def constant(self, name: str):
        """The value of an initializer or Constant node output, else None."""
        if name in self.initializers:
            return self._array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    return self._array(attribute.t)
        return None

    def node(self, name: str, op_type: str, only_reader: bool = True):
        """The node of type `op_type` that produces `name` (read by no other node when `only_reader`)."""
        node = self.producer.get(name)
        if node is None or node.op_type != op_type:
            return None
        if only_reader and len(self.consumers[name]) != 1:
            return None
        return node

    def reader(self, name: str, op_type: str):
        """The only node that reads `name`, when it is of type `op_type`."""
        readers = self.consumers[name]
        return readers[0] if len(readers) == 1 and readers[0].op_type == op_type else None

    def skip_casts(self, name: str) -> str:
        while (cast := self.node(name, "Cast", only_reader=False)) is not None:
            name = cast.input[0]
        return name


def _heads(g: _Graph, reshape) -> int | None:
    """H of a Reshape to [B, -1, H, D], from its shape constant or the Concat that builds it."""
    shape = g.constant(reshape.input[1])
    if shape is not None:
        return int(shape[2]) if shape.size == 4 and shape[2] > 0 else None
    concat = g.node(reshape.input[1], "Concat", only_reader=False)
    if concat is None or len(concat.input) != 4:
        return None
    heads = g.constant(concat.input[2])
    return int(heads.reshape(-1)[0]) if heads is not None and heads.size == 1 and heads.reshape(-1)[0] > 0 else None


def _split_heads(g: _Graph, name: str, perm: list[int]):
    """(the (B, S, H*D) tensor, H) when `name` is Reshape([B, -1, H, D]) -> Transpose(perm) of it."""
    transpose = g.node(name, "Transpose", only_reader=False)
    if transpose is None or list(attribute(transpose, "perm", [])) != perm:
        return None
    # Besides the attention, only the Shape that the default scale is computed from may read it.
    if sum(reader.op_type != "Shape" for reader in g.consumers[name]) != 1:
        return None
    reshape = g.node(transpose.input[0], "Reshape")
    if reshape is not None and g.ranks.get(reshape.input[0], 3) != 3:
        return None  # e.g. Z-Image's rotated query (B, S, H, D / 2, 2) reshaped to (B, S, H, D): no projection here
    heads = _heads(g, reshape) if reshape is not None else None
    return (reshape.input[0], heads) if heads else None


def _is_default_scale(g: _Graph, name: str, heads_tensors: set[str]) -> bool:
    """`name` is sqrt(1 / sqrt(D)) with D the last dimension of one of `heads_tensors`, as torch's
    exporter computes scaled_dot_product_attention's default scale: Sqrt(Div(1, Sqrt(Cast(Slice(Shape(x), -1)))))."""
    outer = g.node(g.skip_casts(name), "Sqrt", only_reader=False)
    div = g.node(g.skip_casts(outer.input[0]), "Div", only_reader=False) if outer is not None else None
    one = g.constant(div.input[0]) if div is not None else None
    if one is None or one.size != 1 or float(one.reshape(-1)[0]) != 1.0:
        return False
    inner = g.node(g.skip_casts(div.input[1]), "Sqrt", only_reader=False)
    sliced = g.node(g.skip_casts(inner.input[0]), "Slice", only_reader=False) if inner is not None else None
    if sliced is None:
        return False
    start = g.constant(sliced.input[1])
    shape = g.node(sliced.input[0], "Shape", only_reader=False)
    return (shape is not None and shape.input[0] in heads_tensors and start is not None
            and start.size == 1 and int(start.reshape(-1)[0]) in (-1, 3))


def _scale(g: _Graph, q_mul, k_mul, heads_tensors: set[str]) -> tuple[bool, float | None]:
    """(matched, the explicit scale or None for the default 1/sqrt(D)) of the two scaling Muls (each
    multiplies by sqrt(scale); the exporter may compute that factor once or once per side)."""
    values = [g.constant(mul.input[1]) for mul in (q_mul, k_mul)]
    if all(v is not None and v.size == 1 for v in values):
        return True, float(values[0].reshape(-1)[0]) * float(values[1].reshape(-1)[0])
    if any(v is not None for v in values):
        return False, None
    return all(_is_default_scale(g, mul.input[1], heads_tensors) for mul in (q_mul, k_mul)), None


def _match(g: _Graph, softmax):
    """The MultiHeadAttention that replaces the attention around `softmax`, and the Reshape it replaces."""
    import onnx

    if attribute(softmax, "axis", -1) not in (-1, 3):
        return None
    scores = g.node(softmax.input[0], "MatMul")
    readers = g.consumers[softmax.output[0]]
    if scores is None or len(readers) != 1 or readers[0].op_type != "MatMul" or readers[0].input[0] != softmax.output[0]:
        return None
    weighted = readers[0]
    q_mul, k_mul = (g.node(name, "Mul") for name in scores.input)
    if q_mul is None or k_mul is None:
        return None
    q = _split_heads(g, q_mul.input[0], [0, 2, 1, 3])
    k = _split_heads(g, k_mul.input[0], [0, 2, 3, 1])
    v = _split_heads(g, weighted.input[1], [0, 2, 1, 3])
    if not (q and k and v) or not q[1] == k[1] == v[1]:
        return None
    merge = g.reader(weighted.output[0], "Transpose")
    if merge is None or list(attribute(merge, "perm", [])) != [0, 2, 1, 3]:
        return None
    out = g.reader(merge.output[0], "Reshape")
    if out is None:
        return None
    shape = g.constant(out.input[1])
    concat = g.node(out.input[1], "Concat", only_reader=False) if shape is None else None
    if (shape.size if shape is not None else len(concat.input) if concat is not None else 0) != 3:
        return None
    matched, scale = _scale(g, q_mul, k_mul, {q_mul.input[0], k_mul.input[0]})
    if not matched:
        return None
    attributes = {"num_heads": q[1]} | ({"scale": scale} if scale is not None else {})
    name = softmax.name.rsplit("/", 1)[0] + "/MultiHeadAttention" if softmax.name else f"{out.output[0]}_mha"
    mha = onnx.helper.make_node("MultiHeadAttention", [q[0], k[0], v[0]], [out.output[0]], name=name,
                                domain=MS_DOMAIN, **attributes)
    return mha, out


def _drop_dead_nodes(graph) -> int:
    """Remove nodes none of whose outputs is read (repeatedly: a chain dies from its end)."""
    outputs = {o.name for o in graph.output}
    dropped = 0
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if not any(o in read for o in node.output if o)]
        if not dead:
            return dropped
        for node in dead:
            graph.node.remove(node)
        dropped += len(dead)


def fuse_attention(model) -> int:
    """Rewrite every scaled-dot-product attention of `model` (an onnx.ModelProto) into one
    com.microsoft.MultiHeadAttention, in place; returns how many. Exact in float: the same
    products and softmax in another order (ORT's outputs agree within float rounding)."""
    import onnx

    from diffquant.passes.graph import drop_unused_initializers

    graph = model.graph
    g = _Graph(graph)
    replacements = [m for m in (_match(g, n) for n in graph.node if n.op_type == "Softmax") if m is not None]
    for mha, out in replacements:
        position = list(graph.node).index(out)
        graph.node.insert(position, mha)
        graph.node.remove(out)
    if not replacements:
        return 0
    _drop_dead_nodes(graph)
    live = {name for node in graph.node for name in (*node.input, *node.output)}
    for info in [v for v in graph.value_info if v.name not in live]:
        graph.value_info.remove(info)
    drop_unused_initializers(graph)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    logger.info("fused %d attentions into MultiHeadAttention", len(replacements))
    return len(replacements)
