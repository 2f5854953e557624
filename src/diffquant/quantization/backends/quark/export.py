"""The Quark backend's ONNX export: Quark's exporter traces the quantized denoiser, diffquant compresses its
weights between that trace and Quark's own graph passes, and int4 Linears become ONNX Runtime MatMulNBits.
What comes out is a plain ONNX model that the export stage (`diffquant.export.onnx`) finishes and checks.

Quark's exporter has no hooks for what diffquant needs (dynamic axes, external data for models over 2 GB,
a pass between its trace and its optimizations), so its module-level functions are wrapped while it runs:
those wrappers are tied to amd-quark 0.13 and live here, beside the backend that pins it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from diffquant.core.artifacts import atomic_path
from diffquant.core.errors import DiffquantError
from diffquant.core.recipes import MXFP4
from diffquant.passes.codes import WeightCodes
from diffquant.passes.compression import compress_weights_in_file
from diffquant.passes.graph import EXTERNAL_DATA
from diffquant.passes.matmul_nbits import to_matmul_nbits
from diffquant.quantization.backends.base import TracedGraph
from diffquant.quantization.backends.quark import fourbit, internals


def trace(module: torch.nn.Module, wrapper: torch.nn.Module, inputs: dict[str, torch.Tensor], output_name: str,
          dynamic_axes: dict, folder: Path, external: bool, int4_level: int) -> TracedGraph:
    """Export `wrapper` (the flat-input form of the quantized `module`) into `folder` with Quark, its weights
    as integer codes, and load the result (external data read in). `int4_level`: MatMulNBits' accuracy_level."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    check_exportable(module)
    quark_torch = internals.import_quark(module.device)
    names = list(inputs)
    reports = []
    with (_dynamic_axes(dynamic_axes), _external_data_saves(external), torch.no_grad(),
          plain_int4_linears(module) as int4, _compress_before_quark_passes(module, reports)):
        quark_torch.export_onnx(wrapper, folder, tuple(inputs.values()), input_names=names,
                                output_names=[output_name])
    if len(reports) != 1:  # the wrapped pass function was not called once: another Quark's exporter
        raise DiffquantError("Quark's ONNX exporter did not run its graph passes as amd-quark 0.13 does, so "
                             "the weights were not compressed: install the amd-quark version diffquant pins")
    # The graph first: MatMulNBits replaces the int4 Linears' float weights before anything is read
    # (it reads their shapes only), so they are never in memory; then what stays is loaded.
    model = onnx.load(str(folder / "quark_model.onnx"), load_external_data=False)
    from diffquant.models.denoisers import denoiser_for

    # layers the module computes but never uses are not in the traced graph (Qwen-Image's last text stream)
    discarded = tuple(f"{name}." for name in denoiser_for(module).discarded_layers())
    int4 = {name: layer for name, layer in int4.items() if not f"{name}.".startswith(discarded)}
    nbits = to_matmul_nbits(model, {name: group_codes(layer) for name, layer in int4.items()},
                            int4_level).to_dict() if int4 else {}
    load_external_data_for_model(model, str(folder))
    return TracedGraph(model=model, compression=reports[0].to_dict(), nbits=nbits)


# --- what the weight passes receive -------------------------------------------------------------------

def weight_codes(layer: torch.nn.Module) -> WeightCodes:
    """The int8/fp8 codes of a quantized layer's weight, checked against Quark's fake-quantized weight."""
    codes, scale, kind = internals.weight_codes(layer)
    exact = torch.equal(codes.float() * scale, internals.fake_quantized_weight(layer))
    return WeightCodes(codes, scale, kind, exact, layer.weight.dtype)


def plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor | WeightCodes]:
    """The quantized denoiser under the parameter names of its float module: each int4 per-group Linear's
    weight as its codes (`group_codes`), every other tensor as it is (float layers, biases, norms). An
    SVDQuant layer without branch or smoothing (GPTQ alone) is its residual Linear; one with either, or an
    8-bit / MXFP4 weight, has no plain form here and is refused in one line."""
    from diffquant.quantization.backends.quark import svdquant

    codes, renamed = {}, {}
    for name, layer in module.named_modules():
        if svdquant.is_error_corrected(layer):
            if layer.correction is not None or layer.smooth_factor is not None:
                raise DiffquantError(f"{name}: an SVDQuant layer with a low-rank branch or smoothing has no plain "
                                     "int4 form (GGUF holds codes and scales only): use q4_0 or int4-w")
            renamed[f"{name}.layer."] = f"{name}."
        kind = fourbit.weight_kind(layer)
        if kind in ("int4", "uint4") or fourbit.is_int8_blocks(layer):
            plain = name[: -len(".layer")] if name.endswith(".layer") and f"{name}." in renamed else name
            codes[f"{plain}.weight"] = group_codes(layer)
        elif kind is not None:
            raise DiffquantError(f"{name}: its {kind} weight has no plain block form (GGUF blocks hold int4, uint4 or "
                                 "int8 codes with one scale per group): use q4_0, q4_1, int4-w or q8_0")
    state = {}
    for key, tensor in module.state_dict().items():
        if any(f"._{part}_quantizer." in key for part in ("weight", "input", "output")):
            continue
        prefix = next((p for p in renamed if key.startswith(p)), None)
        key = key if prefix is None else renamed[prefix] + key[len(prefix):]
        state[key] = codes.get(key, tensor)
    return state


def group_codes(layer: torch.nn.Module) -> WeightCodes:
    """The int4 / uint4 nibbles (or int8 block codes) and group scales (and uint4 zero points) of a Linear, checked
    against Quark's fake-quantized weight."""
    if fourbit.is_int8_blocks(layer):
        codes, scale, _ = internals.weight_codes(layer)
        exact = torch.equal(codes.float() * scale, internals.fake_quantized_weight(layer))
        groups = internals.weight_quantizer(layer).scale.detach().float()  # (N, K / group)
        return WeightCodes(codes, groups, "int8", exact, layer.weight.dtype)
    nibbles, scale, kind = fourbit.group_codes(layer)
    zero = fourbit.zero_points(layer) if kind == "uint4" else None
    exact = torch.equal(fourbit.dequantize_groups(nibbles, scale, kind, zero), internals.fake_quantized_weight(layer))
    return WeightCodes(nibbles, scale, kind, exact, layer.weight.dtype, zero)


def int4_linears(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """name -> each layer of `module` whose weight Quark quantizes to int4 per group."""
    return {name: layer for name, layer in module.named_modules() if fourbit.weight_kind(layer) == "int4"}


def check_recipes_exportable(recipes) -> None:
    """The same refusal as `check_exportable`, from the recipes alone: a run stops before any slow work."""

    mx = [r.name for r in recipes if r.weight.dtype == MXFP4]
    if mx:
        raise DiffquantError(f"{', '.join(mx)}: MXFP4 weights have no ONNX Runtime kernel, so they cannot be "
                             "exported; run them with --no-export (torch only) or export an int4 recipe")
    a4 = [r.name for r in recipes if r.algorithm is not None and r.algorithm.mode == "w4a4"]
    if a4:
        raise DiffquantError(f"{', '.join(a4)}: int4 activations have no ONNX Runtime kernel, so they cannot be "
                             "exported; run them with --no-export (torch only) or export svdquant-w4a16")
    blocks = [r.name for r in recipes if not r.has_onnx_form]
    if blocks:
        raise DiffquantError(f"{', '.join(blocks)}: int8 blocks (GGUF's Q8_0) and uint4 blocks (GGUF's Q4_1) are "
                             "what diffquant writes as GGUF only: export them with --format gguf, or use an ONNX "
                             "recipe (int8-w-pc, int4-w-gptq)")


def check_exportable(module: torch.nn.Module) -> None:
    """Refuse, in one line, a denoiser whose 4-bit weights ONNX Runtime cannot run (MXFP4) or whose int4
    Linears also quantize their inputs to int4 (SVDQuant w4a4: MatMulNBits takes float inputs, and the
    export would silently drop that rounding)."""
    mx = [name for name, layer in module.named_modules() if fourbit.weight_kind(layer) == "mxfp4"]
    if mx:
        raise DiffquantError(f"{len(mx)} layers have MXFP4 weights, which ONNX Runtime's CPU provider has no kernel "
                             "for (MatMulNBits takes integer codes): export an int4 recipe (int4-w, int4-w-conv8) "
                             "or run mxfp4-w in torch (--no-export)")
    asymmetric = [name for name, layer in module.named_modules() if fourbit.weight_kind(layer) == "uint4"]
    if asymmetric:
        raise DiffquantError(f"{len(asymmetric)} Linears have uint4 block weights (GGUF's Q4_1), which diffquant "
                             "writes as GGUF only: export them with --format gguf, or quantize with q4_0 for ONNX")
    blocks = [name for name, layer in module.named_modules() if fourbit.is_int8_blocks(layer)]
    if blocks:
        raise DiffquantError(f"{len(blocks)} Linears have int8 block weights (GGUF's Q8_0), which diffquant writes as "
                             "GGUF only: export them with --format gguf, or quantize with int8-w-pc for ONNX")
    a4 = [name for name, layer in int4_linears(module).items() if internals.input_quantizer(layer) is not None]
    if a4:
        raise DiffquantError(f"{len(a4)} int4 Linears also quantize their inputs to int4 (SVDQuant w4a4), which "
                             "ONNX Runtime has no kernel for (MatMulNBits takes float inputs): export "
                             "svdquant-w4a16 or run w4a4 in torch (--no-export)")


@contextlib.contextmanager
def plain_int4_linears(module: torch.nn.Module) -> Iterator[dict[str, torch.nn.Module]]:
    """While active, each int4 Linear of `module` is a plain `nn.Linear` sharing its float weight and bias,
    so that Quark's exporter writes it as a float MatMul/Gemm for `to_matmul_nbits` to replace."""
    layers = int4_linears(module)
    modules = dict(module.named_modules())
    for name, layer in layers.items():
        parent, _, attribute = name.rpartition(".")
        plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                device=layer.weight.device, dtype=layer.weight.dtype)
        plain.weight, plain.bias = layer.weight, layer.bias
        setattr(modules[parent] if parent else module, attribute, plain)
    try:
        yield layers
    finally:
        for name, layer in layers.items():
            parent, _, attribute = name.rpartition(".")
            setattr(modules[parent] if parent else module, attribute, layer)



@contextlib.contextmanager
def _dynamic_axes(dynamic_axes: dict):
    """Quark's export_onnx has no dynamic_axes argument; pass them through to the torch.onnx.export it calls."""
    original = torch.onnx.export

    def export(*args, **kwargs):
        kwargs.setdefault("dynamic_axes", dynamic_axes)
        return original(*args, **kwargs)

    torch.onnx.export = export
    try:
        yield
    finally:
        torch.onnx.export = original


@contextlib.contextmanager
def _external_data_saves(external: bool):
    """While active, onnx.save/save_model write external data (replacing a previous data file) when the
    model exported is large; small models keep the single self-contained file."""
    import onnx

    if not external:
        yield
        return
    original = onnx.save_model

    def save_model(proto, f, *args, **kwargs):
        path = Path(f)
        data = path.with_name(path.name + ".data")
        if isinstance(proto, onnx.ModelProto):
            if data.exists():
                data.unlink()  # onnx appends to an existing data file
            kwargs.update(EXTERNAL_DATA, location=data.name)
        return original(proto, f, *args, **kwargs)

    onnx.save_model = onnx.save = save_model
    try:
        yield
    finally:
        onnx.save_model = onnx.save = original


@contextlib.contextmanager
def _compress_before_quark_passes(module: torch.nn.Module, reports: list):
    """While active, Quark's export compresses the weights of the graph it traced (appending the
    `CompressionReport` to `reports`) before its own graph passes, and those passes see a large
    model's weights as graph inputs (`_weights_as_graph_inputs`). The passes load and re-save the
    whole model several times and onnxslim holds about seven copies of it: with float weights the
    export of an SD 1.5 W8A8 UNet peaked at 14.8 GB of resident memory, with int8 codes at 9.8 GB,
    with no weights in the passes at 6.6 GB (the trace; the passes stay at 4.1 GB, the quantized
    module's own size). With the float weights in, Quark's main onnxslim call failed and was
    skipped; now it runs (3,308 -> 2,240 nodes, shape arithmetic only). Quark's exporter has no hook
    between its trace and its passes, so its module-level function is wrapped for the duration."""
    import quark.torch.export.api as quark_export
    import quark.torch.export.onnx as quark_onnx

    original, fold_bias = quark_export.export_onnx_model_optimization, quark_onnx.fold_quantizers_for_bias
    modules = dict(module.named_modules())
    weighted = {name for name, m in modules.items() if internals.weight_quantizer(m) is not None}

    def optimize(onnx_path) -> None:
        reports.append(compress_weights_in_file(Path(onnx_path), lambda name: weight_codes(modules[name]),
                                                lambda node: internals.weight_dequantize_layer(node, weighted)))
        with _weights_as_graph_inputs(Path(onnx_path)):
            original(onnx_path)

    def fold_bias_if_every_conv_has_one(onnx_path) -> None:
        # Quark's pass reads every Conv's third input (its bias) and fails on a Conv without one (Sana's
        # point-wise convolutions); it folds int32 bias quantizers only, which no diffquant recipe makes.
        import onnx

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        if all(len(n.input) > 2 for n in graph.node if n.op_type in ("Conv", "ConvTranspose")):
            fold_bias(onnx_path)

    quark_export.export_onnx_model_optimization = optimize
    quark_onnx.fold_quantizers_for_bias = fold_bias_if_every_conv_has_one
    try:
        yield
    finally:
        quark_export.export_onnx_model_optimization = original
        quark_onnx.fold_quantizers_for_bias = fold_bias


def _write_graph(model, path: Path) -> None:
    """Write a model whose tensors are all small or external (the graph alone, well under 2 GB) as it is:
    onnx.save would convert and rewrite external data under `_external_data_saves`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(model.SerializeToString())


@contextlib.contextmanager
def _weights_as_graph_inputs(path: Path):
    """While active, the initializers of the ONNX file at `path` that live in external data are graph
    inputs of the same name, type and shape, and their data file is renamed aside, so that whatever
    loads and re-saves the file meanwhile handles a graph of a few MB. Afterwards they are initializers
    again, read from the renamed file. Does nothing to a model without external data."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    parked = {t.name: t for t in model.graph.initializer if uses_external_data(t)}
    if not parked:
        yield
        return
    renamed = {}
    for tensor in parked.values():
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = renamed.setdefault(entry.value, f"parked-{entry.value}")
    for location, aside in renamed.items():
        (path.parent / location).rename(path.parent / aside)
    kept = [t for t in model.graph.initializer if t.name not in parked]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                             for t in parked.values())
    _write_graph(model, path)
    yield
    model = onnx.load(str(path), load_external_data=False)
    inputs = [i for i in model.graph.input if i.name not in parked]
    present = {i.name for i in model.graph.input} & set(parked)  # a pass may drop an unused one
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.extend(t for name, t in parked.items() if name in present)
    _write_graph(model, path)

