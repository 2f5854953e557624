"""ONNX export through Quark: int8 weights stored as INT8 + DequantizeLinear, dynamic batch, named
inputs, ONNX Runtime reproduces the torch quantized UNet; SDXL's added conditioning is exported too."""

import numpy as np
import onnx
import pytest
import torch

from diffquant import export_onnx, quantize
from diffquant.export.onnx import MAX_RELATIVE_ERROR, example_inputs, run_onnx

pytestmark = pytest.mark.slow  # exports, full runs or benchmarks: `pytest -m 'not slow'` leaves them out


def test_int8_export_stores_int8_weights_and_runs_any_batch_in_ort(tiny_sd, tiny_int8_w_export):
    quantized, result = tiny_int8_w_export
    model = onnx.load(str(result.path))
    assert [i.name for i in model.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert result.op_counts["DequantizeLinear"] >= 10
    assert result.weight_dtypes.get("INT8", 0) >= 10
    assert result.relative_error <= MAX_RELATIVE_ERROR
    # Every Linear/Conv weight is stored as int8 codes, not as fake-quantized floats.
    int8_elements = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8)
    weight_elements = sum(m.weight.numel() for m in tiny_sd.unet.modules()
                          if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    assert int8_elements >= weight_elements
    for batch in (1, 3):
        inputs = example_inputs(quantized.unet, batch_size=batch, sequence_length=16)
        assert run_onnx(result.path, inputs).shape == (batch, 4, 8, 8)
    assert not [p for p in result.path.parent.parent.iterdir() if p.name.startswith(".")]  # no temp left behind


def test_sdxl_export_takes_the_added_conditioning(tiny_sdxl_int8_w_export):
    _, result = tiny_sdxl_int8_w_export
    assert list(result.inputs) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert result.inputs["encoder_hidden_states"][-1] == 64 and result.inputs["text_embeds"] == [2, 32]
    assert result.relative_error <= MAX_RELATIVE_ERROR


def test_a_wrong_export_fails_loudly(tiny_int8_w, tmp_path, monkeypatch):
    from diffquant.export import onnx as export_module
    from diffquant.core.errors import DiffquantError

    real = export_module.run_onnx
    monkeypatch.setattr(export_module, "run_onnx", lambda path, inputs: real(path, inputs) * 1.5)
    with pytest.raises(DiffquantError, match="the export is wrong"):
        export_onnx(tiny_int8_w, tmp_path / "bad")


@pytest.fixture(scope="module")
def tiny_fp8_w_pc_export(tiny_sd, tmp_path_factory):
    quantized = quantize(tiny_sd, "fp8-w-pc")
    return quantized, export_onnx(quantized, tmp_path_factory.mktemp("fp8-w-pc") / "fp8-w-pc")


@pytest.mark.parametrize("exported, kind", [("tiny_fp8_w_pc_export", "FLOAT8E4M3FN"), ("tiny_int8_w_export", "INT8")])
def test_compressed_weights_dequantize_to_quarks_bit_for_bit(exported, kind, request):
    from onnx import numpy_helper

    quantized, result = request.getfixturevalue(exported)
    n_layers = sum(hasattr(m, "_weight_quantizer") for m in quantized.unet.modules())
    assert result.compression["layers"] == result.compression["bit_exact_layers"] == n_layers
    model = onnx.load(str(result.path))
    initializers = {t.name: t for t in model.graph.initializer}
    weights_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and "_weight_quantizer" in n.name]
    assert not weights_q  # weights are stored quantized, not quantized at run time
    modules = dict(quantized.unet.named_modules())
    checked = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or "_weight_quantizer" not in node.name:
            continue
        codes = initializers[node.input[0]]
        assert onnx.TensorProto.DataType.Name(codes.data_type) == kind
        module = modules[node.input[0].rsplit(".weight_", 1)[0]]
        with torch.no_grad():
            fake = module._weight_quantizer(module.weight).numpy()
        if kind == "INT8":  # numpy has no float8: check int8 here; fp8 exactness is the report's count
            scale = numpy_helper.to_array(initializers[node.input[1]])
            scale = scale.reshape([-1] + [1] * (fake.ndim - 1)) if scale.ndim else scale
            stored = numpy_helper.to_array(codes)
            stored = stored.T if codes.name.endswith(".T") else stored  # a Linear's, stored for MatMul
            assert np.array_equal(stored.astype(np.float32) * scale, fake)
        checked += 1
    assert checked == n_layers
    assert result.relative_error <= MAX_RELATIVE_ERROR  # ONNX Runtime runs the fp8/int8 initializers
