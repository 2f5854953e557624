"""Calibration capture, W8A8 quantization with it, sensitivity analysis, and the W8A8 ONNX export."""

import onnx
import pytest
import torch

from diffquant import layer_report, quantize
from diffquant.quantization.calibration import (CalibrationConfig, CalibrationSet, calibrate, capture_denoiser_inputs,
                                   kept_step_indices, random_calibration)
from diffquant.models.denoisers.flux import FluxDenoiser
from diffquant.core.errors import DiffquantError
from diffquant.evaluate.metrics import sqnr_db

pytestmark = pytest.mark.slow  # exports, full runs or benchmarks: `pytest -m 'not slow'` leaves them out


def test_kept_timesteps_are_spread_over_the_trajectory():
    assert kept_step_indices(10, None) == list(range(10))
    assert kept_step_indices(10, 4) == [0, 3, 6, 9]
    assert kept_step_indices(25, 8)[0] == 0 and kept_step_indices(25, 8)[-1] == 24
    assert len(kept_step_indices(25, 8)) == 8
    assert kept_step_indices(3, 8) == [0, 1, 2]


def test_capture_records_every_kept_call_with_both_cfg_halves(tiny_sd, tiny_calibration):
    # 3 prompts in batches of 2 -> 2 pipeline calls; 3 kept steps each -> 6 UNet calls.
    assert len(tiny_calibration) == 6
    tiny_sd.scheduler.set_timesteps(6)
    schedule = [int(t) for t in tiny_sd.scheduler.timesteps]
    expected = [schedule[i] for i in kept_step_indices(6, 3)]
    assert tiny_calibration.timesteps == expected * 2
    first, last = tiny_calibration[0], tiny_calibration[5]
    assert first["sample"].shape == (4, 4, 8, 8)  # 2 prompts x (unconditional, conditional)
    assert last["sample"].shape == (2, 4, 8, 8)  # the third prompt alone
    assert first["encoder_hidden_states"].shape == (4, 16, 32)
    assert first["timestep"].shape == (4,)
    uncond, cond = first["encoder_hidden_states"].chunk(2)
    assert not torch.equal(uncond, cond)  # the empty prompt and the caption differ


def test_capture_records_sdxl_added_conditioning(tiny_sdxl):
    captured = capture_denoiser_inputs(tiny_sdxl, ["a red circle on a blue background"],
                                   CalibrationConfig(size=1, steps=4, timesteps=2))
    assert len(captured) == 2
    added = captured[0]["added_cond_kwargs"]
    assert added["text_embeds"].shape == (2, 32) and added["time_ids"].shape == (2, 6)


PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a black triangle on a red background"]


def _kept_schedule(pipe, steps: int, keep: int, scale: float = 1.0) -> list[float]:
    """The timesteps the pipeline itself set on its scheduler in the last run, at the kept steps."""
    schedule = [float(t) / scale for t in pipe.scheduler.timesteps]
    assert len(schedule) == steps
    return [schedule[i] for i in kept_step_indices(steps, keep)]


def test_sd3_capture_keeps_k_flow_matching_timesteps_with_both_cfg_halves(tiny_sd3):
    # 3 prompts in batches of 2 -> 2 pipeline calls; 3 of 7 steps kept -> 6 transformer calls.
    captured = capture_denoiser_inputs(tiny_sd3, PROMPTS, CalibrationConfig(steps=7, timesteps=3, batch_size=2,
                                                                            guidance=4.0))
    assert len(captured) == 6
    expected = _kept_schedule(tiny_sd3, 7, 3)  # the shifted sigmas x 1000 of FlowMatchEulerDiscreteScheduler
    assert captured.timesteps[:3] == pytest.approx(expected) and captured.timesteps[3:] == captured.timesteps[:3]
    assert len(set(captured.timesteps)) == 3
    first, last = captured[0], captured[5]
    assert set(first) == {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"}
    assert first["hidden_states"].shape == (4, 4, 8, 8)  # 2 prompts x (unconditional, conditional)
    assert last["hidden_states"].shape == (2, 4, 8, 8)  # the third prompt alone
    assert first["encoder_hidden_states"].shape == (4, 16 + 256, 64)  # CLIP tokens + the profile's 256 T5 tokens
    assert first["timestep"].shape == (4,) and float(first["timestep"][0]) == pytest.approx(expected[0])
    uncond, cond = first["encoder_hidden_states"].chunk(2)
    assert not torch.equal(uncond, cond)  # the empty prompt and the captions differ
    assert not torch.equal(*first["pooled_projections"].chunk(2))
    with torch.no_grad():  # records are forward kwargs the transformer takes as they are
        assert torch.isfinite(tiny_sd3.transformer(**first, return_dict=False)[0]).all()


def test_flux_capture_carries_the_guidance_asked_for(tiny_flux):
    captured = capture_denoiser_inputs(tiny_flux, PROMPTS[:2], CalibrationConfig(
        steps=5, timesteps=2, guidance=2.5, batch_size=2, height=32, width=32))
    assert len(captured) == 2  # one pipeline call, 2 of 5 steps; FLUX.1-dev runs no classifier-free guidance
    assert captured.timesteps == pytest.approx(_kept_schedule(tiny_flux, 5, 2, scale=1000))  # sigmas
    record = captured[0]
    assert set(record) == set(FluxDenoiser.capture_keys)
    assert record["guidance"].tolist() == [2.5, 2.5]  # not the profile's 3.5
    assert record["hidden_states"].shape == (2, (32 // 2 // 2) ** 2, 16)  # (B, packed tokens, 4 x latent channels)
    assert record["encoder_hidden_states"].shape == (2, 512, 64)  # FLUX.1-dev's T5 length from its profile
    with torch.no_grad():
        assert torch.isfinite(tiny_flux.transformer(**record, return_dict=False)[0]).all()


def test_flux_schnell_records_have_no_guidance(tiny_flux_schnell_dir):
    from diffquant import load_pipeline

    schnell = load_pipeline(str(tiny_flux_schnell_dir), device="cpu")
    captured = capture_denoiser_inputs(schnell, PROMPTS[:1], CalibrationConfig(steps=2, timesteps=1, height=32,
                                                                               width=32))
    assert len(captured) == 1 and "guidance" not in captured[0]
    assert captured[0]["encoder_hidden_states"].shape[1] == 256  # FLUX.1-schnell's T5 length


@pytest.mark.parametrize("fixture, attribute", [("tiny_sd3", "transformer"), ("tiny_flux", "transformer"),
                                                ("tiny_sd", "unet")])
def test_random_calibration_feeds_every_family(fixture, attribute, request):
    pipe = request.getfixturevalue(fixture)
    module = getattr(pipe, attribute)
    calibration = calibrate(pipe, "random", size=3)
    assert len(calibration) == 3 and calibration.description["denoiser_calls"] == 3
    timesteps = torch.cat([item["timestep"].flatten().float() for item in calibration])
    assert timesteps.unique().numel() > 1  # uniform draws, not the example's one value
    with torch.no_grad():
        for item in calibration:
            assert torch.isfinite(module(**item, return_dict=False)[0]).all()


def test_spilled_calibration_round_trips(monkeypatch, tiny_calibration):
    from diffquant.quantization import calibration as module

    monkeypatch.setattr(module, "MEMORY_LIMIT_BYTES", 0)
    spilled = CalibrationSet()
    for item in tiny_calibration:
        spilled.append(item)
    assert spilled._spill is not None and len(list(spilled._spill.iterdir())) == len(tiny_calibration)
    for a, b in zip(spilled, tiny_calibration):
        assert torch.equal(a["sample"], b["sample"]) and torch.equal(a["timestep"], b["timestep"])


@pytest.mark.parametrize("name, dtype", [("w8a8-int8", "int8"), ("w8a8-fp8", "fp8_e4m3")])
def test_w8a8_quantizes_weights_and_activations(tiny_sd, tiny_calibration, tiny_w8a8, name, dtype):
    quantized = tiny_w8a8(name)
    descriptions = set(layer_report(quantized.unet).quantized.values())
    assert all(f"act {dtype} per_tensor" in d for d in descriptions)
    with torch.no_grad():
        reference = tiny_sd.unet(**tiny_calibration[0], return_dict=False)[0]
        out = quantized.unet(**tiny_calibration[0], return_dict=False)[0]
    # A random tiny UNet has outlier activations; garbage scales (empty calibration) give < 1 dB.
    assert torch.isfinite(out).all() and sqnr_db(reference, out) > 5


def test_w8a8_without_calibration_is_refused(tiny_sd):
    with pytest.raises(DiffquantError, match="needs calibration"):
        quantize(tiny_sd, "w8a8-int8")


def test_real_calibration_beats_random_inputs(tiny_sd, tiny_calibration, tiny_w8a8):
    random = random_calibration(tiny_sd.unet, n=len(tiny_calibration), sequence_length=16)
    real_q = tiny_w8a8("w8a8-int8")
    random_q = quantize(tiny_sd, "w8a8-int8", calibration=random)

    def sqnr(unet):
        with torch.no_grad():
            ref = torch.cat([tiny_sd.unet(**c, return_dict=False)[0].flatten() for c in tiny_calibration])
            out = torch.cat([unet(**c, return_dict=False)[0].flatten() for c in tiny_calibration])
        return sqnr_db(ref, out)

    assert sqnr(real_q.unet) > sqnr(random_q.unet)


def test_w8a8_export_has_activation_qdq_and_matches_ort(shapes_pipe, shapes_calibration, tmp_path):
    """On the trained shapes-sd: a random tiny UNet has activation outliers (its skip concatenations
    reach +-77) that make one flipped rounding tie move the output by a whole coarse step."""
    from diffquant import export_onnx
    from diffquant.export.onnx import MAX_RELATIVE_ERROR

    result = export_onnx(quantize(shapes_pipe, "w8a8-int8", calibration=shapes_calibration),
                         tmp_path / "w8a8")
    model = onnx.load(str(result.path))
    initializers = {t.name for t in model.graph.initializer}
    # Weights are stored as INT8 codes, so every QuantizeLinear left acts on an activation.
    activation_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in initializers]
    assert len(activation_q) >= 20
    assert result.relative_error <= MAX_RELATIVE_ERROR


def test_sensitivity_ranks_a_damaged_layer_first(tiny_sd, tiny_calibration):
    import copy

    from diffquant.evaluate.sensitivity import analyze_sensitivity

    damaged = copy.copy(tiny_sd)
    damaged.unet = copy.deepcopy(tiny_sd.unet)
    layer = damaged.unet.down_blocks[1].attentions[0].transformer_blocks[0].ff.net[2]
    with torch.no_grad():
        layer.weight[0, 0] = layer.weight.abs().max() * 300  # one outlier: per-tensor int8 zeroes the rest
    result = analyze_sensitivity(damaged, "int8-w", tiny_calibration, max_keep=3)
    assert result.ranking[0][0] == "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
    assert len(result.keep_float_curve) == 4 and result.keep_float_curve[1] > result.keep_float_curve[0]
    mixed = result.mixed_recipe(keep_float=1)
    assert mixed.exclude == ("down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",)
    assert mixed.name == "int8-w-mixed1"
    target = result.mixed_recipe(target_sqnr_db=result.keep_float_curve[1])
    assert len(target.exclude) <= 1


def test_a_mixed_recipe_keeps_the_float_layers_its_ranking_was_measured_with(shapes_pipe, shapes_calibration):
    """shapes-sd's profile keeps measured layers float for w8a8-int8; the ranking is measured with them float,
    so the mixed recipe (a name the profile does not know) must carry them to reproduce its own curve."""
    from diffquant.evaluate.metrics import sqnr_db
    from diffquant.models.profiles import profile_of
    from diffquant.quantization.api import quantize
    from diffquant.evaluate.sensitivity import analyze_sensitivity

    result = analyze_sensitivity(shapes_pipe, "w8a8-int8", shapes_calibration, max_keep=1)
    mixed = result.mixed_recipe(keep_float=1)
    assert set(profile_of(shapes_pipe).keep_float_for("w8a8-int8").patterns) < set(mixed.exclude)
    items = shapes_calibration[:8]  # the sensitivity's own evaluation inputs
    unet = quantize(shapes_pipe, mixed, calibration=shapes_calibration).unet
    with torch.no_grad():
        reference = torch.cat([shapes_pipe.unet(**x, return_dict=False)[0].flatten() for x in items])
        output = torch.cat([unet(**x, return_dict=False)[0].flatten() for x in items])
    assert abs(sqnr_db(reference, output) - result.keep_float_curve[1]) < 0.5


def test_sensitivity_ranks_the_profiles_float_layers_too_when_asked(shapes_pipe, shapes_calibration):
    """profile_exclusions=False (`diffquant sensitivity --quantize-all`) ranks every layer the recipe allows, so a
    profile's float layers can be derived again; by default they stay float and out of the ranking."""
    from diffquant.evaluate.sensitivity import analyze_sensitivity
    from diffquant.models.profiles import profile_of

    kept = set(profile_of(shapes_pipe).keep_float_for("w8a8-int8").patterns)
    default = analyze_sensitivity(shapes_pipe, "w8a8-int8", shapes_calibration, unit="block", max_keep=0)
    every = analyze_sensitivity(shapes_pipe, "w8a8-int8", shapes_calibration, unit="block", max_keep=0,
                                profile_exclusions=False)
    ranked = lambda result: {m for members in result.members.values() for m in members}  # noqa: E731
    assert kept & ranked(every) == kept and not kept & ranked(default)
    assert every.full_sqnr_db < default.full_sqnr_db  # the float layers were measured as the sensitive ones
