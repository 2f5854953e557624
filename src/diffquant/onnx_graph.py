"""Small helpers over an ONNX graph shared by the backend's weight compression and the runtimes' rewrites.

Hand-written because they are two lines each over the protobuf graph; onnx-ir would need a model
round trip for each."""

from __future__ import annotations


def read_tensor_names(graph) -> set[str]:
    """Every tensor name that a node or the graph's outputs read."""
    return {name for node in graph.node for name in node.input} | {o.name for o in graph.output}


def drop_unused_initializers(graph) -> None:
    """Remove the initializers nothing reads (e.g. float weights replaced by integer codes)."""
    used = read_tensor_names(graph)
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
