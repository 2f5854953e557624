"""Stage 6, export: the quantized denoiser (a UNet or a DiT, through its family in `denoisers`) to ONNX
through Quark's exporter, checked by onnx.checker and run in ONNX Runtime against the torch quantized
denoiser. The file is named after the pipeline attribute it replaces: `unet.onnx` or `transformer.onnx`."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffquant.core.artifacts import atomic_dir
from diffquant.export.model_card import base_model_of, facts_for, write_model_card
from diffquant.models.denoisers import Denoiser, denoiser_for, denoiser_of
from diffquant.core.errors import DiffquantError
from diffquant.core.cpu import resolve_int4_compute
from diffquant.quantization.backends import backend_of
from diffquant.runtimes import get_runtime
from diffquant.runtimes.onnxruntime import fuse_attention, run_onnx as run

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

    return MAX_RELATIVE_ERROR_WITH_OUTPUTS if backend_of(module).quantizes_outputs(module) else MAX_RELATIVE_ERROR


def onnx_name(family: Denoiser) -> str:
    """The exported graph's file name: the pipeline attribute it stands in for (`unet.onnx`, `transformer.onnx`)."""
    return f"{family.pipeline_attribute}.onnx"


def example_inputs(module: torch.nn.Module, batch_size: int = 2, sequence_length: int = 77,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Flat inputs of the denoiser `module`, shaped from its config by its family (nothing hard-coded to a
    model); the ONNX graph's inputs, in order."""
    return denoiser_for(module).example_inputs(batch_size, sequence_length, seed)


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


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


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
    elif batch_size is None:
        inputs = family.first_sample(inputs)
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

    model = onnx.load(str(path), load_external_data=False)
    fused = fuse_attention(model)
    if fused:
        onnx.save_model(model, str(path))
    return fused


def export_onnx(pipe_or_module, out_dir: str | Path, batch_size: int | None = None,
                sequence_length: int | None = None, check: bool = True,
                inputs: dict[str, torch.Tensor] | None = None, fuse_attention: bool = True,
                int4_compute: str | None = None, check_inputs=None, runtime: str = "onnxruntime") -> OnnxExport:
    """Export a quantized denoiser to `out_dir/unet.onnx` or `out_dir/transformer.onnx` with Quark, then check it.

    The un-frozen model is exported (a frozen one would write fake-quantized float weights, as big
    as fp32), then `compress_weights` stores every quantized weight as INT8 or FLOAT8E4M3FN codes
    feeding DequantizeLinear, bit-exact with Quark's fake-quantized weights, between Quark's trace and
    its graph passes so that those never hold the float weights (int4 Linears become
    com.microsoft.MatMulNBits with the backend's codes, see `diffquant.passes.matmul_nbits`), and
    the target runtime puts the graph in the form it fuses best (`Runtime.prepare_graph`: for ONNX Runtime,
    `prepare_for_ort_fusion`, the form its fusions turn into integer kernels, each attention one
    MultiHeadAttention; OpenVINO reads the plain QDQ graph and compiles it to the same int8 kernels).

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

        runtime: the runtime the file is written for (`diffquant.runtimes`); its operator counts are reported.
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

    from diffquant.passes.graph import own_quantization_constants, save_model

    if int4_compute is not None and int4_compute not in (*INT4_COMPUTE, "auto"):
        raise DiffquantError(f"unknown int4 compute {int4_compute!r}: use {', '.join(INT4_COMPUTE)} or auto")
    int4_compute = resolve_int4_compute(int4_compute)
    family, sequence_length = _family_and_length(pipe_or_module, sequence_length)
    module = family.module
    backend = backend_of(module)
    inputs = _trace_inputs(family, batch_size, sequence_length, inputs)
    names = list(inputs)
    wrapper = family.export_module(names).eval()
    feeds = [inputs, *_check_feeds(family, names, inputs, check_inputs)]
    with torch.no_grad():
        references = [wrapper(*feed.values()).float().cpu().numpy() for feed in feeds]
    out_dir = Path(out_dir)
    name = onnx_name(family)
    started = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        external = _param_bytes(module) >= EXTERNAL_DATA_ABOVE_BYTES
        with family.exportable():
            traced = backend.export_graph(module, wrapper, inputs, family.output_name, family.dynamic_axes(names),
                                          tmp, external, INT4_COMPUTE[int4_compute])
        model, nbits = traced.model, traced.nbits
        traced.model = None  # `del model` below frees it
        target = get_runtime(runtime)
        fusion = target.prepare_graph(model, fuse_attention)
        # Last, after every pass that may share constants: no quantization constant is shared between nodes.
        fusion["owned_constants"] = own_quantization_constants(model.graph)
        for leftover in tmp.iterdir():
            leftover.unlink()
        save_model(model, tmp / name, external)
        onnx.checker.check_model(str(tmp / name))
        seconds = time.perf_counter() - started
        path = out_dir / name
        ops = Counter(node.op_type for node in model.graph.node)
        weight_dtypes = Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer)
        discarded = tuple(f"{layer}." for layer in family.discarded_layers())
        missing = [name for name in missing_activation_quantizers(model, module) if not name.startswith(discarded)]
        del model
        # Checked before the folder is in place: a graph that fails its check leaves nothing behind.
        max_abs, relative = _worst_error(tmp / name, feeds, references)
        result = OnnxExport(
            path=path, size_bytes=sum(f.stat().st_size for f in tmp.iterdir()),
            inputs={k: list(v.shape) for k, v in inputs.items()}, op_counts=dict(ops.most_common()),
            max_abs_error=max_abs, relative_error=relative, export_seconds=seconds, weight_dtypes=dict(weight_dtypes),
            compression=traced.compression, fusion=fusion, relative_error_bound=relative_error_bound(module),
            fused_ops=target.optimized_ops(tmp / name), nbits=nbits, checked_calls=len(feeds),
        )
        if check and missing:
            raise DiffquantError(f"the ONNX graph {path} has no QuantizeLinear for {len(missing)} activation "
                                 f"quantizer(s) of the torch {family.name} (first: {missing[0]}): the export "
                                 "bypassed them")
        write_model_card(tmp, facts_for(module, base_model_of(pipe_or_module), "onnx", name, result.size_bytes))
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
    feeds = []
    for k in picks:
        flat = family.first_sample(family.graph_inputs(records[k]))
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

    activation_scales = backend_of(module).activation_scales
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    in_graph = {float(v) for node in graph.node
                if node.op_type == "QuantizeLinear" and node.input[0] not in initializers and node.input[1] in initializers
                for v in numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32).ravel()}
    return [name for name, scale in activation_scales(module).items()
            if any(float(v) not in in_graph for v in scale.float().flatten().numpy().astype(np.float32))]


def run_onnx(path: str | Path, inputs: dict[str, torch.Tensor], providers: list[str] | None = None) -> np.ndarray:
    """Run an exported denoiser in ONNX Runtime on flat torch inputs; returns the output as float32 numpy."""

    return run(path, inputs, providers)
