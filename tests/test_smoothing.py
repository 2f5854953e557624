"""Activation smoothing (SmoothQuant folded into the denoiser): exact in float, it recovers the SQNR an
activation-outlier channel costs W8A8, and the smoothed export still runs on integer kernels in ONNX
Runtime within the usual bound."""

import copy

import pytest
import torch

from diffquant.evaluate.metrics import sqnr_db
from diffquant.quantization.api import quantize_module
from diffquant.core.recipes import get_recipe, recipe_from_dict
from diffquant.quantization.smoothing import fold_groups, smooth
from diffquant.core.record import record_of

pytestmark = pytest.mark.slow  # exports, full runs or benchmarks: `pytest -m 'not slow'` leaves them out


def _outputs(unet, items) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([unet(**item, return_dict=False)[0].flatten() for item in items])


def test_smoothing_leaves_the_float_unet_unchanged(tiny_sd, tiny_calibration):
    unet = copy.deepcopy(tiny_sd.unet)
    before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    with torch.no_grad():
        report = smooth(unet, get_recipe("w8a8-int8-sq"), tiny_calibration)
    assert report.smoothed > 0
    changed = [n for n, p in unet.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.endswith("norm1.weight") for n in changed) and any(n.endswith("attn1.to_q.weight") for n in changed)
    reference, smoothed = _outputs(tiny_sd.unet, tiny_calibration), _outputs(unet, tiny_calibration)
    assert float((smoothed - reference).norm() / reference.norm()) < 1e-5


def _with_outlier_channels(unet, factor: float = 60.0):
    """The same function with one activation channel `factor` times larger in front of every smoothable
    LayerNorm group: the norm's affine scales channel 0 up, its consumers' weight columns scale down."""
    unet = copy.deepcopy(unet)
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for group in fold_groups(unet):
            if group.kind != "norm" or not isinstance(modules[group.producer], torch.nn.LayerNorm):
                continue
            modules[group.producer].weight[0] *= factor
            modules[group.producer].bias[0] *= factor
            for name in group.consumers:
                modules[name].weight[:, 0] /= factor
    return unet


def test_smoothing_recovers_what_an_outlier_channel_costs_w8a8(tiny_sd, tiny_calibration):
    unet = _with_outlier_channels(tiny_sd.unet)
    items = list(tiny_calibration)
    reference = _outputs(unet, items)
    assert sqnr_db(_outputs(tiny_sd.unet, items), reference) > 80  # the injection kept the function
    # Only the transformer blocks are quantized: the random tiny UNet's other layers would drown the outlier's cost.
    others = [n for n, m in unet.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and "transformer_blocks" not in n]
    plain = sqnr_db(reference, _outputs(quantize_module(unet, "w8a8-int8", items, exclude=others), items))
    smoothed = quantize_module(unet, "w8a8-int8-sq", items, exclude=others)
    assert record_of(smoothed).smoothing.smoothed > 0
    assert sqnr_db(reference, _outputs(smoothed, items)) > plain + 3


def test_smoothing_recipe_round_trips_and_old_files_load():
    recipe = get_recipe("w8a8-int8-sq")
    assert recipe_from_dict(recipe.to_dict()) == recipe
    data = get_recipe("w8a8-int8").to_dict()
    del data["smoothing"]
    data["version"] = 2
    assert recipe_from_dict(data) == get_recipe("w8a8-int8")


def test_smoothed_shapes_sd_export_still_fuses_and_matches_torch(shapes_pipe, shapes_calibration, shapes_ort_export,
                                                                  tmp_path):
    from diffquant import export_onnx, quantize

    quantized = quantize(shapes_pipe, "w8a8-int8-ort-sq", calibration=shapes_calibration, profile_exclusions=False)
    assert record_of(quantized.unet).smoothing.smoothed > 0
    exported = export_onnx(quantized, tmp_path / "sq")
    layers = {n: m for n, m in quantized.unet.named_modules() if hasattr(m, "_weight_quantizer")}
    convs = [n for n, m in layers.items() if "Conv2d" in type(m).__name__]
    attention_linears = [n for n, m in layers.items() if "Linear" in type(m).__name__ and "attentions" in n]
    ops = exported.fused_ops
    # Smoothing is folded into existing parameters: no Mul is added, and the integer kernels are the
    # unsmoothed recipe's (tests/test_ort_fusion.py): every attention Linear, most Convs.
    assert ops.get("MatMulIntegerToFloat", 0) == len(attention_linears)
    assert ops.get("QLinearConv", 0) >= 0.8 * len(convs)
    assert exported.relative_error <= exported.relative_error_bound
    plain = shapes_ort_export[1]
    assert exported.op_counts == plain.op_counts and exported.fused_ops == plain.fused_ops
