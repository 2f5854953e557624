"""GGUF export of FLUX.2: Black Forest Labs' FLUX.2 names round-trip through diffusers' own converter (on the tiny
[klein] and at FLUX.2-dev's width), and a q4_0 file of the tiny FLUX.2 [klein] loads in unmodified diffusers with
every block weight bit-exact and draws the same images as diffquant's torch run."""

import numpy as np
import pytest
import torch

from diffquant.models.denoisers import denoiser_for, denoiser_of
from diffquant.models.denoisers.layout import apply, check_covers, rows_of

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'diffquant[gguf]')")

SIZE = {"height": 32, "width": 32}


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "klein"])
def test_flux2_layout_converts_back_at_flux2_width(guidance):
    """diffusers' FLUX.2 converter at FLUX.2-dev's width (6144, its default config) on the meta device: names and
    shapes (the values were checked once at that width, 2.29 B parameters in bf16, with random weights)."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = Flux2Transformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=guidance)
    state = model.state_dict()
    layout = denoiser_for(model).original_layout(rows_of(state))
    check_covers(layout, rows_of(state), "flux2")
    back = convert_flux2_transformer_checkpoint_to_diffusers(apply(layout, state))
    assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
            "single_stream_modulation.lin.weight"} <= set(layout)
    assert ("guidance_in.in_layer.weight" in layout) == guidance


def test_a_flux2_model_writes_bfls_names_and_loads_back_in_diffusers(tiny_flux2_dir, tmp_path):
    """FLUX.2 [klein]: the layout round-trips bit-exactly through diffusers' converter, and a q4_0 file of the tiny
    model loads through `Flux2Transformer2DModel.from_single_file` with every block weight bit-exact and draws the
    same images. Its x_embedder (16 inputs) and context_embedder (24) are no multiple of 32: they stay float."""
    import diffquant as dq
    from diffusers.loaders.single_file_utils import (CHECKPOINT_KEY_NAMES,
                                                     convert_flux2_transformer_checkpoint_to_diffusers)

    from diffquant.export.gguf import export_gguf, load_gguf
    from diffquant.quantization.api import with_denoiser
    from diffquant.quantization.calibration import CalibrationConfig, capture_denoiser_inputs

    pipe = dq.load_pipeline(str(tiny_flux2_dir))
    family = denoiser_of(pipe)
    state = family.module.state_dict()
    layout = family.original_layout(rows_of(state))
    check_covers(layout, rows_of(state), family.name)
    assert any(len(parts) > 1 for parts in layout.values())  # fused qkv and the swapped final modulation
    back = convert_flux2_transformer_checkpoint_to_diffusers(apply(layout, state))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)

    calibration = capture_denoiser_inputs(pipe, ["a red circle"], CalibrationConfig(size=1, batch_size=1, steps=2,
                                                                                    **SIZE))
    quantized = dq.quantize(pipe, "q4_0", calibration=calibration)
    result = export_gguf(quantized, tmp_path / "gguf")
    # ComfyUI-GGUF reads FLUX.2 files as arch "flux" (it has no "flux2"; ComfyUI tells them apart by their names)
    assert result.arch == "flux" and result.exact_layers == result.loaded_layers == 21  # every Linear but two
    assert result.block_tensors == 21 - 2 * 2  # each stream's q, k and v are one fused qkv tensor in the file
    assert result.max_abs_difference == 0.0
    assert result.float_weights == ["img_in.weight", "txt_in.weight"]
    reader = gguf.GGUFReader(str(result.path))
    names = {t.name for t in reader.tensors}
    assert {"double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_attn.qkv.weight",
            "single_blocks.0.linear1.weight", "final_layer.adaLN_modulation.1.weight"} <= names
    assert set(CHECKPOINT_KEY_NAMES["flux2"]) & names  # the key diffusers' model-type detection reads
    qkv = next(t for t in reader.tensors if t.name == "double_blocks.0.img_attn.qkv.weight")
    assert qkv.tensor_type == gguf.GGMLQuantizationType.Q4_0
    loaded = with_denoiser(pipe, "transformer", load_gguf(pipe, result.path))
    torch_images = dq.generate(quantized, "a red circle", seed=3, steps=2, **SIZE)
    gguf_images = dq.generate(loaded, "a red circle", seed=3, steps=2, **SIZE)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(torch_images, gguf_images))
