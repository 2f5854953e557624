"""The 8-bit peers a CPU user picks instead of diffquant, each made as its own tool makes it, on diffquant's fp32
ONNX export of the denoiser and calibrated on the same captured denoiser calls as diffquant's recipes:

- `nncf:int8`, `nncf:int8-hybrid`: NNCF's full int8 quantization and optimum-intel's hybrid mode of the
  OpenVINO model (`diffquant.runtimes.openvino.nncf_int8`), run in OpenVINO.
- `ort:static-int8`: ONNX Runtime's `quantize_static` with its defaults after `quant_pre_process`
  (`diffquant.runtimes.onnxruntime.static`), run in ONNX Runtime.

The fp32 ONNX export is traced at the text length the pipeline feeds (read from the calibration calls); its
run in the peer's runtime is compared with torch's fp32 images first and the note says how close it is."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from diffquant.export.onnx import export_fp32_onnx
from diffquant.models.denoisers import denoiser_of
from diffquant.peers.base import Peer, PeerRun, PeerUnavailable, Quantized, Storage, register, shared_calibration
from diffquant.runtimes import get_runtime


def _feeds(runtime: str, onnx_file: Path, records) -> list[dict[str, np.ndarray]]:
    """The calibration calls as the graph's numpy feeds (its input names and dtypes), one per recorded call."""
    runner = get_runtime(runtime).runner(onnx_file)
    return [runner.feed(record) for record in records]


def _fp32_export(run: PeerRun, records, out_dir: Path) -> Path:
    family = denoiser_of(run.pipe)
    return export_fp32_onnx(family.module, out_dir / "fp32",
                            sequence_length=records[0]["encoder_hidden_states"].shape[1])


def _graph_records(run: PeerRun, records) -> list[dict[str, torch.Tensor]]:
    family = denoiser_of(run.pipe)
    return [family.first_sample(family.graph_inputs(record)) for record in records]


def fp32_checked(run: PeerRun, runtime: str, onnx_file: Path) -> str:
    """How close the fp32 graph in `runtime` comes to torch's fp32 images (a note), or PeerUnavailable when the
    runtime cannot run it at the pipeline's shapes."""
    try:
        return run.check(get_runtime(runtime).pipeline(run.pipe, onnx_file, torch.get_num_threads()), exact=False)
    except RuntimeError as error:  # a graph the runtime cannot run at the pipeline's shapes
        raise PeerUnavailable(f"the fp32 graph failed in {runtime} on this {denoiser_of(run.pipe).module_class} "
                              f"({' '.join(str(error).split())[:300]})") from None


def nncf_int8(run: PeerRun, hybrid: bool, out_dir: Path) -> Quantized:
    """`nncf:int8` / `nncf:int8-hybrid` (`diffquant.runtimes.openvino.nncf_int8`), saved under `out_dir`."""
    import openvino as ov

    from diffquant.runtimes.openvino.nncf_int8 import nncf_int8 as quantize

    records = shared_calibration(run)
    onnx_file = _fp32_export(run, records, out_dir)
    note = fp32_checked(run, "openvino", onnx_file)
    xml = quantize(onnx_file, _feeds("openvino", onnx_file, _graph_records(run, records)), hybrid,
                   out_dir / ("int8-hybrid" if hybrid else "int8"))
    storage, _, int8_layers = ov_storage(ov.Core().read_model(str(xml)), bits_counted=8)
    storage = Storage(storage.quantized_weights, storage.quantized_bytes, xml.with_suffix(".bin").stat().st_size)
    notes = [f"OpenVINO fp32 vs torch fp32: {note}", f"{len(records)} calibration calls; OpenVINO runtime"]
    return Quantized(get_runtime("openvino").pipeline(run.pipe, xml, torch.get_num_threads()), int8_layers, storage,
                     notes)


def ort_static_int8(run: PeerRun, out_dir: Path) -> Quantized:
    """`ort:static-int8` (`diffquant.runtimes.onnxruntime.static`), saved under `out_dir`."""
    from diffquant.runtimes.onnxruntime.static import int8_weight_storage, quantize_static_int8

    records = shared_calibration(run)
    onnx_file = _fp32_export(run, records, out_dir)
    note = fp32_checked(run, "onnxruntime", onnx_file)
    quantized = quantize_static_int8(onnx_file, _feeds("onnxruntime", onnx_file, _graph_records(run, records)),
                                     out_dir / "static-int8")
    layers, weights, stored = int8_weight_storage(quantized)
    total = sum(f.stat().st_size for f in quantized.parent.iterdir())
    notes = [f"ONNX Runtime fp32 vs torch fp32: {note}",
             f"{len(records)} calibration calls; QDQ, per-channel int8 weights, uint8 min-max activations"]
    return Quantized(get_runtime("onnxruntime").pipeline(run.pipe, quantized, torch.get_num_threads()), layers,
                     Storage(weights, stored, total), notes)


def ov_storage(model, bits_counted: int = 4) -> tuple[Storage, int, int]:
    """Storage of NNCF's `bits_counted`-bit weights (their codes plus the scale and zero-point constants of
    their decompression subgraph; the other layers count in the bytes only), the int4 and the int8 layer counts."""
    low = {"i4": 4, "u4": 4, "i8": 8, "u8": 8}
    candidates = [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant"
                  and op.get_output_element_type(0).get_type_name() in low]
    attached = {op.get_friendly_name(): _decompression_constants(op) for op in candidates}
    side = {c.get_friendly_name() for constants in attached.values() for c in constants}  # zero points, scales
    weights = stored = int4 = int8 = 0
    for op in candidates:
        if op.get_friendly_name() in side:
            continue
        bits = low[op.get_output_element_type(0).get_type_name()]
        int8 += bits == 8
        int4 += bits == 4
        if bits == bits_counted:
            weights += math.prod(op.get_output_shape(0))
            stored += _constant_bytes(op) + sum(_constant_bytes(c) for c in attached[op.get_friendly_name()])
    return Storage(weights, stored, 0), int4, int8


def _decompression_constants(op, depth: int = 4) -> list:
    """The constants (scales, zero points) that enter the Subtract/Multiply nodes decompressing `op`."""
    found, frontier = [], [op]
    for _ in range(depth):
        frontier = [target.get_node() for node in frontier for target in node.output(0).get_target_inputs()]
        for node in frontier:
            if node.get_type_name() not in ("Multiply", "Subtract"):
                continue
            for value in node.input_values():
                source = value.get_node()
                if source.get_type_name() == "Convert":  # a u8 zero point or f16 scale converted to f32
                    source = source.input_value(0).get_node()
                if source.get_type_name() == "Constant" and source.get_friendly_name() != op.get_friendly_name():
                    found.append(source)
    # An int8 weight's zero point is itself a u8 constant whose subgraph meets the weight: keep only the
    # smaller side (scales and zero points have one value per group or channel, never more than the weight).
    size = math.prod(op.get_output_shape(0))
    return list({c.get_friendly_name(): c for c in found if math.prod(c.get_output_shape(0)) < size}.values())


def _constant_bytes(op) -> int:
    element = op.get_output_element_type(0)
    return math.ceil(math.prod(op.get_output_shape(0)) * element.bitwidth / 8)


@register
class OrtStaticPeer(Peer):
    """ONNX Runtime's static quantizer (see `ort_static_int8`)."""

    libraries = ("ort",)
    kinds = {"static-int8": 8}
    required_packages = ("onnxruntime.quantization",)

    def quantize(self, run: PeerRun, kind: str, group: int | None) -> Quantized:
        return ort_static_int8(run, run.work_dir / f"ort-{kind}")
