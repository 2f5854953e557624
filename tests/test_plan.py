"""The per-layer plan: one entry per Linear/Conv2d, each layer's action and the first source that decided it;
the backend quantizes from it, the record and the saved artifact keep it, and a bad saved plan is one line."""

import json

import pytest

import diffquant as dq
from diffquant.core.errors import DiffquantError
from diffquant.core.plan import FALLBACK, FLOAT, QUANTIZE, LayerPlan
from diffquant.core.recipes import get_recipe
from diffquant.core.record import record_of
from diffquant.models.profiles import KeepFloat
from diffquant.quantization.api import layer_report, quantize_module
from diffquant.quantization.backends import QUANTIZABLE
from diffquant.quantization.plan import plan_layers


def test_each_layer_gets_the_reason_of_the_first_source_that_names_it(tiny_sd):
    unet = tiny_sd.unet
    recipe = get_recipe("int8-w").with_exclude(("conv_in",))
    rule = KeepFloat(recipes=("int8-w",), patterns=("conv_in", "conv_out"), reason="measured here")
    plan = plan_layers(unet, recipe, exclude=("time_embedding.*", "conv_out"), profile_rule=rule)
    layers = [name for name, layer in unet.named_modules() if isinstance(layer, QUANTIZABLE)]
    assert [e.name for e in plan.layers] == layers  # every layer once, in module order
    reasons = {e.name: e.reason for e in plan.layers if e.action == FLOAT}
    assert reasons["conv_in"] == "the recipe's exclude patterns"  # the recipe comes before the profile
    assert reasons["conv_out"] == "the caller's exclude patterns"  # the caller comes before the profile
    assert reasons["time_embedding.linear_1"] == "the caller's exclude patterns"
    assert set(plan.reasons(FLOAT)) == {"the recipe's exclude patterns", "the caller's exclude patterns"}
    assert plan.counts()[QUANTIZE] == len(layers) - len(reasons)
    assert LayerPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_a_4bit_group_that_does_not_divide_a_layer_gives_it_the_fallback(tiny_sd):
    plan = plan_layers(tiny_sd.unet, get_recipe("int4-w-conv8"))
    convs = [n for n, m in tiny_sd.unet.named_modules() if type(m).__name__ == "Conv2d"]
    fallback = plan.names(FALLBACK)
    assert convs and set(convs) <= set(fallback) and not plan.float_layers
    assert all(e.reason for e in plan.layers if e.action == FALLBACK)
    without = plan_layers(tiny_sd.unet, get_recipe("int4-w"))  # no fallback: those layers stay float
    assert set(convs) <= set(without.float_layers) and not without.names(FALLBACK)


def test_the_quantized_module_follows_its_plan_and_a_save_keeps_it(tiny_sd, tmp_path):
    quantized = dq.quantize(tiny_sd, "int8-w", exclude=("conv_in", "down_blocks.0*"))
    plan = record_of(quantized.unet).plan
    assert plan is not None and sorted(layer_report(quantized.unet).float_layers) == sorted(plan.float_layers)
    assert "conv_in" in plan.float_layers and len(plan.float_layers) > 1
    dq.save_quantized(quantized, tmp_path / "q")
    reloaded = dq.load_quantized(tmp_path / "q", pipe=tiny_sd)
    assert record_of(reloaded.unet).plan == plan

    meta_path = tmp_path / "q" / "diffquant_quantized.json"
    meta = json.loads(meta_path.read_text())
    meta["plan"]["version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DiffquantError, match="layer plan this diffquant cannot read"):
        dq.load_quantized(tmp_path / "q", pipe=tiny_sd)


def test_a_caller_pattern_that_matches_nothing_is_refused(tiny_sd):
    with pytest.raises(DiffquantError, match="matches no module"):
        quantize_module(tiny_sd.unet, "int8-w", exclude=("no_such_block",))


def test_a_layer_the_caller_keeps_float_stays_float_even_where_the_recipe_has_a_fallback(tiny_sd):
    quantized = quantize_module(tiny_sd.unet, "int4-w-conv8", exclude=("conv_in",))
    report = layer_report(quantized)
    assert "conv_in" in report.float_layers  # not given the int8 fallback the other Conv2d take
    assert "conv_out" in report.quantized
    plan = record_of(quantized).plan
    assert dict((e.name, e.action) for e in plan.layers)["conv_in"] == FLOAT
