"""NNCF's 8-bit quantization of an OpenVINO model, as a CPU user of OpenVINO picks it for a diffusion denoiser:

- full (`hybrid=False`): `nncf.quantize` with the transformer model type (int8 weights and activations);
- hybrid: optimum-intel's default for diffusion pipelines, as its `_hybrid_quantization` does it: int8 weight
  compression of every weighted MatMul (asymmetric, NNCF's 8-bit default; Convolutions left to the next step),
  then `nncf.quantize` of everything else (the Convolutions' weights and activations, the activations of the
  MatMuls without weights: attention), SmoothQuant off.

diffquant compares itself with them (`diffquant.peers.cpu`, `diffquant bench --peers`); nothing of diffquant's
own path uses them."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _weighted_matmuls(model) -> list[str]:
    """MatMul nodes with a constant input (through Convert/Transpose/Reshape): the layers with weights, as
    optimum-intel collects them for its hybrid mode."""
    def constant(value) -> bool:
        node = value.get_node()
        while node.get_type_name() in ("Convert", "Transpose", "Reshape") and node.inputs():
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    return [op.get_friendly_name() for op in model.get_ops()
            if op.get_type_name() == "MatMul" and any(constant(v) for v in op.input_values())]


def nncf_int8(fp32_onnx: str | Path, feeds: list[dict[str, np.ndarray]], hybrid: bool, out_dir: str | Path) -> Path:
    """The OpenVINO IR (`out_dir/denoiser.xml`) NNCF makes of `fp32_onnx`, calibrated on `feeds` (the graph's numpy
    inputs, one dict per recorded call); its FakeQuantize weights are stored as int8 codes."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    model = ov.Core().read_model(str(fp32_onnx))
    dataset = nncf.Dataset(feeds)
    if hybrid:
        weighted = _weighted_matmuls(model)
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                      ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
        model = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds),
                              ignored_scope=nncf.IgnoredScope(names=weighted, validate=False),
                              advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alpha=-1))
    else:
        model = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds))
    xml = Path(out_dir) / "denoiser.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml
