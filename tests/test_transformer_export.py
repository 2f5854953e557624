"""Transformer denoisers (SD3's MMDiT, Flux) to ONNX and into ONNX Runtime: int8 weight codes on disk,
every quantized Linear on an integer kernel after ORT's fusions, and the transformer running in ORT
inside its pipeline (Flux's fixed-batch graph once per sample) with the images of torch fake-quant."""

import numpy as np
import onnx
import pytest
import torch
from conftest import FAMILY_CALLS, FAMILY_PROMPTS, tiny_images

from diffquant.models.denoisers import denoiser_of
from diffquant.core.errors import DiffquantError
from diffquant.export.onnx import MAX_RELATIVE_ERROR
from diffquant.runtimes.onnxruntime import ort_pipeline

pytestmark = pytest.mark.slow  # exports, full runs or benchmarks: `pytest -m 'not slow'` leaves them out

INTEGER_KERNELS = ("MatMulIntegerToFloat", "QGemm", "QLinearMatMul", "QLinearConv")


def _images(pipe, name: str) -> np.ndarray:
    return tiny_images(pipe, name)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def tiny(request, tiny_families):
    return tiny_families(request.param)


def _quantized(module, kind: str) -> list[torch.nn.Module]:
    return [m for m in module.modules() if hasattr(m, "_weight_quantizer") and kind in type(m).__name__]


def test_int8_weights_are_stored_as_int8_codes_bit_exact_with_quark(tiny):
    quantized, result = tiny.export("int8-w")
    module = denoiser_of(quantized).module
    assert result.path.name == "transformer.onnx"
    assert result.compression["layers"] == result.compression["bit_exact_layers"] == len(_quantized(module, ""))
    model = onnx.load(str(result.path))
    int8_elements = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8)
    assert int8_elements >= sum(m.weight.numel() for m in _quantized(module, ""))
    float_elements = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert float_elements < 0.5 * int8_elements  # biases, norms, scales: no float copy of the weights
    # Weight-only: ONNX Runtime runs every Linear as MatMulNBits (8-bit weights; its default accuracy level
    # quantizes the activations too: 0.57% from torch on SD3, 2e-7 at level 1): the 2-D ones once their Gemm
    # reads untransposed codes, and on Flux two whose per-tensor scales are bit-equal once these are vectors.
    assert result.fused_ops.get("MatMulNBits", 0) == len(_quantized(module, "Linear"))
    assert result.relative_error <= MAX_RELATIVE_ERROR


def test_w8a8_runs_every_quantized_linear_on_an_integer_kernel(tiny):
    """Parity alone proves nothing here: a graph that ORT runs in float (every Linear a float Gemm, as
    Flux's was before the rewrites) matches torch fake-quant exactly. The operators ORT runs are counted."""
    quantized, result = tiny.export("w8a8-int8")
    linears = _quantized(denoiser_of(quantized).module, "Linear")
    # SD3: 32 Linears (23 MatMulIntegerToFloat, 9 QGemm for the 2-D embedder and AdaLayerNorm Linears; its
    # patch-embedding Conv stays float without a quantized output); Flux: 30 (20 + 10).
    assert len(linears) == {"sd3": 32, "flux": 30}[tiny.name]
    fused = result.fused_ops
    assert fused.get("MatMulIntegerToFloat", 0) + fused.get("QGemm", 0) == len(linears)
    assert "Gemm" not in fused  # no Linear left as a float Gemm over dequantized weights
    assert result.relative_error <= MAX_RELATIVE_ERROR


def test_the_transformer_runs_in_onnx_runtime_inside_its_pipeline(tiny):
    quantized, result = tiny.export("w8a8-int8")
    ort = ort_pipeline(quantized, result.path)
    stand_in = getattr(ort, tiny.family.pipeline_attribute)
    assert stand_in.config == tiny.family.config and stand_in.dtype == torch.float32
    batches, run = [], stand_in.runner.run
    stand_in.runner.run = lambda inputs: batches.append(inputs["hidden_states"].shape[0]) or run(inputs)
    ort_images, torch_images = _images(ort, tiny.name), _images(quantized, tiny.name)
    # SD3: one graph call a step with both prompts and both guidance halves; Flux (guidance-distilled,
    # no negative pass): its batch-1 graph once per prompt and step.
    assert batches == {"sd3": [4, 4], "flux": [1, 1, 1, 1]}[tiny.name]
    noise = np.mean((ort_images - torch_images) ** 2)
    assert 10 * np.log10(1.0 / max(noise, 1e-20)) >= 40  # PSNR in dB on [0, 1] images
    # ... and the images are not the float pipeline's: the quantized transformer ran.
    assert not np.allclose(ort_images, _images(tiny.pipe, tiny.name), atol=1e-6)


def test_a_fixed_batch_graph_refuses_a_batch_it_cannot_split(tiny):
    if tiny.family.dynamic_batch:
        pytest.skip("a dynamic-batch graph takes any batch")
    quantized, result = tiny.export("w8a8-int8")
    record = {k: v for k, v in tiny.records[0].items()}
    stand_in = getattr(ort_pipeline(quantized, result.path), tiny.family.pipeline_attribute)
    stand_in.graph_batch = 2  # as if exported at batch 2, then called on 3 samples
    record["hidden_states"] = torch.cat([record["hidden_states"]] * 3)[:3]
    with pytest.raises(DiffquantError, match="exported for batch 2 and cannot take a batch of 3"):
        stand_in(**record)


def test_optimum_runs_the_exported_pipeline_with_diffquants_onnx_runtime_images(tiny, tmp_path):
    """The folder `export_pipeline` writes loads in Optimum's own pipeline class (ORTStableDiffusion3Pipeline,
    ORTFluxPipeline) and draws the images diffquant's ONNX Runtime pipeline draws from the same graph."""
    import json

    from optimum.onnxruntime import ORTDiffusionPipeline

    from diffquant.export.optimum import export_pipeline

    pytest.importorskip("optimum.onnxruntime", reason="the deploy extra: pip install -e '.[deploy]'")
    quantized, result = tiny.export("w8a8-int8")
    folder = export_pipeline(quantized, tmp_path / "folder", denoiser_onnx=result.path)
    info = json.loads((tmp_path / "folder" / "diffquant_pipeline.json").read_text())
    calls = {k: v for k, v in FAMILY_CALLS[tiny.name].items()}
    # What the graph fixes, which the caller must pass: the T5 length and the image size (16x16 for both tiny
    # models); FLUX.1 also batch 1.
    fixed = info["fixed_shape"]
    assert (fixed["max_sequence_length"], fixed["height"], fixed["width"]) == (calls["max_sequence_length"], 16, 16)
    assert fixed.get("batch") == (None if tiny.family.dynamic_batch else 1)
    # diffquant's graph itself (int8 codes; only its output renamed), plus the transformer's config.json.
    config_bytes = (tmp_path / "folder" / "transformer" / "config.json").stat().st_size
    assert abs(folder.components["transformer"] - config_bytes - result.size_bytes) < 64
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "folder" / "README.md")  # its snippet passes what the graph fixes
    assert card.data.library_name == "optimum" and "ORTDiffusionPipeline.from_pretrained" in card.text
    assert f"max_sequence_length={calls['max_sequence_length']}" in card.text
    assert "height=16, width=16" in card.text
    assert ("one prompt at a time" in card.text) == (not tiny.family.dynamic_batch)
    pipe = ORTDiffusionPipeline.from_pretrained(tmp_path / "folder")
    assert type(pipe).__name__ == {"sd3": "ORTStableDiffusion3Pipeline", "flux": "ORTFluxPipeline"}[tiny.name]
    pipe.set_progress_bar_config(disable=True)
    # FLUX.1's graph takes one sample: one prompt per call.
    groups = [FAMILY_PROMPTS] if tiny.family.dynamic_batch else [[p] for p in FAMILY_PROMPTS]
    optimum_images = np.concatenate([
        pipe(prompt=group, num_inference_steps=2, output_type="np", **calls,
             generator=[torch.Generator().manual_seed(7 + FAMILY_PROMPTS.index(p)) for p in group]).images
        for group in groups])
    ours = _images(ort_pipeline(quantized, result.path), tiny.name)
    # The same transformer graph in the same ONNX Runtime: only the text encoders and the VAE differ (ONNX
    # Runtime vs torch). Measured max 3.6e-7 (SD3) and 3.3e-7 (FLUX.1) on [0, 1] images, far below the 2e-3 of
    # half an 8-bit step: pixel-identical once saved as PNG.
    assert np.abs(optimum_images - ours).max() <= 1e-4


def test_export_command_writes_a_flux_folder_at_the_size_asked(tiny_flux_dir, tmp_path, capsys):
    """`export --pipeline --height --width`: FLUX.1's fixed graph traced at that size (the profile's default,
    1024x1024, would take minutes on the tiny model), and the fixed call printed."""
    import json

    from diffquant.cli.main import main

    assert main(["--quiet", "quantize", "--model", str(tiny_flux_dir), "--recipe", "int8-w",
                 "--out", str(tmp_path / "q")]) == 0
    assert main(["--quiet", "export", str(tmp_path / "q"), "--height", "16", "--out", str(tmp_path / "x")]) == 2
    assert "add --pipeline or leave them out" in capsys.readouterr().err
    assert main(["--quiet", "export", str(tmp_path / "q"), "--pipeline", "--height", "32", "--width", "32",
                 "--out", str(tmp_path / "deploy")]) == 0
    assert "call the pipeline with height=32, width=32" in capsys.readouterr().out
    fixed = json.loads((tmp_path / "deploy" / "diffquant_pipeline.json").read_text())["fixed_shape"]
    assert (fixed["height"], fixed["width"], fixed["batch"]) == (32, 32, 1)
