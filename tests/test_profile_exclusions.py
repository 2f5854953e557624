"""A model profile's measured float layers: applied by `quantize` for the recipes they were measured on,
named with their reason in the results, and turned off by `profile_exclusions=False` / `--quantize-all`."""

import pytest
from diffquant.core.record import record_of


@pytest.fixture(scope="session")
def shapes_rule(shapes_pipe):
    from diffquant.models.profiles import profile_of

    rule = profile_of(shapes_pipe).keep_float_for("w8a8-int8")
    assert rule is not None and rule.reason, "shapes-sd's profile has no measured float layers for w8a8-int8"
    return rule


def test_the_profile_keeps_its_measured_layers_float(shapes_pipe, shapes_calibration, shapes_rule):
    import diffquant as dq
    from diffquant.quantization.api import layer_report
    from diffquant.quantization.plan import match_exclusions

    quantized = dq.quantize(shapes_pipe, "w8a8-int8", calibration=shapes_calibration)
    report = layer_report(quantized.unet)
    expected = match_exclusions(shapes_pipe.unet, shapes_rule.patterns)
    assert 0 < len(expected) <= 33 and sorted(report.float_layers) == sorted(expected)
    assert len(report.quantized) >= 100  # the floor: most of the UNet stays quantized
    assert record_of(quantized.unet).float_reason == shapes_rule.reason

    everything = dq.quantize(shapes_pipe, "w8a8-int8", calibration=shapes_calibration, profile_exclusions=False)
    assert layer_report(everything.unet).float_layers == [] and record_of(everything.unet).float_reason == ""


def test_recipes_the_profile_did_not_measure_quantize_every_layer(shapes_pipe, shapes_rule):
    import diffquant as dq
    from diffquant.quantization.api import layer_report

    assert "int8-w" not in shapes_rule.recipes
    assert layer_report(dq.quantize(shapes_pipe, "int8-w").unet).float_layers == []


def test_a_model_without_measurements_has_no_profile_exclusions(tiny_sd):
    from diffquant.models.profiles import profile_of
    from diffquant.core.recipes import RECIPES

    assert all(profile_of(tiny_sd).keep_float_for(name) is None for name in RECIPES)


def test_quantize_all_reaches_the_run_config():
    from diffquant.cli.main import build_parser
    from diffquant.core.config import RunConfig

    args = build_parser().parse_args(["run", "--quantize-all"])
    assert args.quantize_all is True
    config = RunConfig(quantize_all=True)
    assert RunConfig.from_dict(config.to_dict()).quantize_all is True
    assert RunConfig.from_dict({k: v for k, v in config.to_dict().items() if k != "quantize_all"}).quantize_all is False
