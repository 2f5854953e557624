"""Small helpers over an ONNX graph shared by every pass (the backend's weight compression, QDQ fusion, attention).

Hand-written because they are two lines each over the protobuf graph; onnx-ir would need a model
round trip for each."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

# onnx.save_model's options for a model of 2 GB or more (protobuf cannot serialize it): every tensor in one
# external data file beside the graph.
EXTERNAL_DATA = {"save_as_external_data": True, "all_tensors_to_one_file": True, "size_threshold": 1024}


def read_tensor_names(graph) -> set[str]:
    """Every tensor name that a node or the graph's outputs read."""
    return {name for node in graph.node for name in node.input} | {o.name for o in graph.output}


def drop_unused_initializers(graph) -> None:
    """Remove the initializers nothing reads (e.g. float weights replaced by integer codes)."""
    used = read_tensor_names(graph)
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


# Inputs of these nodes that a runtime may rewrite for one node alone (ONNX Runtime's exact-int8 path turns
# an int8 weight into uint8 and moves its zero point by 128, node by node).
_QUANTIZATION_OPS = ("QuantizeLinear", "DequantizeLinear")


def own_quantization_constants(graph) -> int:
    """Give every QuantizeLinear/DequantizeLinear its own copy of each initializer it reads (codes, scale,
    zero point) that another node reads too; returns how many copies were made.

    Quark's export passes (onnxslim's constant deduplication) leave one zero-point initializer shared by
    every weight DequantizeLinear of equal value: ONNX Runtime's exact-int8 transform
    (`session.x64quantprecision`, on CPUs without VNNI) rewrites each weight's codes and zero point per
    node and fails to load the graph on the second rewrite of a shared one ("Attempt to replace the
    existing tensor"). The copies are scalars or per-channel vectors; a shared weight's codes are copied
    too (none in the diffusers denoisers). ONNX Runtime's ConstantSharing re-merges float scalars only,
    never int8 zero points. Hand-written: no ONNX tool un-shares initializers (they all deduplicate)."""
    initializers = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in set(node.input):
            readers[name] = readers.get(name, 0) + 1
    readers.update({o.name: readers.get(o.name, 0) + 1 for o in graph.output})
    copies = 0
    for node in graph.node:
        if node.op_type not in _QUANTIZATION_OPS:
            continue
        for k, name in enumerate(node.input):
            if name not in initializers or readers[name] < 2:
                continue
            readers[name] -= 1  # the last reader keeps the original
            copies += 1
            duplicate = type(initializers[name])()
            duplicate.CopyFrom(initializers[name])
            duplicate.name = f"{name}_{node.name or node.output[0]}"
            graph.initializer.append(duplicate)
            node.input[k] = duplicate.name
    return copies


def scope_layer(parts: list[str], names=None) -> str:
    """The module path of a node's torch ONNX scopes: torch names each module it calls by its path from the last
    non-numeric part ("mlp.0", "blocks.0", a ModuleDict's "2-1") under the module that called it. The parts merged
    ("t_embedder", "mlp", "mlp.0" -> "t_embedder.mlp.0"); given the module's layer `names`, the one that ends so and
    holds every part in order (a ModuleDict is in no scope: "2-1" -> "all_x_embedder.2-1"), if it is not one."""
    path = ".".join(p[len(q) + 1:] if q and p.startswith(q + ".") else p for q, p in zip(["", *parts], parts))
    if names is None or path in names:
        return path
    atoms = path.split(".")

    def holds(name: str) -> bool:
        rest = iter(name.split("."))
        return all(atom in rest for atom in atoms)

    found = [n for n in names if n.endswith("." + atoms[-1]) and holds(n)]
    return found[0] if len(found) == 1 else path


def consumers(graph) -> dict[str, list]:
    """Tensor name -> the nodes that read it (each node once)."""
    readers = defaultdict(list)
    for node in graph.node:
        for name in set(node.input):
            readers[name].append(node)
    return readers


def attribute(node, name: str, default):
    """The value of a node's attribute, or `default` when the node does not set it."""
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attribute(node, name: str, value) -> None:
    import onnx

    """Set (or replace) a node's attribute."""
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def save_model(model, path: Path, external: bool) -> None:
    """Write `model` to `path`; `external`: its tensors to `<name>.data` beside it (a model over 2 GB)."""
    import onnx

    if external:
        onnx.save_model(model, str(path), location=path.name + ".data", **EXTERNAL_DATA)
    else:
        onnx.save_model(model, str(path))
