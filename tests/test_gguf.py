"""GGUF export: the original checkpoint layouts round-trip through diffusers' own converters, Q4_0 blocks are
GGML's layout, and a q4_0 file loads in unmodified diffusers with its weights bit-exact and its images equal to
diffquant's torch images; what GGUF cannot hold is refused in one line."""

import numpy as np
import pytest
import torch
from conftest import build_tiny_sd, build_tiny_sd3, build_tiny_sdxl

from diffquant.core.errors import DiffquantError
from diffquant.models.denoisers import denoiser_for, denoiser_of
from diffquant.models.denoisers.layout import apply, check_covers, rows_of

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'diffquant[gguf]')")


@pytest.mark.parametrize("build", [build_tiny_sd, build_tiny_sdxl, build_tiny_sd3], ids=["sd1", "sdxl", "sd3"])
def test_the_original_layout_converts_back_to_every_diffusers_tensor(build):
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)

    family = denoiser_of(build())
    state = family.module.state_dict()
    layout = family.original_layout(rows_of(state))
    check_covers(layout, rows_of(state), family.name)
    original = {family.original_prefix + k: v for k, v in apply(layout, state).items()}
    if family.module_class == "UNet2DConditionModel":
        back = convert_ldm_unet_checkpoint(original, family.module.config)
    else:
        back = convert_sd3_transformer_checkpoint_to_diffusers(original)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert any(len(parts) > 1 for parts in layout.values()) == (family.module_class != "UNet2DConditionModel")


def test_flux_layout_converts_back_at_flux_width():
    """diffusers' FLUX.1 converter is written for FLUX.1's width (3072): checked on the meta device at that width,
    names and shapes (the values were checked once at that width, 546 M parameters, with random weights)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    state = model.state_dict()
    layout = denoiser_for(model).original_layout(rows_of(state))
    back = convert_flux_transformer_checkpoint_to_diffusers(apply(layout, state))
    assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"} <= set(layout)


def test_q4_0_blocks_are_ggmls():
    from diffquant.export.gguf import pack_q4_0

    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (6, 64), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(6, 2, generator=gen) + 0.01).half().float()
    packed = pack_q4_0(codes, scale)
    assert packed.shape == (6, 2 * 18) and packed.dtype == np.uint8
    values = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q4_0)
    expected = (codes.float() - 8) * scale.repeat_interleave(32, dim=1)
    assert np.array_equal(values, expected.numpy())
    with pytest.raises(ValueError, match="not fp16 values"):
        pack_q4_0(codes, scale + 1e-5)


def test_q8_0_blocks_are_ggmls():
    from diffquant.export.gguf import pack_q8_0

    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (5, 96), generator=gen, dtype=torch.int8)
    scale = (torch.rand(5, 3, generator=gen) + 0.01).half().float()
    packed = pack_q8_0(codes, scale)
    assert packed.shape == (5, 3 * 34) and packed.dtype == np.uint8
    values = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(values, (codes.float() * scale.repeat_interleave(32, dim=1)).numpy())
    with pytest.raises(ValueError, match="int8 codes in blocks of 32"):
        pack_q8_0(codes[:, :40], scale)


@pytest.fixture(scope="module")
def shapes_q4_0(shapes_pipe, shapes_calibration):
    import diffquant as dq

    return dq.quantize(shapes_pipe, "q4_0", calibration=shapes_calibration)


def test_a_q4_0_file_loads_in_diffusers_bit_exact_and_draws_the_same_images(shapes_pipe, shapes_q4_0, tmp_path):
    import diffquant as dq
    from diffquant.export.gguf import export_gguf, load_gguf
    from diffquant.models.shapes.dataset import sample_captions
    from diffquant.quantization.api import with_denoiser

    result = export_gguf(shapes_q4_0, tmp_path / "gguf")
    assert result.gguf_type == "Q4_0" and result.arch == "sd1"
    assert result.loaded_layers == result.exact_layers == result.block_tensors == 83  # every Linear of shapes-sd
    assert result.max_abs_difference == 0.0
    assert len(result.float_weights) == 50  # every Conv2d stays F32 (diffusers' GGUF loader replaces Linears)
    reader = gguf.GGUFReader(str(result.path))
    names = [t.name for t in reader.tensors]
    assert all(n.startswith("model.diffusion_model.") for n in names)
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in names  # LDM names, as ComfyUI reads them
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "sd1"
    assert sum(t.tensor_type == gguf.GGMLQuantizationType.Q4_0 for t in reader.tensors) == 83

    gguf_pipe = with_denoiser(shapes_pipe, "unet", load_gguf(shapes_pipe, result.path))
    prompts = sample_captions(2, seed=17)
    torch_images = dq.generate(shapes_q4_0, prompts, seed=3, steps=6)
    gguf_images = dq.generate(gguf_pipe, prompts, seed=3, steps=6)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(torch_images, gguf_images))


def test_round_to_nearest_int4_loads_within_an_fp16_step(shapes_pipe, tmp_path):
    """int4-w is on the same grid with any fp16 scale: the loaders' fp16 multiply rounds some products, within
    half an fp16 step of each weight (checked by the export), so its file is close but not bit-exact."""
    import diffquant as dq
    from diffquant.export.gguf import export_gguf

    result = export_gguf(dq.quantize(shapes_pipe, "int4-w"), tmp_path / "gguf")
    assert result.loaded_layers == 83 and result.exact_layers < 83
    assert 0 < result.max_abs_difference < 1e-3


def test_a_q8_0_file_loads_in_diffusers_within_an_fp16_step_and_never_goes_to_onnx(shapes_pipe, shapes_calibration,
                                                                                  tmp_path):
    """q8_0: int8 codes chosen by GPTQ on GGML's Q8_0 blocks. Its scales keep all 11 fp16 bits (4 would make the
    loaders' products exact, at up to 2**-5 of a scale), so the file is within half an fp16 step of the fake
    quantization; it has no ONNX form and the ONNX export refuses it in one line."""
    import diffquant as dq
    from diffquant.export.gguf import export_gguf, load_gguf
    from diffquant.export.onnx import export_onnx
    from diffquant.models.shapes.dataset import sample_captions
    from diffquant.quantization.api import with_denoiser

    quantized = dq.quantize(shapes_pipe, "q8_0", calibration=shapes_calibration)
    result = export_gguf(quantized, tmp_path / "gguf")
    assert result.gguf_type == "Q8_0" and result.loaded_layers == result.block_tensors == 83
    assert 0 < result.max_abs_difference < 1e-3
    reader = gguf.GGUFReader(str(result.path))
    assert sum(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in reader.tensors) == 83
    prompts = sample_captions(2, seed=17)
    torch_images = dq.generate(quantized, prompts, seed=3, steps=6)
    gguf_images = dq.generate(with_denoiser(shapes_pipe, "unet", load_gguf(shapes_pipe, result.path)), prompts,
                              seed=3, steps=6)
    # Measured 71.9 and 77.0 dB (fp16 rounding of a few weights flips a few pixels by one level).
    assert min(dq.compare(torch_images, gguf_images, prompts).psnr_db) >= 60
    with pytest.raises(DiffquantError, match="writes as GGUF only"):
        export_onnx(quantized, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_q8_0_saves_its_int8_codes_and_fp16_scales_and_reloads_bit_exact(tiny_sd, tiny_sd_dir, tiny_calibration,
                                                                        tmp_path):
    from safetensors.torch import load_file

    import diffquant as dq
    from diffquant.quantization.backends.quark import fourbit

    quantized = dq.quantize(tiny_sd, "q8_0", calibration=tiny_calibration)
    dq.save_quantized(quantized, tmp_path / "q", model=str(tiny_sd_dir))
    saved = load_file(str(tmp_path / "q" / "unet_quantized.safetensors"))
    blocks = {n for n, m in quantized.unet.named_modules() if fourbit.is_int8_blocks(m)}
    assert blocks and all(saved[f"{n}.weight_int8"].dtype == torch.int8 and f"{n}.weight" not in saved
                          for n in blocks)  # codes, not float master weights
    assert all(saved[f"{n}._weight_quantizer.scale"].dtype == torch.float16 for n in blocks)
    reloaded = dq.load_quantized(tmp_path / "q", device="cpu")
    with torch.no_grad():  # recorded calls, as the other reload tests (random inputs differ by ~1e-7 for every recipe)
        for record in list(tiny_calibration)[:4]:
            assert torch.equal(quantized.unet(**record).sample, reloaded.unet(**record).sample)


def test_the_transformer_file_loads_through_diffusers_sd3_converter(tiny_sd3, tmp_path):
    import diffquant as dq
    from diffquant.export.gguf import export_gguf
    from diffquant.quantization.calibration import CalibrationConfig, capture_denoiser_inputs

    calibration = capture_denoiser_inputs(tiny_sd3, ["a red circle"], CalibrationConfig(size=1, batch_size=1, steps=2))
    result = export_gguf(dq.quantize(tiny_sd3, "q4_0", calibration=calibration), tmp_path / "gguf")
    assert result.arch == "sd3" and result.exact_layers == result.loaded_layers > 0
    names = {t.name for t in gguf.GGUFReader(str(result.path)).tensors}
    assert "joint_blocks.0.x_block.attn.qkv.weight" in names  # q, k and v stacked, as SD3's own checkpoints


@pytest.mark.parametrize(("recipe", "message"), [("w8a8-int8", "no GGML block grid"),
                                                 ("int8-w", "no GGML block grid")])
def test_what_gguf_cannot_hold_is_refused_in_one_line(tiny_sd, tiny_calibration, recipe, message, tmp_path):
    import diffquant as dq
    from diffquant.export.gguf import export_gguf

    quantized = dq.quantize(tiny_sd, recipe, calibration=tiny_calibration)
    with pytest.raises(DiffquantError, match=message):
        export_gguf(quantized, tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()


def test_export_command_writes_the_gguf_file_of_a_saved_quantized_model(tiny_sd, tiny_sd_dir, tmp_path, capsys):
    import diffquant as dq
    from diffquant.cli.main import main

    dq.save_quantized(dq.quantize(tiny_sd, "int4-w"), tmp_path / "q", model=str(tiny_sd_dir))
    assert main(["--quiet", "export", str(tmp_path / "q"), "--format", "gguf", "--out", str(tmp_path / "g")]) == 0
    assert "Q4_0" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(tmp_path / "g" / "unet.gguf"))
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q4_0 for t in reader.tensors)
    assert main(["--quiet", "export", str(tmp_path / "q"), "--format", "gguf", "--pipeline",
                 "--out", str(tmp_path / "g2")]) == 2  # Optimum's folder is ONNX: one line, no traceback
    assert "leave it out with --format gguf" in capsys.readouterr().err


@pytest.mark.slow
def test_run_with_a_gguf_recipe_draws_the_file_in_diffusers_and_records_it(tmp_path):
    import json

    from diffquant.cli.main import main

    out = tmp_path / "run"
    assert main(["--quiet", "run", "--recipes", "q4_0,q8_0", "--num-images", "2", "--calib-size", "4",
                 "--out", str(out)]) == 0
    recipes = json.loads((out / "results.json").read_text())["recipes"]
    q8 = recipes["q8_0"]  # GGUF only: no ONNX export, its GGUF file drawn in diffusers instead
    assert q8["onnx"] is None and q8["gguf"]["gguf_type"] == "Q8_0" and q8["gguf_images"]["vs_torch"]["psnr_db"] >= 60
    data = recipes["q4_0"]
    assert data["gguf"]["exact_layers"] == data["gguf"]["loaded_layers"] == 83
    assert (out / data["gguf"]["path"]).is_file() and len(data["gguf_images"]["images"]) == 2
    assert data["gguf_images"]["vs_torch"]["psnr_db"] >= 100  # the same images as diffquant's torch run
    card = (out / data["gguf"]["path"]).with_name("README.md").read_text()
    assert "| the GGUF file in diffusers | 2 |" in card and "image k uses seed 1024 + k" in card


def test_every_exported_folder_carries_a_model_card(shapes_pipe, shapes_q4_0, tmp_path):
    """The Hub's card form: front matter huggingface_hub reads, the recipe, which layers stay float and why, bits
    and bytes, and the loading snippet of the format; a run adds the fidelity table (test_run_with_a_gguf_recipe)."""
    from huggingface_hub import ModelCard

    from diffquant.export.gguf import export_gguf
    from diffquant.export.onnx import export_onnx

    for folder, export, fmt in ((tmp_path / "gguf", export_gguf, "gguf"), (tmp_path / "onnx", export_onnx, "onnx")):
        export(shapes_q4_0, folder)
        card = ModelCard.load(folder / "README.md")
        assert {"diffquant", "q4_0", fmt} <= set(card.data.tags)
        assert card.data.library_name == ("diffusers" if fmt == "gguf" else "onnx")
        text = card.text
        assert "83 layers take the recipe's weights" in text and "50 stay float" in text
        assert "Conv2d" in text and "4.50 bits per weight" in text
        assert ("from_single_file" in text) == (fmt == "gguf") and ("InferenceSession" in text) == (fmt == "onnx")
        assert "Not measured by the command that wrote this folder" in text


def test_a_wan_clip_model_writes_wans_own_names_and_loads_back_in_diffusers(tiny_wan_dir, tmp_path):
    """Wan: the layout round-trips through diffusers' converter, and a q4_0 file of the tiny Wan loads through
    `WanTransformer3DModel.from_single_file` with every block weight bit-exact and draws the same clips."""
    import diffquant as dq
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from diffquant.export.gguf import export_gguf, load_gguf
    from diffquant.quantization.api import with_denoiser
    from diffquant.quantization.calibration import CalibrationConfig, capture_denoiser_inputs

    pipe = dq.load_pipeline(str(tiny_wan_dir))
    family = denoiser_of(pipe)
    state = family.module.state_dict()
    layout = family.original_layout(rows_of(state))
    check_covers(layout, rows_of(state), family.name)
    back = convert_wan_transformer_to_diffusers(apply(layout, state))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)

    clip = {"height": 32, "width": 32, "frames": 5}
    calibration = capture_denoiser_inputs(pipe, ["a red circle"], CalibrationConfig(size=1, batch_size=1, steps=2,
                                                                                    **clip))
    quantized = dq.quantize(pipe, "q4_0", calibration=calibration)
    result = export_gguf(quantized, tmp_path / "gguf")
    assert result.arch == "wan" and result.exact_layers == result.loaded_layers == result.block_tensors > 0
    # diffusers' GGUF quantizer keeps Wan's time embedder float: it dequantizes those blocks at load (checked too)
    assert result.dequantized_layers == [f"condition_embedder.time_embedder.linear_{i}" for i in (1, 2)]
    names = {t.name for t in gguf.GGUFReader(str(result.path)).tensors}
    assert {"blocks.0.self_attn.q.weight", "blocks.1.cross_attn.o.weight", "head.head.weight"} <= names
    loaded = with_denoiser(pipe, "transformer", load_gguf(pipe, result.path))
    torch_clip = dq.generate(quantized, "a red circle", seed=3, steps=2, **clip)[0]
    gguf_clip = dq.generate(loaded, "a red circle", seed=3, steps=2, **clip)[0]
    assert np.array_equal(np.asarray(torch_clip), np.asarray(gguf_clip))


def test_q4_1_blocks_are_ggmls():
    """Q4_1: fp16 d, fp16 m, then the 32 codes two to a byte (code j low, j + 16 high). Known codes dequantize through
    the gguf package and diffusers' own fp16 dequantizer to d x q + m; the gguf package's own Q4_1 file of random
    weights, read back into codes, d and m, packs to the same bytes."""
    from diffusers.quantizers.gguf.utils import dequantize_blocks_Q4_1

    from diffquant.export.gguf import pack_q4_1
    from diffquant.quantization.backends.quark.fourbit import fp16_grid

    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (6, 64), generator=gen, dtype=torch.uint8)
    scale = fp16_grid(torch.rand(6, 2, generator=gen) + 0.01, positive=True, bits=7)  # a q4_1 recipe's scales
    zero = torch.randint(0, 16, (6, 2), generator=gen).float()
    packed = pack_q4_1(codes, scale, -scale * zero)
    assert packed.shape == (6, 2 * 20) and packed.dtype == np.uint8
    expected = (codes.float() - zero.repeat_interleave(32, dim=1)) * scale.repeat_interleave(32, dim=1)
    assert np.array_equal(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q4_1), expected.numpy())
    in_fp16 = dequantize_blocks_Q4_1(torch.from_numpy(packed.reshape(-1, 20)), 32, 20)
    assert in_fp16.dtype == torch.float16 and torch.equal(in_fp16.float().reshape(6, 64), expected)

    weights = np.random.default_rng(1).standard_normal((4, 96)).astype(np.float32)
    theirs = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q4_1)
    blocks = theirs.reshape(4, 3, 20)
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    values = torch.from_numpy(gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType.Q4_1))
    q = torch.round((values - m.repeat_interleave(32, dim=1)) / d.repeat_interleave(32, dim=1)).to(torch.uint8)
    assert np.array_equal(pack_q4_1(q, d, m), theirs)
    with pytest.raises(ValueError, match="not fp16 values"):
        pack_q4_1(codes, scale, -scale * zero + 1e-5)
    with pytest.raises(ValueError, match="codes are 0..15"):
        pack_q4_1(codes + 16, scale, -scale * zero)


def test_q4_1_is_a_gguf_only_recipe_with_7_bit_scales():
    from diffquant.core.recipes import (RECIPES, UINT4, PerGroup, Recipe, TensorQuant, gguf_scale_bits, gguf_type,
                                        recipe_from_dict)

    recipe = RECIPES["q4_1"]
    assert gguf_type(recipe) == "Q4_1" and gguf_scale_bits(recipe) == 7 and not recipe.has_onnx_form
    assert recipe_from_dict(recipe.to_dict()) == recipe
    with pytest.raises(DiffquantError, match="GGUF's Q4_1 blocks: format gguf"):
        Recipe("u4", TensorQuant(UINT4, PerGroup(32)))
    assert "q5_1" not in RECIPES  # Quark 0.13 has no 5-bit integer dtype to hold Q5_1's codes


@pytest.fixture(scope="module")
def shapes_q4_1(shapes_pipe, shapes_calibration):
    import diffquant as dq

    return dq.quantize(shapes_pipe, "q4_1", calibration=shapes_calibration)


def test_a_q4_1_file_loads_in_diffusers_bit_exact_and_draws_the_same_images(shapes_pipe, shapes_q4_1, tmp_path):
    """q4_1: GPTQ's codes, scales and zero points on GGML's Q4_1 grid (w = d x q + m, m = -d x z). Every scale keeps
    7 significant bits, so the loaders' fp16 d x q + m is the fake-quantized weight bit for bit: all 83 Linears of
    shapes-sd, and the images diffusers draws from the file are diffquant's torch images; its card says 5 bits per
    weight and the ONNX export refuses it in one line."""
    from huggingface_hub import ModelCard

    import diffquant as dq
    from diffquant.export.gguf import export_gguf, load_gguf
    from diffquant.export.onnx import export_onnx
    from diffquant.models.shapes.dataset import sample_captions
    from diffquant.passes.codes import WeightCodes
    from diffquant.quantization.api import with_denoiser
    from diffquant.quantization.backends import backend_of

    unet = shapes_q4_1.unet
    blocks = [v for v in backend_of(unet).plain_state(unet).values() if isinstance(v, WeightCodes)]
    assert len(blocks) == 83 and all(b.kind == "uint4" and b.exact for b in blocks)
    scales = torch.cat([b.scale.flatten() for b in blocks])
    mantissa, _ = torch.frexp(scales)
    assert torch.equal(mantissa * 2 ** 7, torch.round(mantissa * 2 ** 7))  # 7 significant bits
    zeros = torch.cat([b.zero.flatten() for b in blocks])
    assert zeros.min() >= 0 and zeros.max() <= 15 and len(zeros.unique()) > 8  # asymmetric: z is chosen per block

    result = export_gguf(shapes_q4_1, tmp_path / "gguf")
    assert result.gguf_type == "Q4_1" and result.arch == "sd1"
    assert result.loaded_layers == result.exact_layers == result.block_tensors == 83
    assert result.max_abs_difference == 0.0
    reader = gguf.GGUFReader(str(result.path))
    assert sum(t.tensor_type == gguf.GGMLQuantizationType.Q4_1 for t in reader.tensors) == 83
    gguf_pipe = with_denoiser(shapes_pipe, "unet", load_gguf(shapes_pipe, result.path))
    prompts = sample_captions(2, seed=17)
    torch_images = dq.generate(shapes_q4_1, prompts, seed=3, steps=6)
    gguf_images = dq.generate(gguf_pipe, prompts, seed=3, steps=6)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(torch_images, gguf_images))

    card = ModelCard.load(tmp_path / "gguf" / "README.md")
    assert {"diffquant", "q4_1", "gguf", "gguf-q4_1"} <= set(card.data.tags)
    assert "83 layers take the recipe's weights" in card.text and "5.00 bits per weight" in card.text
    with pytest.raises(DiffquantError, match="writes as GGUF only"):
        export_onnx(shapes_q4_1, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_q4_1_gptq_beats_round_to_nearest_on_the_same_grid(shapes_pipe, shapes_calibration, shapes_q4_1, tmp_path):
    """Round to nearest on the uint4 grid (Quark's min-max scale and zero point, the scale trimmed to 7 bits and the
    zero point taken again on it) is a Q4_1 file too, also bit-exact in diffusers; GPTQ's codes leave a smaller
    denoiser-output error on the calibration calls."""
    import diffquant as dq
    from diffquant.core.recipes import UINT4, PerGroup, Recipe, TensorQuant
    from diffquant.export.gguf import export_gguf

    nearest = dq.quantize(shapes_pipe, Recipe("q4_1-rtn", TensorQuant(UINT4, PerGroup(32)), format="gguf"))
    result = export_gguf(nearest, tmp_path / "gguf")
    assert result.gguf_type == "Q4_1" and result.loaded_layers == result.exact_layers == 83

    def error(pipe) -> float:
        with torch.no_grad():
            return sum(float((pipe.unet(**r).sample - shapes_pipe.unet(**r).sample).pow(2).sum())
                       for r in shapes_calibration)

    assert error(shapes_q4_1) < 0.8 * error(nearest)


def test_q4_1_saves_its_codes_and_zero_points_and_the_export_command_writes_its_file(
        tiny_sd, tiny_sd_dir, tiny_calibration, tmp_path, capsys):
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file

    import diffquant as dq
    from diffquant.cli.main import main
    from diffquant.quantization.backends.quark import fourbit

    quantized = dq.quantize(tiny_sd, "q4_1", calibration=tiny_calibration)
    dq.save_quantized(quantized, tmp_path / "q", model=str(tiny_sd_dir))
    saved = load_file(str(tmp_path / "q" / "unet_quantized.safetensors"))
    blocks = {n for n, m in quantized.unet.named_modules() if fourbit.weight_kind(m) == "uint4"}
    assert blocks and all(saved[f"{n}.weight_packed4"].dtype == torch.uint8 and f"{n}.weight" not in saved
                          and saved[f"{n}._weight_quantizer.zero_point"].dtype == torch.uint8
                          and saved[f"{n}._weight_quantizer.scale"].dtype == torch.float16 for n in blocks)
    reloaded = dq.load_quantized(tmp_path / "q", device="cpu")
    with torch.no_grad():
        for record in list(tiny_calibration)[:4]:
            assert torch.equal(quantized.unet(**record).sample, reloaded.unet(**record).sample)

    assert main(["--quiet", "export", str(tmp_path / "q"), "--format", "gguf", "--out", str(tmp_path / "g")]) == 0
    assert "Q4_1" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(tmp_path / "g" / "unet.gguf"))
    assert sum(t.tensor_type == gguf.GGMLQuantizationType.Q4_1 for t in reader.tensors) == len(blocks)
    assert "gguf-q4_1" in ModelCard.load(tmp_path / "g" / "README.md").data.tags
    assert main(["--quiet", "export", str(tmp_path / "q"), "--out", str(tmp_path / "o")]) == 2  # no ONNX form
    assert "writes as GGUF only" in capsys.readouterr().err
