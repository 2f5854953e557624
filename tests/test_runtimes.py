"""The runtime registry, and float transformer graphs that ONNX Runtime loads and runs as torch does."""

import numpy as np
import pytest
import torch
from conftest import build_tiny_flux, build_tiny_sd3

from diffquant.models.denoisers import denoiser_of
from diffquant.core.errors import DiffquantError
from diffquant.export.onnx import export_fp32_onnx
from diffquant.runtimes import RUNTIMES, get_runtime
from diffquant.runtimes.onnxruntime import OnnxRuntime


def test_runtimes_are_found_by_name_and_an_unknown_one_lists_them():
    assert isinstance(get_runtime("onnxruntime"), OnnxRuntime) and "onnxruntime" in RUNTIMES
    with pytest.raises(DiffquantError, match="unknown runtime 'tensorrt': use one of onnxruntime"):
        get_runtime("tensorrt")


@pytest.mark.parametrize("build, batch", [(build_tiny_sd3, 3), (build_tiny_flux, 1)])
def test_float_transformer_graphs_run_in_onnx_runtime_as_in_torch(build, batch, tmp_path):
    """SD3's graph takes any batch; Flux's keeps its traced shapes (and its RMSNorm must load in ORT)."""
    family = denoiser_of(build())
    path = export_fp32_onnx(family.module, tmp_path / "fp32", sequence_length=16)
    assert path.name == "transformer.onnx"
    inputs = family.example_inputs(batch, 16, seed=1)
    with torch.no_grad():
        reference = family(inputs).numpy()
    runtime = get_runtime()
    assert np.abs(runtime.run(path, inputs) - reference).max() < 1e-4
    assert "DequantizeLinear" not in runtime.optimized_ops(path)


def test_a_graph_missing_an_input_names_it(tmp_path):
    family = denoiser_of(build_tiny_sd3())
    path = export_fp32_onnx(family.module, tmp_path / "fp32", sequence_length=16)
    inputs = family.example_inputs(2, 16)
    del inputs["pooled_projections"]
    with pytest.raises(DiffquantError, match="needs input\\(s\\) pooled_projections"):
        get_runtime().run(path, inputs)


def test_the_float_sd3_graph_stores_only_the_position_embeddings_it_uses(tmp_path):
    """SD3 slices a pos_embed_max_size² table (8 x 8 here, 384 x 384 at SD3.5) to the latent's patch grid
    (4 x 4): the graph's spatial size is fixed, so it keeps the 16-token crop, not the 64-token table."""
    import onnx
    from onnx import numpy_helper

    family = denoiser_of(build_tiny_sd3())
    path = export_fp32_onnx(family.module, tmp_path / "fp32", sequence_length=16)
    table = family.module.pos_embed.pos_embed  # (1, 64, 64)
    sizes = {tuple(numpy_helper.to_array(t).shape) for t in onnx.load(str(path)).graph.initializer}
    assert tuple(table.shape) not in sizes and (1, 16, 64) in sizes
    inputs = family.example_inputs(2, 16, seed=2)
    with torch.no_grad():
        reference = family(inputs).numpy()
    assert np.abs(get_runtime().run(path, inputs) - reference).max() < 1e-4
