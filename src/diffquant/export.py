"""Stage 6, export: the quantized denoiser (a UNet or a DiT, through its family in `denoisers`) to ONNX
through Quark's exporter, checked by onnx.checker and run in ONNX Runtime against the torch quantized
denoiser. The file is named after the pipeline attribute it replaces: `unet.onnx` or `transformer.onnx`."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .artifacts import atomic_dir, atomic_path
from .denoisers import Denoiser, denoiser_for, denoiser_of
from .errors import DiffquantError

logger = logging.getLogger(__name__)
# ORT and Quark's torch fake-quant disagree by about one int8 step on a few values: Quark's symmetric
# scale is amax/127.5, so a tensor's extreme lands on a rounding boundary that the two round
# differently (weights), and W8A8 re-rounds activations that sit near a boundary. Measured here: 0.2%
# relative L2 error weight-only, 0.6% with W8A8 on shapes-sd; 5% catches a wrong graph (fp32 weights,
# missing Q/DQ, wrong scales all give > 10%) without failing on these rounding ties.
MAX_RELATIVE_ERROR = 0.05
# Quantizing Conv outputs as well (recipes with conv_output) re-rounds every Conv result, and ONNX
# Runtime's fused QLinearConv requantizes its int32 accumulator directly: measured 7.4% on shapes-sd
# (2.8% with ORT's graph optimizations off), while its images stay within the PSNR bound of the tests.
MAX_RELATIVE_ERROR_WITH_OUTPUTS = 0.10
# How ONNX Runtime multiplies int4 Linears -> MatMulNBits' accuracy_level (0: float, 4: int8 inputs).
INT4_COMPUTE = {"float": 0, "int8": 4}


def relative_error_bound(module: torch.nn.Module) -> float:
    """The ORT-vs-torch bound for this quantized denoiser: looser when layer outputs are quantized too."""
    outputs = any(getattr(m, "_output_quantizer", None) is not None for m in module.modules())
    return MAX_RELATIVE_ERROR_WITH_OUTPUTS if outputs else MAX_RELATIVE_ERROR


def onnx_name(family: Denoiser) -> str:
    """The exported graph's file name: the pipeline attribute it stands in for (`unet.onnx`, `transformer.onnx`)."""
    return f"{family.pipeline_attribute}.onnx"


def example_inputs(module: torch.nn.Module, batch_size: int = 2, sequence_length: int = 77,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Flat inputs of the denoiser `module`, shaped from its config by its family (nothing hard-coded to a
    model); the ONNX graph's inputs, in order."""
    return denoiser_for(module).example_inputs(batch_size, sequence_length, seed)


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


@dataclass
class OnnxExport:
    """What was exported, which operators ONNX Runtime runs after its fusions (`fused_ops`: an integer
    MatMulIntegerToFloat / QLinearConv / QLinearMatMul per quantized layer it fused), and how closely it
    reproduces the torch quantized denoiser."""

    path: Path
    size_bytes: int
    inputs: dict[str, list]
    op_counts: dict[str, int]
    max_abs_error: float
    relative_error: float
    export_seconds: float
    relative_error_bound: float = MAX_RELATIVE_ERROR
    weight_dtypes: dict[str, int] = field(default_factory=dict)
    compression: dict = field(default_factory=dict)
    fusion: dict = field(default_factory=dict)
    fused_ops: dict[str, int] = field(default_factory=dict)
    nbits: dict = field(default_factory=dict)  # int4 Linears written as MatMulNBits (matmul_nbits.NBitsReport)
    checked_calls: int = 1  # denoiser calls the errors were measured on (the worst is reported)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "size_bytes": self.size_bytes, "inputs": self.inputs,
                "op_counts": self.op_counts, "weight_dtypes": self.weight_dtypes, "compression": self.compression,
                "fusion": self.fusion, "fused_ops": self.fused_ops, "nbits": self.nbits,
                "max_abs_error": self.max_abs_error, "relative_error": self.relative_error,
                "relative_error_bound": self.relative_error_bound, "checked_calls": self.checked_calls,
                "export_seconds": self.export_seconds}


# Protobuf cannot serialize a model of 2 GB or more (an SD 1.5 UNet is 3.4 GB in fp32), and Quark's
# export passes re-save the whole model with plain onnx.save. Above this size every save writes
# the tensors to one external data file beside the graph instead.
EXTERNAL_DATA_ABOVE_BYTES = 1_800_000_000
_EXTERNAL_DATA = {"save_as_external_data": True, "all_tensors_to_one_file": True, "size_threshold": 1024}


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@contextlib.contextmanager
def _external_data_saves(model_bytes: int):
    """While active, onnx.save/save_model write external data (replacing a previous data file) when the
    model exported is large; small models keep the single self-contained file."""
    import onnx

    if model_bytes < EXTERNAL_DATA_ABOVE_BYTES:
        yield
        return
    original = onnx.save_model

    def save_model(proto, f, *args, **kwargs):
        path = Path(f)
        data = path.with_name(path.name + ".data")
        if isinstance(proto, onnx.ModelProto):
            if data.exists():
                data.unlink()  # onnx appends to an existing data file
            kwargs.update(_EXTERNAL_DATA, location=data.name)
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

    from .backends.quark.compress import compress_weights_in_file

    original = quark_export.export_onnx_model_optimization

    def optimize(onnx_path) -> None:
        reports.append(compress_weights_in_file(Path(onnx_path), module))
        with _weights_as_graph_inputs(Path(onnx_path)):
            original(onnx_path)

    quark_export.export_onnx_model_optimization = optimize
    try:
        yield
    finally:
        quark_export.export_onnx_model_optimization = original


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


def _save(model, path: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(model, str(path), location=path.name + ".data", **_EXTERNAL_DATA)
    else:
        onnx.save_model(model, str(path))


def _family_and_length(pipe_or_module, sequence_length: int | None) -> tuple[Denoiser, int | None]:
    """The denoiser family of a pipeline or a bare module, and the text length (a pipeline's tokenizers')."""
    if isinstance(pipe_or_module, torch.nn.Module):
        return denoiser_for(pipe_or_module), sequence_length
    family = denoiser_of(pipe_or_module)
    return family, sequence_length or family.sequence_length(pipe_or_module)


def _trace_inputs(family: Denoiser, batch_size: int | None, sequence_length: int | None,
                  inputs: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The example inputs the graph is traced with. A fixed-batch family is traced at batch 1 (runtimes
    call it once per sample), with the first sample of `inputs` when given."""
    if inputs is None:
        batch_size = batch_size or (2 if family.dynamic_batch else 1)
        inputs = family.example_inputs(batch_size, sequence_length)
    elif not family.dynamic_batch and batch_size is None:
        unbatched = set(family.unbatched_inputs)
        inputs = {k: v if k in unbatched else v[:1] for k, v in inputs.items()}
    names = family.input_names(inputs)
    return {k: inputs[k] for k in names}


def export_fp32_onnx(module: torch.nn.Module, out_dir: str | Path, sequence_length: int | None = 77,
                     batch_size: int | None = None, inputs: dict[str, torch.Tensor] | None = None,
                     fuse_attention: bool = True) -> Path:
    """Export the float denoiser (the reference for ONNX Runtime speed) to `out_dir/<unet|transformer>.onnx`,
    with the same named inputs and dynamic axes as the quantized export, and (`fuse_attention`) the same
    fused MultiHeadAttention, so that fp32 and int8 run the same attention kernel."""
    family = denoiser_for(module)
    inputs = _trace_inputs(family, batch_size, sequence_length, inputs)
    names = list(inputs)
    model_bytes = _param_bytes(module)
    with atomic_dir(Path(out_dir)) as tmp, family.exportable(), torch.no_grad():
        path = tmp / onnx_name(family)
        torch.onnx.export(family.export_module(names).eval(), tuple(inputs.values()), str(path),
                          input_names=names, output_names=[family.output_name], dynamo=False, opset_version=20,
                          dynamic_axes=family.dynamic_axes(names) or None,
                          external_data=model_bytes >= EXTERNAL_DATA_ABOVE_BYTES)
        if fuse_attention:
            _fuse_attention_in_file(path)
    return Path(out_dir) / onnx_name(family)


def _fuse_attention_in_file(path: Path) -> int:
    """Fuse the attentions of the ONNX file at `path` in place. Only the graph is read and rewritten:
    the weights of a large model stay in their external data files, untouched and never in memory."""
    import onnx

    from .runtimes.onnxruntime import fuse_attention

    model = onnx.load(str(path), load_external_data=False)
    fused = fuse_attention(model)
    if fused:
        onnx.save_model(model, str(path))
    return fused


def export_onnx(pipe_or_module, out_dir: str | Path, batch_size: int | None = None,
                sequence_length: int | None = None, check: bool = True,
                inputs: dict[str, torch.Tensor] | None = None, fuse_attention: bool = True,
                int4_compute: str | None = None, check_inputs=None) -> OnnxExport:
    """Export a quantized denoiser to `out_dir/unet.onnx` or `out_dir/transformer.onnx` with Quark, then check it.

    The un-frozen model is exported (a frozen one would write fake-quantized float weights, as big
    as fp32), then `compress_weights` stores every quantized weight as INT8 or FLOAT8E4M3FN codes
    feeding DequantizeLinear, bit-exact with Quark's fake-quantized weights, between Quark's trace and
    its graph passes so that those never hold the float weights (int4 Linears become
    com.microsoft.MatMulNBits with Quark's codes, see `backends.quark.matmul_nbits`), and
    `prepare_for_ort_fusion` puts the graph in the form ONNX Runtime fuses into integer kernels (and
    each attention into one MultiHeadAttention).

    Args:
        pipe_or_module: a pipeline from `quantize` (its tokenizers give the text length) or a bare
            quantized denoiser (UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel).
        out_dir: folder to write to (replaced atomically: an interrupted export leaves nothing behind).
        batch_size: batch of the example inputs (default 2; 1 for a family without a dynamic batch, Flux,
            whose graph keeps the batch it was traced with).
        sequence_length: text tokens of the example inputs (default: the pipeline tokenizers', or the family's).
        check: raise when ONNX Runtime's output differs from torch's by more than
            `relative_error_bound(module)` (False: only report it, for random-weight models whose
            activations sit on rounding ties far more often than a trained model's).
        inputs: flat example inputs to trace with instead of the family's (e.g. `family.flat_inputs(record)`
            of a calibration record): a family whose graph has fixed shapes (Flux) then runs at their
            image size and text length.
        fuse_attention: write each attention as one com.microsoft.MultiHeadAttention (ONNX Runtime's
            flash-attention kernel, exact in float; OpenVINO reads it too); False keeps torch's MatMul/Softmax.
        int4_compute: how ONNX Runtime multiplies the int4 Linears (`INT4_COMPUTE`): "float" dequantizes
            the weights and multiplies in float (exact to torch's fake quantization), "int8" lets it round
            each Linear's input to int8 per block and use integer dot products (MatMulNBits'
            accuracy_level 4: faster at group 128 and above on a CPU with VNNI, see `matmul_nbits`); "auto"
            picks int8 on a CPU with VNNI/AMX, float elsewhere; None (default) follows `cpu.decisions()`
            (DIFFQUANT_INT4_COMPUTE, else float).

        check_inputs: recorded denoiser calls (calibration records, forward-kwargs dicts) that the check runs
            too, besides the example inputs: real activations, at several timesteps, reach every quantizer
            the way generation does (random example inputs can sit outside the calibrated ranges). Up to
            `CHECK_CALLS` of them, spread over the timesteps; the error reported is the worst call's.

    The check also refuses a graph that bypasses a quantizer: every static activation quantizer of the
    torch module must have a QuantizeLinear with its scale in the graph (`missing_activation_quantizers`).

    Returns:
        An `OnnxExport` with the operators ONNX Runtime runs and the measured ORT-vs-torch error.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    from .backends.quark import import_quark
    from .backends.quark.matmul_nbits import check_exportable, plain_int4_linears, to_matmul_nbits
    from .onnx_graph import own_quantization_constants
    from .runtimes.onnxruntime import OnnxRuntime, prepare_for_ort_fusion

    from .cpu import resolve_int4_compute

    if int4_compute is not None and int4_compute not in (*INT4_COMPUTE, "auto"):
        raise DiffquantError(f"unknown int4 compute {int4_compute!r}: use {', '.join(INT4_COMPUTE)} or auto")
    int4_compute = resolve_int4_compute(int4_compute)
    family, sequence_length = _family_and_length(pipe_or_module, sequence_length)
    module = family.module
    check_exportable(module)
    quark_torch = import_quark(module.device)
    inputs = _trace_inputs(family, batch_size, sequence_length, inputs)
    names = list(inputs)
    wrapper = family.export_module(names).eval()
    feeds = [inputs, *_check_feeds(family, names, inputs, check_inputs)]
    with torch.no_grad():
        references = [wrapper(*feed.values()).float().cpu().numpy() for feed in feeds]
    out_dir = Path(out_dir)
    name = onnx_name(family)
    started = time.perf_counter()
    reports = []
    with atomic_dir(out_dir) as tmp:
        model_bytes = _param_bytes(module)
        with (_dynamic_axes(family.dynamic_axes(names)), _external_data_saves(model_bytes), family.exportable(),
              torch.no_grad(), plain_int4_linears(module) as int4, _compress_before_quark_passes(module, reports)):
            quark_torch.export_onnx(wrapper, tmp, tuple(inputs.values()), input_names=names,
                                    output_names=[family.output_name])
        if len(reports) != 1:  # the wrapped pass function was not called once: another Quark's exporter
            raise DiffquantError("Quark's ONNX exporter did not run its graph passes as amd-quark 0.13 does, so "
                                 "the weights were not compressed: install the amd-quark version diffquant pins")
        compression = reports[0]
        # The graph first: MatMulNBits replaces the int4 Linears' float weights before anything is read
        # (it reads their shapes only), so they are never in memory; then what stays is loaded.
        model = onnx.load(str(tmp / "quark_model.onnx"), load_external_data=False)
        nbits = to_matmul_nbits(model, int4, INT4_COMPUTE[int4_compute]).to_dict() if int4 else {}
        load_external_data_for_model(model, str(tmp))
        fusion = prepare_for_ort_fusion(model, fuse_attention).to_dict()
        # Last, after every pass that may share constants: no quantization constant is shared between nodes.
        fusion["owned_constants"] = own_quantization_constants(model.graph)
        for leftover in tmp.iterdir():
            leftover.unlink()
        _save(model, tmp / name, external=model_bytes >= EXTERNAL_DATA_ABOVE_BYTES)
        onnx.checker.check_model(str(tmp / name))
        seconds = time.perf_counter() - started
        path = out_dir / name
        ops = Counter(node.op_type for node in model.graph.node)
        weight_dtypes = Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer)
        missing = missing_activation_quantizers(model, module)
        del model
        # Checked before the folder is in place: a graph that fails its check leaves nothing behind.
        max_abs, relative = _worst_error(tmp / name, feeds, references)
        result = OnnxExport(
            path=path, size_bytes=sum(f.stat().st_size for f in tmp.iterdir()),
            inputs={k: list(v.shape) for k, v in inputs.items()}, op_counts=dict(ops.most_common()),
            max_abs_error=max_abs, relative_error=relative, export_seconds=seconds, weight_dtypes=dict(weight_dtypes),
            compression=compression.to_dict(), fusion=fusion, relative_error_bound=relative_error_bound(module),
            fused_ops=OnnxRuntime().optimized_ops(tmp / name), nbits=nbits, checked_calls=len(feeds),
        )
        if check and missing:
            raise DiffquantError(f"the ONNX graph {path} has no QuantizeLinear for {len(missing)} activation "
                                 f"quantizer(s) of the torch {family.name} (first: {missing[0]}): the export "
                                 "bypassed them")
        if check and not (math.isfinite(relative) and relative <= result.relative_error_bound):
            raise DiffquantError(f"ONNX Runtime output of {path} differs from the torch quantized {family.name} by "
                                 f"{relative:.1%} on {len(feeds)} call(s) (bound {result.relative_error_bound:.0%}, "
                                 f"max-abs {max_abs:.3g}): the export is wrong")
    logger.info("exported %s (%.1f MB), ORT vs torch: max-abs %.2e, relative %.2e",
                path, result.size_bytes / 1e6, max_abs, relative)
    return result


# Recorded calls the export check runs besides its example inputs (first, middle and last timestep).
CHECK_CALLS = 3


def _check_feeds(family: Denoiser, names: list[str], inputs: dict[str, torch.Tensor], records) -> list[dict]:
    """Flat graph inputs of up to `CHECK_CALLS` recorded calls spread over `records`, shaped as the graph
    was traced (a fixed-batch family's first sample); calls whose shapes the graph cannot take are left out."""
    if not records:
        return []
    n = len(records)
    picks = sorted({round(k * (n - 1) / max(CHECK_CALLS - 1, 1)) for k in range(min(CHECK_CALLS, n))})
    unbatched = set(family.unbatched_inputs)
    feeds = []
    for k in picks:
        flat = family.graph_inputs(records[k])
        if not family.dynamic_batch:
            flat = {key: v if key in unbatched else v[:1] for key, v in flat.items()}
        feed = {name: flat[name] for name in names if name in flat}
        fixed = not family.dynamic_batch
        if len(feed) == len(names) and all(
                feed[name].shape[1:] == inputs[name].shape[1:] and (not fixed or feed[name].shape == inputs[name].shape)
                for name in names):
            feeds.append(feed)
    return feeds


def _worst_error(path: Path, feeds: list[dict], references: list[np.ndarray]) -> tuple[float, float]:
    """Max-abs and relative L2 error of ONNX Runtime against torch, the worst over `feeds`."""
    worst_abs, worst_relative = 0.0, 0.0
    for feed, reference in zip(feeds, references):
        output = run_onnx(path, feed)
        worst_abs = max(worst_abs, float(np.abs(output - reference).max()))
        relative = float(np.linalg.norm(output - reference) / max(np.linalg.norm(reference), 1e-12))
        worst_relative = relative if not math.isfinite(relative) else max(worst_relative, relative)
    return worst_abs, worst_relative


def missing_activation_quantizers(model, module: torch.nn.Module) -> list[str]:
    """The static activation quantizers of `module` ('<layer>.input' / '<layer>.output') that have no
    QuantizeLinear of their scale in the ONNX `model`: a layer whose activations the graph leaves float
    while torch quantizes them. Matched by scale value (each calibrated scale is its own float)."""
    from onnx import numpy_helper

    from .backends import DEFAULT_BACKEND, get_backend

    activation_scales = get_backend(getattr(module, "diffquant_backend", DEFAULT_BACKEND)).activation_scales
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    in_graph = {float(v) for node in graph.node
                if node.op_type == "QuantizeLinear" and node.input[0] not in initializers and node.input[1] in initializers
                for v in numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32).ravel()}
    return [name for name, scale in activation_scales(module).items()
            if any(float(v) not in in_graph for v in scale.float().flatten().numpy().astype(np.float32))]


def run_onnx(path: str | Path, inputs: dict[str, torch.Tensor], providers: list[str] | None = None) -> np.ndarray:
    """Run an exported denoiser in ONNX Runtime on flat torch inputs; returns the output as float32 numpy."""
    from .runtimes.onnxruntime import run_onnx as run

    return run(path, inputs, providers)
