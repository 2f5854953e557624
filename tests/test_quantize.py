"""Quantization of a UNet: recipes become the Quark modules they claim; exclusions hold from both sides;
the original pipeline is untouched; a saved quantized UNet reloads to the same outputs (transformers:
test_backends.py)."""

import pytest
import torch

from diffquant import layer_report, quantize
from diffquant.core.errors import DiffquantError
from diffquant.export.onnx import example_inputs
from diffquant.evaluate.metrics import sqnr_db
from diffquant.core.recipes import PerChannel, Recipe, TensorQuant


def _output(unet):
    inputs = example_inputs(unet, batch_size=2, sequence_length=16, seed=3)
    with torch.no_grad():
        return unet(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("name, dtype, scheme", [
    ("int8-w", "int8", "per_tensor"), ("int8-w-pc", "int8", "per_channel"),
    ("fp8-w", "fp8_e4m3", "per_tensor"), ("fp8-w-pc", "fp8_e4m3", "per_channel"),
])
def test_recipe_quantizes_every_linear_and_conv_as_claimed(tiny_sd, name, dtype, scheme):
    n_layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in tiny_sd.unet.modules())
    n_params = sum(p.numel() for p in tiny_sd.unet.parameters())
    quantized = quantize(tiny_sd, name)
    report = layer_report(quantized.unet)
    assert len(report.quantized) == n_layers and not report.float_layers
    assert set(report.quantized.values()) == {f"{dtype} {scheme}"}
    assert sum(p.numel() for p in quantized.unet.parameters()) == n_params
    out = _output(quantized.unet)
    assert torch.isfinite(out).all()
    # Weight-only quantization of a random tiny UNet: int8 keeps > 25 dB, fp8 (3 mantissa bits) > 12 dB.
    assert sqnr_db(_output(tiny_sd.unet), out) > (25 if dtype == "int8" else 12)


def test_original_pipeline_is_left_untouched(tiny_sd):
    before = _output(tiny_sd.unet)
    quantized = quantize(tiny_sd, "int8-w")
    assert quantized.unet is not tiny_sd.unet and quantized.vae is tiny_sd.vae
    assert not layer_report(tiny_sd.unet).quantized
    assert torch.equal(before, _output(tiny_sd.unet))
    assert not torch.equal(before, _output(quantized.unet))


def test_exclusions_hold_from_both_sides(tiny_sd):
    quantized = quantize(tiny_sd, "int8-w", exclude=["conv_in", "time_embedding", "*attn2.to_k"])
    report = layer_report(quantized.unet)
    assert "conv_in" in report.float_layers
    assert {"time_embedding.linear_1", "time_embedding.linear_2"} <= set(report.float_layers)
    assert all(name.endswith("attn2.to_k") or name.startswith(("conv_in", "time_embedding"))
               for name in report.float_layers)
    assert "conv_out" in report.quantized and not any(n.endswith("attn2.to_k") for n in report.quantized)


def test_exclusion_matching_nothing_is_reported(tiny_sd):
    with pytest.raises(DiffquantError, match="matches no module"):
        quantize(tiny_sd, "int8-w", exclude=["conv_inn"])


def test_activation_recipe_refuses_empty_calibration(tiny_sd):
    w8a8 = Recipe("w8a8-test", TensorQuant("int8", PerChannel()), TensorQuant("int8"))
    with pytest.raises(DiffquantError, match="empty list"):
        quantize(tiny_sd, w8a8, calibration=[])


def test_saved_quantized_unet_reloads_to_identical_outputs(tiny_sd, tiny_sd_dir, tmp_path):
    from diffquant import load_quantized, save_quantized

    quantized = quantize(tiny_sd, "fp8-w-pc", exclude=["conv_out"])
    save_quantized(quantized, tmp_path / "q", model=str(tiny_sd_dir))
    reloaded = load_quantized(tmp_path / "q", device="cpu")
    assert torch.equal(_output(quantized.unet), _output(reloaded.unet))
    assert "conv_out" in layer_report(reloaded.unet).float_layers


@pytest.mark.parametrize("recipe", ["w8a8-int8", "w8a8-fp8", "w8a8-int8-sq"])
def test_saved_w8a8_unet_reloads_its_activation_scales(tiny_w8a8, tiny_sd_dir, tmp_path, recipe, monkeypatch):
    """The reload rebuilds Quark's modules and loads the saved state into them: Quark never quantizes
    (calibrates) again, and the calibrated activation scales are the ones used."""
    from diffquant import load_quantized, save_quantized
    from diffquant.quantization.backends.quark import internals

    quantized = tiny_w8a8(recipe)
    save_quantized(quantized, tmp_path / "q", model=str(tiny_sd_dir))
    monkeypatch.setattr(internals.import_quark().ModelQuantizer, "quantize_model", None)  # calling it would fail
    reloaded = load_quantized(tmp_path / "q", device="cpu")
    assert layer_report(reloaded.unet).quantized == layer_report(quantized.unet).quantized
    assert torch.equal(_output(quantized.unet), _output(reloaded.unet))
    saved, loaded = internals.activation_scales(quantized.unet), internals.activation_scales(reloaded.unet)
    assert saved and saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_a_version_1_quantized_unet_still_loads(tiny_int8_w, tiny_sd_dir, tmp_path):
    """Folders written before transformers were supported: type QuantizedUNet, no list of float layers."""
    import json

    from diffquant import load_quantized, save_quantized

    save_quantized(tiny_int8_w, tmp_path / "q", model=str(tiny_sd_dir))
    meta_file = tmp_path / "q" / "diffquant_quantized.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({"type": "QuantizedUNet", "version": 1, "model": meta["model"],
                                     "recipe": meta["recipe"]}))
    reloaded = load_quantized(tmp_path / "q", device="cpu")
    assert torch.equal(_output(tiny_int8_w.unet), _output(reloaded.unet))


def test_corrupt_quantized_artifact_is_one_clear_error(tiny_int8_w, tiny_sd_dir, tmp_path):
    from diffquant import load_quantized, save_quantized

    save_quantized(tiny_int8_w, tmp_path / "q", model=str(tiny_sd_dir))
    (tmp_path / "q" / "unet_quantized.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DiffquantError, match="corrupt"):
        load_quantized(tmp_path / "q", device="cpu")
