"""ONNX export through Quark: int8 weights stored as INT8 + DequantizeLinear, dynamic batch, named
inputs, ONNX Runtime reproduces the torch quantized UNet; SDXL's added conditioning is exported too."""

import numpy as np
import onnx
import pytest
import torch

from diffquant import export_onnx, quantize_unet
from diffquant.export import MAX_RELATIVE_ERROR, example_inputs, run_onnx


def test_int8_export_stores_int8_weights_and_runs_any_batch_in_ort(tiny_sd, tmp_path):
    quantized = quantize_unet(tiny_sd, "int8-w")
    result = export_onnx(quantized, tmp_path / "int8")
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
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind


def test_sdxl_export_takes_the_added_conditioning(tiny_sdxl_dir, tmp_path):
    from diffquant import load_pipeline

    pipe = load_pipeline(str(tiny_sdxl_dir), device="cpu")
    result = export_onnx(quantize_unet(pipe, "int8-w"), tmp_path / "sdxl")
    assert list(result.inputs) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert result.inputs["encoder_hidden_states"][-1] == 64 and result.inputs["text_embeds"] == [2, 32]
    assert result.relative_error <= MAX_RELATIVE_ERROR


def test_a_wrong_export_fails_loudly(tiny_sd, tmp_path, monkeypatch):
    from diffquant import export as export_module
    from diffquant.errors import DiffquantError

    real = export_module.run_onnx
    monkeypatch.setattr(export_module, "run_onnx", lambda path, inputs: real(path, inputs) * 1.5)
    with pytest.raises(DiffquantError, match="the export is wrong"):
        export_onnx(quantize_unet(tiny_sd, "int8-w"), tmp_path / "bad")
