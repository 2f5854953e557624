"""The 8-bit peers a CPU user picks instead of diffquant, each made as its own tool makes it, on diffquant's fp32
ONNX export of the denoiser and calibrated on the same captured denoiser calls as diffquant's recipes:

- `nncf:int8`: NNCF's full post-training quantization of the OpenVINO model (`nncf.quantize`, transformer model
  type: int8 weights and activations), run in OpenVINO.
- `nncf:int8-hybrid`: optimum-intel's "hybrid" mode for diffusion models, as its `_hybrid_quantization` does it:
  int8 weight compression of every weighted MatMul (asymmetric, NNCF's 8-bit default; Convolutions left to the
  next step), then `nncf.quantize` of everything else (Convolutions' weights and activations, the activations
  of the MatMuls without weights: attention), SmoothQuant off, run in OpenVINO.
- `ort:static-int8`: ONNX Runtime's `quantize_static` (QDQ, int8 weights per output channel, uint8 activations
  with min-max ranges: its defaults, the path Olive takes) after its recommended `quant_pre_process` (ONNX shape
  inference and graph optimization; its symbolic shape inference stops on the fused attention, so it is skipped),
  run in ONNX Runtime.

The fp32 ONNX export is traced at the text length the pipeline feeds (read from the calibration calls); its
run in the peer's runtime is compared with torch's fp32 images first and the note says how close it is."""

from __future__ import annotations

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
    return [family.graph_inputs(record) for record in records]


def _checked(run: PeerRun, runtime: str, onnx_file: Path) -> str:
    """How close the fp32 graph in `runtime` comes to torch's fp32 images (a note), or PeerUnavailable."""
    try:
        return run.check(get_runtime(runtime).pipeline(run.pipe, onnx_file, torch.get_num_threads()), exact=False)
    except RuntimeError as error:  # a graph the runtime cannot run at the pipeline's shapes
        raise PeerUnavailable(f"the fp32 graph failed in {runtime} on this {denoiser_of(run.pipe).module_class} "
                              f"({' '.join(str(error).split())[:300]})") from None


def _weighted_matmuls(model) -> list[str]:
    """OpenVINO MatMul nodes whose one input is a constant (through Convert/Transpose): the layers with weights,
    as optimum-intel collects them for its hybrid mode."""
    def constant(value) -> bool:
        node = value.get_node()
        while node.get_type_name() in ("Convert", "Transpose", "Reshape") and node.inputs():
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    return [op.get_friendly_name() for op in model.get_ops()
            if op.get_type_name() == "MatMul" and any(constant(v) for v in op.input_values())]


def nncf_int8(run: PeerRun, hybrid: bool, out_dir: Path) -> Quantized:
    """`nncf:int8` / `nncf:int8-hybrid` (see the module docstring), saved as OpenVINO IR under `out_dir`."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    from diffquant.peers.four import ov_storage

    records = shared_calibration(run)
    onnx_file = _fp32_export(run, records, out_dir)
    note = _checked(run, "openvino", onnx_file)
    model = ov.Core().read_model(str(onnx_file))
    dataset = nncf.Dataset(_feeds("openvino", onnx_file, _graph_records(run, records)))
    if hybrid:
        weighted = _weighted_matmuls(model)
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                      ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
        model = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(records),
                              ignored_scope=nncf.IgnoredScope(names=weighted, validate=False),
                              advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alpha=-1))
    else:
        model = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(records))
    xml = out_dir / ("int8-hybrid" if hybrid else "int8") / "denoiser.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml), compress_to_fp16=False)  # FakeQuantize weights stored as int8 codes
    storage, _, int8_layers = ov_storage(ov.Core().read_model(str(xml)), bits_counted=8)
    storage = Storage(storage.quantized_weights, storage.quantized_bytes, xml.with_suffix(".bin").stat().st_size)
    notes = [f"OpenVINO fp32 vs torch fp32: {note}", f"{len(records)} calibration calls; OpenVINO runtime"]
    return Quantized(get_runtime("openvino").pipeline(run.pipe, xml, torch.get_num_threads()), int8_layers, storage,
                     notes)


def ort_static_int8(run: PeerRun, out_dir: Path) -> Quantized:
    """`ort:static-int8` (see the module docstring), saved under `out_dir`."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    records = shared_calibration(run)
    onnx_file = _fp32_export(run, records, out_dir)
    note = _checked(run, "onnxruntime", onnx_file)
    feeds = _feeds("onnxruntime", onnx_file, _graph_records(run, records))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self):
            return next(self._feeds, None)

    external = onnx_file.with_name(onnx_file.name + ".data").exists()
    prepared = out_dir / "prepared" / onnx_file.name
    prepared.parent.mkdir(parents=True, exist_ok=True)
    quant_pre_process(str(onnx_file), str(prepared), skip_symbolic_shape=True, save_as_external_data=external)
    quantized = out_dir / "static-int8" / onnx_file.name
    quantized.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, use_external_data_format=external)
    graph = onnx.load(str(quantized)).graph
    initializers = {t.name: t for t in graph.initializer}
    codes = [initializers[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear"
             and n.input[0] in initializers and initializers[n.input[0]].data_type == onnx.TensorProto.INT8
             and len(initializers[n.input[0]].dims) >= 2]
    weights = sum(int(np.prod(t.dims)) for t in codes)
    side = sum(int(np.prod(initializers[n.input[k]].dims)) * (4 if k == 1 else 1) for n in graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in {t.name for t in codes}
               for k in (1, 2) if len(n.input) > k and n.input[k] in initializers)
    total = sum(f.stat().st_size for f in quantized.parent.iterdir())
    notes = [f"ONNX Runtime fp32 vs torch fp32: {note}",
             f"{len(records)} calibration calls; QDQ, per-channel int8 weights, uint8 min-max activations"]
    return Quantized(get_runtime("onnxruntime").pipeline(run.pipe, quantized, torch.get_num_threads()), len(codes),
                     Storage(weights, weights + side, total), notes)


@register
class OrtStaticPeer(Peer):
    """ONNX Runtime's static quantizer (see `ort_static_int8`)."""

    libraries = ("ort",)
    kinds = {"static-int8": 8}
    required_packages = ("onnxruntime.quantization",)

    def quantize(self, run: PeerRun, kind: str, group: int | None) -> Quantized:
        return ort_static_int8(run, run.work_dir / f"ort-{kind}")
