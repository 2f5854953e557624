"""GGUF export of Sana: NVlabs' Sana names round-trip through diffusers' own converter (on a tiny Sana and at Sana
1600M's width), and a q4_0 file of a tiny Sana loads in unmodified diffusers with every block weight bit-exact and
draws the same images as diffquant's torch run."""

import numpy as np
import pytest
import torch

from diffquant.models.denoisers import denoiser_for, denoiser_of
from diffquant.models.denoisers.layout import apply, check_covers, rows_of

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'diffquant[gguf]')")

SIZE = {"height": 32, "width": 32}


def test_sana_layout_converts_back_at_sana_width():
    """diffusers' Sana converter at SanaTransformer2DModel's defaults (Sana 1600M: 2240 wide, 20 blocks) on the meta
    device: names and shapes."""
    from diffusers import SanaTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_sana_transformer_to_diffusers

    with torch.device("meta"):
        model = SanaTransformer2DModel()
    state = model.state_dict()
    layout = denoiser_for(model).original_layout(rows_of(state))
    check_covers(layout, rows_of(state), "sana")
    back = convert_sana_transformer_to_diffusers(apply(layout, state))
    assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)
    assert {"blocks.19.attn.qkv.weight", "blocks.19.cross_attn.kv_linear.bias", "t_block.1.weight",
            "final_layer.scale_shift_table", "pos_embed", "y_embedder.y_embedding"} <= set(layout)


@pytest.mark.parametrize("variant", [{"qk_norm": "rms_norm_across_heads"}, {"guidance_embeds": True},
                                     {"attention_bias": True}], ids=["sana1.5", "sprint", "attention-bias"])
def test_sana_variants_diffusers_cannot_read_have_no_layout(variant):
    """Tensors diffusers' Sana converter has no original name for (so a file could not load back): refused."""
    from diffusers import SanaTransformer2DModel

    with torch.device("meta"):
        model = SanaTransformer2DModel(num_layers=1, **variant)
    with pytest.raises(ValueError, match="reads no original name"):
        denoiser_for(model).original_layout(rows_of(model.state_dict()))


def _sana_32_wide(tiny_sana_dir, folder):
    """The tiny Sana at widths GGUF's 32-weight blocks divide (the fixture's are 16, so all its Linears but the
    timestep embedder's first would stay float): the same classes, 2 heads of 16, a 32-wide Gemma-2 and captions."""
    from diffusers import SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    pipe = SanaPipeline.from_pretrained(str(tiny_sana_dir))
    torch.manual_seed(0)
    pipe.text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(pipe.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        attn_implementation="eager", pad_token_id=pipe.tokenizer.pad_token_id))
    pipe.transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                              num_attention_heads=2, attention_head_dim=16,
                                              num_cross_attention_heads=2, cross_attention_head_dim=16,
                                              cross_attention_dim=32, caption_channels=32, sample_size=16)
    pipe.save_pretrained(str(folder))
    return folder


def test_a_sana_model_writes_sanas_own_names_and_loads_back_in_diffusers(tiny_sana_dir, tmp_path):
    """Sana: the layout round-trips bit-exactly through diffusers' converter, and a q4_0 file of a 32-wide tiny Sana
    loads through `SanaTransformer2DModel.from_single_file` with every block weight bit-exact and draws the same
    images. Every Linear takes a multiple of 32 inputs; the feed-forward is convolutions, which stay float."""
    import diffquant as dq
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, convert_sana_transformer_to_diffusers

    from diffquant.export.gguf import export_gguf, load_gguf
    from diffquant.quantization.api import with_denoiser
    from diffquant.quantization.calibration import CalibrationConfig, capture_denoiser_inputs

    pipe = dq.load_pipeline(str(_sana_32_wide(tiny_sana_dir, tmp_path / "tiny-sana-32")))
    family = denoiser_of(pipe)
    state = family.module.state_dict()
    layout = family.original_layout(rows_of(state))
    check_covers(layout, rows_of(state), family.name)
    back = convert_sana_transformer_to_diffusers(apply(layout, state))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)

    calibration = capture_denoiser_inputs(pipe, ["a red circle"], CalibrationConfig(size=1, batch_size=1, steps=2,
                                                                                    **SIZE))
    quantized = dq.quantize(pipe, "q4_0", calibration=calibration)
    result = export_gguf(quantized, tmp_path / "gguf")
    # ComfyUI-GGUF has no Sana arch: "sana"
    linears = sum(isinstance(m, torch.nn.Linear) for m in family.module.modules())
    assert result.arch == "sana" and result.exact_layers == result.loaded_layers == linears == 14
    assert result.block_tensors == linears - 2 - 1  # q, k, v are one qkv tensor and the cross k, v one kv_linear
    assert result.max_abs_difference == 0.0 and result.dequantized_layers == []
    assert result.float_weights == ["blocks.0.mlp.depth_conv.conv.weight", "blocks.0.mlp.inverted_conv.conv.weight",
                                    "blocks.0.mlp.point_conv.conv.weight", "x_embedder.proj.weight"]
    reader = gguf.GGUFReader(str(result.path))
    assert str(reader.fields["general.architecture"].contents()) == "sana"
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(layout)
    assert set(CHECKPOINT_KEY_NAMES["sana"]) <= set(tensors)  # the keys diffusers' model-type detection reads
    for name in ("blocks.0.attn.qkv.weight", "blocks.0.cross_attn.kv_linear.weight", "t_block.1.weight",
                 "final_layer.linear.weight"):
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert tensors["pos_embed"].n_elements == tensors["y_embedder.y_embedding"].n_elements == 0
    loaded = with_denoiser(pipe, "transformer", load_gguf(pipe, result.path))
    torch_images = dq.generate(quantized, "a red circle", seed=3, steps=2, **SIZE)
    gguf_images = dq.generate(loaded, "a red circle", seed=3, steps=2, **SIZE)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(torch_images, gguf_images))
