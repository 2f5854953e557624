"""GGUF export of Z-Image: Tongyi-MAI's names (ComfyUI's Lumina 2 NextDiT's: fused attention.qkv, attention.out,
q_norm / k_norm, x_embedder, final_layer) round-trip through diffusers' own converter (on the tiny model and at
Z-Image's width), and a q4_0 file of the tiny Z-Image, arch "lumina2" as ComfyUI-GGUF names it, loads in unmodified
diffusers with every block weight bit-exact and draws the same images as diffquant's torch run, its Linears also
running the family's batched (graph) forward."""

import numpy as np
import pytest
import torch

from diffquant.models.denoisers import denoiser_for, denoiser_of
from diffquant.models.denoisers.layout import apply, check_covers, rows_of

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'diffquant[gguf]')")

SIZE = {"height": 32, "width": 32}


def test_z_image_layout_converts_back_at_z_image_width():
    """diffusers' Z-Image converter at Z-Image's width (dim 3840, 30 heads, its Qwen3-4B's 2560 caption features) with
    one block of each kind, on the meta device: names and shapes."""
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    from diffquant.models.architectures import Z_IMAGE_TRANSFORMER

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**{**Z_IMAGE_TRANSFORMER, "n_layers": 1, "n_refiner_layers": 1})
    state = model.state_dict()
    layout = denoiser_for(model).original_layout(rows_of(state))
    check_covers(layout, rows_of(state), "z-image")
    back = convert_z_image_transformer_checkpoint_to_diffusers(apply(layout, state))
    assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)
    assert {"x_embedder.weight", "final_layer.adaLN_modulation.1.weight", "layers.0.attention.qkv.weight",
            "noise_refiner.0.attention.out.weight", "context_refiner.0.attention.k_norm.weight",
            "x_pad_token", "cap_pad_token"} <= set(layout)
    assert apply(layout, state)["layers.0.attention.qkv.weight"].shape == (3 * 3840, 3840)


def test_a_z_image_model_writes_tongyis_names_and_loads_back_in_diffusers(tiny_z_image_dir, tmp_path):
    """Z-Image: the layout round-trips bit-exactly through diffusers' converter, and a q4_0 file of the tiny model
    loads through `ZImageTransformer2DModel.from_single_file` with every block weight bit-exact and draws the same
    images. The feed-forward's w2 (85 inputs) and cap_embedder.1 (16) are no multiple of 32: they stay float."""
    import diffquant as dq
    from diffusers.loaders.single_file_utils import (CHECKPOINT_KEY_NAMES,
                                                     convert_z_image_transformer_checkpoint_to_diffusers)

    from diffquant.export.gguf import export_gguf, load_gguf
    from diffquant.quantization.api import with_denoiser
    from diffquant.quantization.calibration import CalibrationConfig, capture_denoiser_inputs

    pipe = dq.load_pipeline(str(tiny_z_image_dir))
    family = denoiser_of(pipe)
    state = family.module.state_dict()
    layout = family.original_layout(rows_of(state))
    check_covers(layout, rows_of(state), family.name)
    assert sum(len(parts) > 1 for parts in layout.values()) == 4  # each block's fused qkv
    back = convert_z_image_transformer_checkpoint_to_diffusers(apply(layout, state))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)

    calibration = capture_denoiser_inputs(pipe, ["a red circle"], CalibrationConfig(size=1, batch_size=1, steps=2,
                                                                                    **SIZE))
    quantized = dq.quantize(pipe, "q4_0", calibration=calibration)
    result = export_gguf(quantized, tmp_path / "gguf")
    # ComfyUI-GGUF reads Z-Image files as arch "lumina2" (ComfyUI runs Z-Image as a Lumina 2 NextDiT)
    assert result.arch == "lumina2" and result.exact_layers == result.loaded_layers == BLOCK_LINEARS
    assert result.block_tensors == BLOCK_LINEARS - 2 * 4  # each block's q, k and v are one fused qkv in the file
    assert result.max_abs_difference == 0.0 and result.dequantized_layers == []
    assert result.float_weights == sorted(["cap_embedder.1.weight"] + [f"{b}.feed_forward.w2.weight" for b in BLOCKS])
    reader = gguf.GGUFReader(str(result.path))
    assert str(reader.fields["general.architecture"].contents()) == "lumina2"
    names = {t.name for t in reader.tensors}
    assert names == set(layout)
    assert set(CHECKPOINT_KEY_NAMES["z-image-turbo"]) & names  # the key diffusers' model-type detection reads
    # ComfyUI-GGUF's convert.py detects lumina2 by these two names
    assert {"cap_embedder.1.weight", "context_refiner.0.attention.qkv.weight"} <= names
    tensors = {t.name: t for t in reader.tensors}
    assert all(tensors[f"{b}.attention.qkv.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0 for b in BLOCKS)
    assert {"x_embedder.weight", "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight",
            "layers.0.attention.out.weight", "layers.0.adaLN_modulation.0.weight", "t_embedder.mlp.0.weight"} <= {
        n for n, t in tensors.items() if t.tensor_type == gguf.GGMLQuantizationType.Q4_0}
    # the pad tokens keep their (1, dim) shape (ComfyUI-GGUF's loader fixes files whose converter made them 1-D)
    assert [list(tensors[k].shape) for k in ("x_pad_token", "cap_pad_token")] == [[32, 1], [32, 1]]

    loaded_module = load_gguf(pipe, result.path)
    loaded = with_denoiser(pipe, "transformer", loaded_module)
    torch_images = dq.generate(quantized, "a red circle", seed=3, steps=2, **SIZE)
    gguf_images = dq.generate(loaded, "a red circle", seed=3, steps=2, **SIZE)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(torch_images, gguf_images))
    # the family's batched forward (the graph's) runs the GGUF Linears as it runs diffquant's quantized ones
    inputs = family.example_inputs(batch_size=2, sequence_length=64, latent=(16, 16))
    with torch.no_grad():
        torch_out = denoiser_of(quantized)(inputs)
        gguf_out = denoiser_for(loaded_module)(inputs)
        native = loaded_module(**family.forward_kwargs(inputs), return_dict=False)[0]  # the module's own lists
    assert torch.equal(torch_out, gguf_out)
    assert torch.equal(family.output_tensor(native)[:, :, 0], gguf_out)


BLOCKS = ["noise_refiner.0", "context_refiner.0", "layers.0", "layers.1"]
# Linears a Q4_0 block divides: per block q, k, v, out, w1, w3 (+ adaLN in the three modulated ones), x_embedder,
# the final linear and its adaLN, the timestep MLP's two
BLOCK_LINEARS = 6 * 4 + 3 + 3 + 2
