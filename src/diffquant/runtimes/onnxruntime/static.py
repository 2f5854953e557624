"""ONNX Runtime's own int8 quantizer, as a CPU user of ONNX Runtime (or Olive) would run it on a float
denoiser: `quant_pre_process` (ONNX shape inference and graph optimization; its symbolic shape inference stops
on the fused attention, so it is skipped), then `quantize_static` with its defaults (QDQ, int8 weights per output
channel, uint8 activations with min-max ranges) calibrated on recorded denoiser calls. diffquant compares itself
with it (`diffquant.peers.cpu`, `diffquant bench --peers`); nothing of diffquant's own path uses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _uses_external_data(path: Path) -> bool:
    """True when the graph keeps tensors outside the .onnx file (one file per tensor, as torch's exporter writes
    a model over protobuf's 2 GB, or one .data file)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in onnx.load(str(path), load_external_data=False).graph.initializer)


def quantize_static_int8(fp32_onnx: str | Path, feeds: list[dict[str, np.ndarray]], out_dir: str | Path) -> Path:
    """The QDQ int8 graph ONNX Runtime's `quantize_static` makes of `fp32_onnx`, calibrated on `feeds` (the graph's
    numpy inputs, one dict per recorded call), written to `out_dir/<the same file name>`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_onnx, out_dir = Path(fp32_onnx), Path(out_dir)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self):
            return next(self._feeds, None)

    external = _uses_external_data(fp32_onnx)
    prepared = out_dir / "prepared" / fp32_onnx.name
    prepared.parent.mkdir(parents=True, exist_ok=True)
    quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True, save_as_external_data=external,
                      all_tensors_to_one_file=True, external_data_location=prepared.name + ".data")
    quantized = out_dir / fp32_onnx.name
    quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, use_external_data_format=external)
    for leftover in prepared.parent.iterdir():
        leftover.unlink()
    prepared.parent.rmdir()
    return quantized


def int8_weight_storage(path: str | Path) -> tuple[int, int, int]:
    """(int8 weight layers, their weight elements, their stored bytes with scales and zero points) of a QDQ graph."""
    import onnx

    graph = onnx.load(str(path)).graph
    initializers = {t.name: t for t in graph.initializer}
    nodes = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers
             and initializers[n.input[0]].data_type == onnx.TensorProto.INT8 and len(initializers[n.input[0]].dims) >= 2]
    weights = sum(int(np.prod(initializers[n.input[0]].dims)) for n in nodes)
    side = sum(int(np.prod(initializers[n.input[k]].dims)) * (4 if k == 1 else 1) for n in nodes
               for k in (1, 2) if len(n.input) > k and n.input[k] in initializers)
    return len(nodes), weights, weights + side
