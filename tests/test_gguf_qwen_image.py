"""GGUF export of Qwen-Image: its original layout is diffusers' own names (diffusers' single-file mapping for
QwenImageTransformer2DModel is the identity), and a q4_0 file of the tiny Qwen-Image loads in unmodified diffusers
with every block weight bit-exact and draws diffquant's torch images."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'diffquant[gguf]')")

SIZE = {"height": 32, "width": 32}


def test_a_qwen_image_model_writes_diffusers_names_and_loads_back_in_diffusers(tiny_qwen_image_dir, tmp_path):
    """Qwen-Image: the layout covers the state dict and round-trips through diffusers' single-file mapping, and a
    q4_0 file of the tiny Qwen-Image loads through `QwenImageTransformer2DModel.from_single_file` with every block
    weight bit-exact and draws the same images."""
    import diffquant as dq
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    from diffquant.export.gguf import export_gguf, load_gguf
    from diffquant.models.denoisers import denoiser_of
    from diffquant.models.denoisers.layout import apply, check_covers, rows_of
    from diffquant.quantization.api import with_denoiser
    from diffquant.quantization.calibration import CalibrationConfig, capture_denoiser_inputs

    pipe = dq.load_pipeline(str(tiny_qwen_image_dir))
    family = denoiser_of(pipe)
    state = family.module.state_dict()
    layout = family.original_layout(rows_of(state))
    check_covers(layout, rows_of(state), family.name)
    convert = SINGLE_FILE_LOADABLE_CLASSES["QwenImageTransformer2DModel"]["checkpoint_mapping_fn"]
    back = convert(checkpoint={family.original_prefix + k: v for k, v in apply(layout, state).items()},
                   config=dict(family.config))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)

    calibration = capture_denoiser_inputs(pipe, ["a red circle"], CalibrationConfig(size=1, batch_size=1, steps=2,
                                                                                    **SIZE))
    quantized = dq.quantize(pipe, "q4_0", calibration=calibration)
    result = export_gguf(quantized, tmp_path / "gguf")
    assert result.arch == "qwen_image" and result.exact_layers == result.loaded_layers == result.block_tensors > 0
    assert result.dequantized_layers == []  # diffusers keeps no Qwen-Image Linear float at load
    # img_in and txt_in take 16 inputs (the tiny model's in_channels and text width): not a block, they stay float
    assert result.float_weights == ["img_in.weight", "txt_in.weight"]
    reader = gguf.GGUFReader(str(result.path))
    assert str(reader.fields["general.architecture"].contents()) == "qwen_image"
    names = {t.name for t in reader.tensors}
    assert names == set(state)
    blocks = {t.name for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_0}
    assert {"transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.img_mod.1.weight",
            "transformer_blocks.0.txt_mlp.net.2.weight", "norm_out.linear.weight", "proj_out.weight"} <= blocks
    loaded = with_denoiser(pipe, "transformer", load_gguf(pipe, result.path))
    torch_image = dq.generate(quantized, "a red circle", seed=3, steps=2, **SIZE)[0]
    gguf_image = dq.generate(loaded, "a red circle", seed=3, steps=2, **SIZE)[0]
    assert np.array_equal(np.asarray(torch_image), np.asarray(gguf_image))
