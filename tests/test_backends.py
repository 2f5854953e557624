"""The Quark backend on transformer denoisers (tiny SD3 MMDiT and Flux): every recipe quantizes the
Linear (and SD3's patch-embedding Conv2d) layers it claims, exclusions hold from both sides, a saved
quantized transformer reloads to identical outputs without calibration data; plus the recipe -> QConfig
mapping and sensitivity analysis on a transformer."""

import copy
import json

import pytest
import torch

from diffquant import layer_report, load_quantized, quantize, save_quantized
from diffquant.quantization.backends import get_backend
from diffquant.quantization.backends.quark import internals
from diffquant.models.denoisers import denoiser_of
from diffquant.core.errors import DiffquantError
from diffquant.evaluate.metrics import sqnr_db
from diffquant.core.recipes import RECIPES, PerChannel, PerTensor, Recipe, TensorQuant, get_recipe

from conftest import CALIBRATION_PROMPTS, build_tiny_flux, build_tiny_sd3

FAMILIES = ["sd3", "flux"]


def _capture(pipe) -> list[dict]:
    """The transformer's forward kwargs over a 2-step, 16x16 generation of two prompts (4 calls for SD3's
    guided batch of 2, 4 for Flux): real calibration inputs."""
    family = denoiser_of(pipe)
    records = []
    handle = family.module.register_forward_pre_hook(lambda m, args, kwargs: records.append(family.record(args, kwargs)),
                                                     with_kwargs=True)
    try:
        with torch.no_grad():
            for prompt in CALIBRATION_PROMPTS[:2]:
                pipe(prompt, num_inference_steps=2, height=16, width=16, max_sequence_length=16, guidance_scale=3.0,
                     output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return records


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    """(float pipeline, its captured transformer inputs) for each transformer family."""
    pipe = (build_tiny_sd3 if request.param == "sd3" else build_tiny_flux)()
    pipe.set_progress_bar_config(disable=True)
    return pipe, _capture(pipe)


def _outputs(module, inputs: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(**item, return_dict=False)[0].flatten() for item in inputs])


def _layers(module) -> dict:
    return {n: m for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def _scheme(q: TensorQuant) -> str:
    return f"{q.dtype} {'per_tensor' if isinstance(q.granularity, PerTensor) else 'per_channel'}"


@pytest.mark.parametrize("name", [n for n, r in RECIPES.items() if not r.per_group])  # per group: test_fourbit.py, test_gguf.py
def test_every_recipe_quantizes_every_linear_of_the_transformer(tiny, name):
    pipe, calibration = tiny
    recipe = get_recipe(name)
    float_module = denoiser_of(pipe).module
    layers = _layers(float_module)
    assert not any(internals.is_quant_layer(m) for m in float_module.modules())
    quantized = quantize(pipe, recipe, calibration=calibration)
    module = denoiser_of(quantized).module
    modules = dict(module.named_modules())
    for layer_name in layers:  # read from the modules themselves, not from the config
        layer = modules[layer_name]
        assert internals.is_quant_layer(layer), layer_name
        assert internals.describe(internals.weight_quantizer(layer)) == _scheme(recipe.weight)
        act = internals.input_quantizer(layer)
        assert (act is None) == (recipe.activation is None), layer_name
        if act is not None:
            assert internals.describe(act) == _scheme(recipe.activation)
        conv_out = recipe.conv_output is not None and isinstance(layers[layer_name], torch.nn.Conv2d)
        assert (internals.output_quantizer(layer) is not None) == conv_out, layer_name
    report = layer_report(module)
    assert set(report.quantized) == set(layers) and not report.float_layers
    expected = _scheme(recipe.weight) + (f", act {_scheme(recipe.activation)}" if recipe.activation else "")
    assert set(report.quantized.values()) == {expected}
    # SD3's patch embedding is the one Conv2d: only it gets an output quantizer (w8a8-int8-ort).
    has_conv = any(isinstance(m, torch.nn.Conv2d) for m in layers.values())
    assert internals.has_output_quantizers(module) == (recipe.conv_output is not None and has_conv)
    reference, out = _outputs(float_module, calibration), _outputs(module, calibration)
    assert torch.isfinite(out).all()
    # Random tiny transformers measured 45 dB (int8-w), 38-39 (w8a8-int8), 26-30 (fp8): 8-bit everywhere.
    assert sqnr_db(reference, out) > (35 if name in ("int8-w", "int8-w-pc") else 18)


def test_the_float_pipeline_is_left_untouched(tiny):
    pipe, calibration = tiny
    before = _outputs(pipe.transformer, calibration)
    quantized = quantize(pipe, "int8-w")
    assert quantized.transformer is not pipe.transformer and quantized.vae is pipe.vae
    assert type(quantized) is type(pipe)
    assert not layer_report(pipe.transformer).quantized
    assert torch.equal(before, _outputs(pipe.transformer, calibration))
    assert not torch.equal(before, _outputs(quantized.transformer, calibration))


EXCLUDE = {"sd3": ["pos_embed", "transformer_blocks.1.*", "*.norm1_context.linear"],
           "flux": ["single_transformer_blocks.*", "x_embedder", "*.attn.add_?_proj"]}


def _expected_float(family: str, names) -> set[str]:
    if family == "sd3":
        return {n for n in names if n == "pos_embed.proj" or n.startswith("transformer_blocks.1.")
                or n.endswith(".norm1_context.linear")}
    return {n for n in names if n.startswith("single_transformer_blocks.") or n == "x_embedder"
            or n.split(".")[-1] in ("add_q_proj", "add_k_proj", "add_v_proj")}


def test_exclusions_hold_from_both_sides(tiny):
    pipe, _ = tiny
    family = "sd3" if type(pipe.transformer).__name__.startswith("SD3") else "flux"
    names = _layers(pipe.transformer)
    excluded = _expected_float(family, names)
    assert 0 < len(excluded) < len(names)
    quantized = quantize(pipe, "int8-w", exclude=EXCLUDE[family])
    modules = dict(quantized.transformer.named_modules())
    for name in names:
        layer = modules[name]
        if name in excluded:  # still the plain torch layer, no quantizer at all
            assert type(layer) is type(names[name]) and not internals.quantizers(layer), name
        else:
            assert internals.weight_quantizer(layer) is not None, name
    report = layer_report(quantized.transformer)
    assert set(report.float_layers) == excluded and set(report.quantized) == set(names) - excluded


def test_the_familys_default_exclusions_apply(tiny, monkeypatch):
    pipe, _ = tiny
    family = type(denoiser_of(pipe))
    monkeypatch.setattr(family, "default_exclusions", ("proj_out", "*no_such_module*"))  # defaults never fail
    report = layer_report(quantize(pipe, "int8-w").transformer)
    assert report.float_layers == ["proj_out"]


def test_an_exclusion_matching_nothing_names_the_modules(tiny):
    pipe, _ = tiny
    with pytest.raises(DiffquantError, match=r"matches no module of the .*Transformer2DModel.*transformer_blocks"):
        quantize(pipe, "int8-w", exclude=["transformer_block.*"])


@pytest.fixture
def no_calibration(monkeypatch):
    """Quark's ModelQuantizer.quantize_model raises: a reload must not quantize (or calibrate) again."""
    quark_torch = internals.import_quark()

    def refuse(*args, **kwargs):
        raise AssertionError("load_quantized ran Quark's quantize_model")

    monkeypatch.setattr(quark_torch.ModelQuantizer, "quantize_model", refuse)


@pytest.mark.parametrize("recipe", ["int8-w-pc", "w8a8-int8-ort", "w8a8-fp8"])
def test_a_saved_transformer_reloads_to_identical_outputs_without_calibration(tiny, recipe, tmp_path, request):
    pipe, calibration = tiny
    quantized = quantize(pipe, recipe, calibration=calibration, exclude=["proj_out"])
    save_quantized(quantized, tmp_path / "q", model="some/model")
    meta = json.loads((tmp_path / "q" / "diffquant_quantized.json").read_text())
    assert meta["type"] == "QuantizedDenoiser" and meta["denoiser"] == type(pipe.transformer).__name__
    assert meta["excluded"] == ["proj_out"] and meta["model"] == "some/model"
    assert (tmp_path / "q" / "transformer_quantized.safetensors").is_file()

    request.getfixturevalue("no_calibration")
    reloaded = load_quantized(tmp_path / "q", pipe=pipe)
    assert type(reloaded) is type(pipe) and reloaded.transformer is not pipe.transformer
    assert not layer_report(pipe.transformer).quantized  # the float pipeline passed in stays float
    assert layer_report(reloaded.transformer).to_dict() == layer_report(quantized.transformer).to_dict()
    saved_scales = internals.activation_scales(quantized.transformer)
    assert (len(saved_scales) > 0) == get_recipe(recipe).needs_calibration
    assert torch.equal(_outputs(quantized.transformer, calibration), _outputs(reloaded.transformer, calibration))
    # After running, the activation scales are still the saved ones: the reload left no observer on.
    reloaded_scales = internals.activation_scales(reloaded.transformer)
    assert saved_scales.keys() == reloaded_scales.keys()
    assert all(torch.equal(saved_scales[k], reloaded_scales[k]) for k in saved_scales)


def test_reloading_into_another_denoiser_is_one_clear_error(tiny, tiny_sd, tmp_path):
    pipe, _ = tiny
    save_quantized(quantize(pipe, "int8-w"), tmp_path / "q")
    with pytest.raises(DiffquantError, match="holds a quantized .*Transformer2DModel, but the pipeline's denoiser is a "
                                             "UNet2DConditionModel"):
        load_quantized(tmp_path / "q", pipe=tiny_sd)


def test_sensitivity_ranks_a_damaged_transformer_layer_first(tiny):
    from diffquant.evaluate.sensitivity import analyze_sensitivity

    pipe, calibration = tiny
    damaged = copy.copy(pipe)
    damaged.transformer = copy.deepcopy(pipe.transformer)
    layer = damaged.transformer.transformer_blocks[0].ff.net[2]
    with torch.no_grad():
        layer.weight[0, 0] = layer.weight.abs().max() * 300  # one outlier: per-tensor int8 zeroes the rest
    result = analyze_sensitivity(damaged, "int8-w", calibration, max_keep=2)
    assert result.ranking[0][0] == "transformer_blocks.0.ff.net.2"
    assert result.keep_float_curve[1] > result.keep_float_curve[0]
    blocks = analyze_sensitivity(damaged, "int8-w", calibration, unit="block", max_keep=1)
    assert blocks.ranking[0][0] == "transformer_blocks.0"


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(DiffquantError, match="unknown quantization backend 'nope': choose from quark"):
        get_backend("nope")


def test_quark_config_matches_the_recipe():
    from quark.torch.quantization.config.type import Dtype, QSchemeType

    from diffquant.quantization.backends.quark import to_quark_config

    layer = to_quark_config(get_recipe("int8-w")).global_quant_config
    assert layer.weight.dtype == Dtype.int8 and layer.weight.qscheme == QSchemeType.per_tensor
    assert layer.weight.symmetric and layer.input_tensors is None
    layer = to_quark_config(get_recipe("fp8-w-pc")).global_quant_config
    assert layer.weight.dtype == Dtype.fp8_e4m3 and layer.weight.qscheme == QSchemeType.per_channel
    w8a8 = Recipe("x", TensorQuant("int8", PerChannel()), TensorQuant("int8"))
    assert to_quark_config(w8a8).global_quant_config.input_tensors.dtype == Dtype.int8
    config = to_quark_config(get_recipe("w8a8-int8-ort"), exclude=["conv_in"])
    assert config.global_quant_config.output_tensors is None  # Linear outputs stay float
    assert config.layer_type_quant_config[torch.nn.Conv2d].output_tensors.dtype == Dtype.int8
    assert config.exclude == ["conv_in"]
    with pytest.raises(DiffquantError, match="PerTensor"):
        to_quark_config(Recipe("y", TensorQuant("int8"), TensorQuant("int8", PerChannel())))
