"""SVDQuant through Quark (backends/quark/svdquant.py) on a tiny UNet and a tiny SD3 transformer in fp32:
the transform alone computes the same function, and with int4 rounding it beats round-to-nearest int4 on the
same layers in denoiser-output SQNR on held-out captured inputs."""

import copy

import pytest
import torch

from diffquant import denoiser_of
from diffquant.quantization.backends.quark import internals
from diffquant.quantization.backends.quark.svdquant import apply_svdquant
from diffquant.quantization.calibration import CalibrationConfig, capture_denoiser_inputs
from diffquant.core.errors import DiffquantError
from diffquant.evaluate.metrics import sqnr_db
from diffquant.core.record import record_of

CALIBRATION = ["a red circle on a blue background", "a small green square", "a black triangle on a red background"]
HELD_OUT = ["a white star on a black background", "a large yellow circle on the right"]
# (pipeline fixture, group size, rank): every Linear of both tiny models has an input width the group divides.
MODELS = {"unet": ("tiny_sd", 8, 4), "sd3": ("tiny_sd3", 16, 8)}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    """(denoiser, group size, rank, calibration records, held-out records, its Linear names)."""
    fixture, group, rank = MODELS[request.param]
    pipe = request.getfixturevalue(fixture)
    settings = dict(steps=4, timesteps=2)
    calibration = capture_denoiser_inputs(pipe, CALIBRATION, CalibrationConfig(size=3, batch_size=3, **settings))
    held_out = capture_denoiser_inputs(pipe, HELD_OUT, CalibrationConfig(size=2, batch_size=2, seed=5, **settings))
    denoiser = denoiser_of(pipe).module
    layers = [name for name, layer in denoiser.named_modules() if type(layer) is torch.nn.Linear]
    return denoiser, group, rank, calibration, held_out, layers


def _outputs(denoiser, records) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([denoiser(**record, return_dict=False)[0].flatten() for record in records])


def _round_to_nearest(denoiser, layers, mode: str, group: int):
    """Quark's plain int4 per-group quantization of the same layers (the baseline SVDQuant must beat)."""
    from quark.torch import ModelQuantizer
    from quark.torch.quantization.config.config import Int4PerGroupSpec, QConfig, QLayerConfig

    internals.import_quark()
    weight = Int4PerGroupSpec(ch_axis=-1, is_dynamic=False, group_size=group).to_quantization_spec()
    inputs = Int4PerGroupSpec(ch_axis=-1, is_dynamic=True, group_size=group).to_quantization_spec() \
        if mode == "w4a4" else None
    keep = [n for n, m in denoiser.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n not in layers]
    config = QConfig(global_quant_config=QLayerConfig(weight=weight, input_tensors=inputs), exclude=keep)
    with torch.no_grad():
        return ModelQuantizer(config).quantize_model(copy.deepcopy(denoiser), None)


@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_svdquant_beats_round_to_nearest_int4(model, mode):
    denoiser, group, rank, calibration, held_out, layers = model
    quantized = apply_svdquant(copy.deepcopy(denoiser), calibration, layers, mode=mode, rank=rank, group_size=group)
    modules = dict(quantized.named_modules())
    for name in layers:  # each Linear is the residual's int4 QuantLinear beside a float low-rank branch
        quantizer = internals.weight_quantizer(modules[f"{name}.layer"])
        assert internals.describe(quantizer) == "int4 per_group", name
        assert (internals.input_quantizer(modules[f"{name}.layer"]) is not None) == (mode == "w4a4"), name
        assert internals.weight_quantizer(modules[f"{name}.correction.l1"]) is None, name
    assert {p.dtype for p in quantized.parameters()} == {torch.float32}
    reference = _outputs(denoiser, held_out)
    svdquant = sqnr_db(reference, _outputs(quantized, held_out))
    rtn = sqnr_db(reference, _outputs(_round_to_nearest(denoiser, layers, mode, group), held_out))
    assert svdquant > rtn + 1.0, f"SVDQuant {svdquant:.2f} dB vs round-to-nearest {rtn:.2f} dB"


def test_svdquant_without_rounding_computes_the_same_function(model):
    """Smoothing (x / s into W s) and the SVD split are exact: with the int4 rounding switched off the
    denoiser's output is the float one's (Quark's own `apply` leaves narrow layers scaled by s)."""
    denoiser, group, rank, calibration, held_out, layers = model
    quantized = apply_svdquant(copy.deepcopy(denoiser), calibration, layers, mode="w4a4", rank=rank, group_size=group)
    report = record_of(quantized).algorithm["layers"]
    assert any(report[name]["alpha"] is not None for name in layers)  # some layers really are smoothed
    internals.set_fake_quant([m for m in quantized.modules() if internals.is_quant_layer(m)], False)
    reference, transformed = _outputs(denoiser, held_out), _outputs(quantized, held_out)
    assert sqnr_db(reference, transformed) > 80


def test_svdquant_gptq_residual_beats_rounding_it_to_nearest(model):
    """GPTQ on the Hessian of x / s: Quark's int4 quantizer keeps the GPTQ weights as they are (no second
    rounding on its own scales), and the held-out output is closer to float than with a round-to-nearest residual."""
    denoiser, group, rank, calibration, held_out, layers = model
    settings = dict(rank=rank, group_size=group)
    nearest = apply_svdquant(copy.deepcopy(denoiser), calibration, layers, **settings)
    gptq = apply_svdquant(copy.deepcopy(denoiser), calibration, layers, gptq=True, **settings)
    for name in layers:
        residual = gptq.get_submodule(f"{name}.layer")
        assert torch.equal(internals.fake_quantized_weight(residual), residual.weight), name
    reference = _outputs(denoiser, held_out)
    # measured: +7.8 dB (UNet), +3.9 dB (SD3); with the Hessian of x instead of x / s, +1.0 dB on SD3
    assert sqnr_db(reference, _outputs(gptq, held_out)) > sqnr_db(reference, _outputs(nearest, held_out)) + 2.0


def _half(records):
    return [{k: v.half() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in r.items()} for r in records]


def test_svdquant_rounds_a_float16_denoiser_too(model):
    """Quark's ErrorCorrectedModule computes float16 inputs with the residual's raw weight; ours keeps the
    residual's quantizers in every dtype, so switching the rounding off changes a float16 model's output."""
    denoiser, group, rank, calibration, held_out, layers = model
    quantized = apply_svdquant(copy.deepcopy(denoiser).half(), _half(calibration), layers, rank=rank, group_size=group)
    assert {p.dtype for p in quantized.parameters()} == {torch.float16}
    reference, held_out = _outputs(denoiser, held_out), _half(held_out)
    rounded = sqnr_db(reference, _outputs(quantized, held_out))
    internals.set_fake_quant([m for m in quantized.modules() if internals.is_quant_layer(m)], False)
    assert rounded < sqnr_db(reference, _outputs(quantized, held_out)) - 10


def test_svdquant_rejects_a_group_size_that_does_not_divide_a_layer(tiny_sd, tiny_calibration):
    unet = tiny_sd.unet
    narrow = next(n for n, m in unet.named_modules() if type(m) is torch.nn.Linear and m.in_features % 32)
    with pytest.raises(DiffquantError, match=f"{narrow}.*group size 32"):
        apply_svdquant(copy.deepcopy(unet), tiny_calibration, [narrow], group_size=32)
    with pytest.raises(DiffquantError, match="conv_in.*not a Linear"):
        apply_svdquant(copy.deepcopy(unet), tiny_calibration, ["conv_in"], group_size=4)
    with pytest.raises(DiffquantError, match="mode 'w4a8'"):
        apply_svdquant(copy.deepcopy(unet), tiny_calibration, [narrow], mode="w4a8")


def test_svdquant_quantizes_a_layer_the_calibration_never_reaches_unsmoothed(tiny_sd, tiny_calibration):
    unet = copy.deepcopy(tiny_sd.unet)
    unet.unused = torch.nn.Linear(16, 16)  # a layer no forward calls (as a pipeline's optional branch)
    ran = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    quantized = apply_svdquant(unet, tiny_calibration, [ran, "unused"], rank=2, group_size=8, gptq=True)
    report = record_of(quantized).algorithm["layers"]
    assert report["unused"]["alpha"] is None and quantized.unused.smooth_factor is None
    assert internals.describe(internals.weight_quantizer(quantized.unused.layer)) == "int4 per_group"
    assert report[ran]["error"] is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rank_0_split_is_quarks_without_its_svd(dtype):
    """int4-w-gptq (rank 0) skips the SVD that Quark runs to keep none of it: the same L1, L2 and R."""
    from quark.torch.algorithm.svdquant.svdquant import _svd_decompose

    from diffquant.quantization.backends.quark import svdquant

    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    ours, quarks = svdquant._decompose(weight, 0), _svd_decompose(weight, 0)
    for a, b in zip(ours, quarks):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    assert svdquant._decompose(weight, 8)[0].shape == (8, 96)  # a real rank still goes through Quark's SVD
