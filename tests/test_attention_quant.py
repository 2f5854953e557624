"""int8 attention (`Recipe.attention`, diffquant.quantization.attention): the inputs of each attention's Q.K^T
and P.V are fake-quantized with calibrated ranges in torch, survive save/reload, and export as QDQ pairs that
ONNX Runtime runs as integer matmuls, on the UNet, the SD3 MMDiT and FLUX.1 alike."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffquant.core.errors import DiffquantError
from diffquant.core.recipes import INT8, FP8, PerChannel, PerTensor, Recipe, TensorQuant, get_recipe, recipe_from_dict
from diffquant.quantization.attention import (KEY, PROBS, QUERY, VALUE, AttentionQuantizer, attention_modules,
                                              quantizers)


def test_the_quantizer_observes_exact_attention_and_then_quantizes_it():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 8) * s for s in (1.0, 2.0, 0.5))
    mask = torch.rand(2, 1, 24, 24) > 0.2
    mask[..., 0] = True  # every row sees one key
    quantizer = AttentionQuantizer()
    quantizer.observing = True
    for m in (None, mask):
        assert torch.allclose(quantizer(q, k, v, attn_mask=m), F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                              atol=1e-5)
    scaled = q / np.sqrt(8)
    assert quantizer.amax[QUERY] == pytest.approx(float(scaled.abs().max()), rel=1e-6)
    assert quantizer.amax[KEY] == pytest.approx(float(k.abs().max()), rel=1e-6)
    assert quantizer.amax[VALUE] == pytest.approx(float(v.abs().max()), rel=1e-6)
    assert 0 < float(quantizer.amax[PROBS]) <= 1
    quantizer.observing = False
    exact = F.scaled_dot_product_attention(q, k, v)
    quantized = quantizer(q, k, v)
    error = float((quantized - exact).norm() / exact.norm())
    assert 0 < error < 0.05  # it does quantize, and at 8 bits it stays close
    with pytest.raises(DiffquantError, match="no causal mask"):
        quantizer(q, k, v, is_causal=True)


def test_attention_quantization_is_a_w8a8_int8_recipe_field_that_round_trips():
    recipe = get_recipe("w8a8-int8-ort-sq-attn")
    assert recipe.attention == TensorQuant(INT8, PerTensor()) and recipe.needs_calibration
    assert recipe_from_dict(recipe.to_dict()) == recipe
    # a recipe written before the field existed reads as one without it
    old = {k: v for k, v in get_recipe("w8a8-int8-ort-sq").to_dict().items() if k != "attention"} | {"version": 8}
    assert recipe_from_dict(old).attention is None
    with pytest.raises(DiffquantError, match="attention quantization is int8 PerTensor"):
        Recipe("x", TensorQuant(INT8, PerChannel()), attention=TensorQuant(INT8, PerTensor()))
    with pytest.raises(DiffquantError, match="attention quantization is int8 PerTensor"):
        Recipe("x", TensorQuant(INT8, PerChannel()), TensorQuant(INT8, PerTensor()),
               attention=TensorQuant(FP8, PerTensor()))


def _call(family, module):
    with torch.no_grad():
        return module(**family.records[0], return_dict=False)[0]


@pytest.fixture(scope="module")
def quantized_families(tiny_families):
    """family name -> (TinyFamily, its w8a8-int8-sq module, its w8a8-int8-sq-attn pipeline)."""
    cache = {}

    def get(name):
        if name not in cache:
            family = tiny_families(name)
            plain = family.quantized("w8a8-int8-sq")
            cache[name] = family, getattr(plain, family.family.pipeline_attribute), family.quantized("w8a8-int8-sq-attn")
        return cache[name]
    return get


@pytest.mark.parametrize("name", ["unet", "sd3", "flux"])
def test_every_attention_is_calibrated_and_changes_the_output_and_reload_keeps_it(name, quantized_families,
                                                                                  tmp_path):
    from diffquant import load_quantized, save_quantized

    family, plain, pipe = quantized_families(name)
    module = getattr(pipe, family.family.pipeline_attribute)
    found = quantizers(module)
    assert len(found) == len(attention_modules(module)) > 0
    assert all(bool((q.amax > 0).all()) for q in found)
    with_attention, without = _call(family, module), _call(family, plain)
    difference = float((with_attention - without).norm() / without.norm())
    assert 0 < difference < 0.1
    save_quantized(pipe, tmp_path / "saved")
    reloaded = getattr(load_quantized(tmp_path / "saved", pipe=family.pipe), family.family.pipeline_attribute)
    assert len(quantizers(reloaded)) == len(found)
    assert torch.equal(_call(family, reloaded), with_attention)
    # the float pipeline the caller passed is untouched
    assert not quantizers(family.family.module)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet", "sd3", "flux"])
def test_the_export_runs_both_attention_matmuls_on_integer_kernels(name, tiny_families):
    family = tiny_families(name)
    _, plain = family.export("w8a8-int8-sq")
    pipe, exported = family.export("w8a8-int8-sq-attn")
    attentions = len(attention_modules(getattr(pipe, family.family.pipeline_attribute)))
    integer = ("MatMulIntegerToFloat", "QLinearMatMul")
    # the plain graph runs each attention as one fused MultiHeadAttention (the UNet's) or as two float MatMuls
    unfused = attentions - plain.fusion["fused_attention"]
    assert exported.fusion["fused_attention"] == 0 and exported.fused_ops.get("MultiHeadAttention", 0) == 0
    assert exported.fused_ops.get("Softmax", 0) == attentions
    assert sum(exported.fused_ops.get(op, 0) for op in integer) \
        == sum(plain.fused_ops.get(op, 0) for op in integer) + 2 * attentions
    float_matmuls = [ops.get("MatMul", 0) + ops.get("FusedMatMul", 0) for ops in (exported.fused_ops, plain.fused_ops)]
    assert float_matmuls[0] == float_matmuls[1] - 2 * unfused


def test_an_attention_without_scaled_dot_product_stays_float(tiny_families):
    """A linear attention (Sana's), or any processor that computes attention itself, never reaches the quantizer:
    it loses it after calibration instead of failing, and the others keep theirs."""
    import copy

    from diffusers.models.attention_processor import AttnProcessor

    from diffquant.quantization.attention import calibrate_attention

    family = tiny_families("unet")
    module = copy.deepcopy(family.family.module)
    attentions = attention_modules(module)
    plain = next(iter(attentions))
    attentions[plain].set_processor(AttnProcessor())  # softmax(Q.K^T) by bmm: no scaled_dot_product_attention
    assert calibrate_attention(module, family.records) == len(attentions) - 1
    assert not hasattr(attentions[plain], "diffquant_attention")
    with torch.no_grad():  # and the model still runs, the plain attention in float
        module(**family.records[0], return_dict=False)
    fresh = copy.deepcopy(family.family.module)
    for attention in attention_modules(fresh).values():
        attention.set_processor(AttnProcessor())
    with pytest.raises(DiffquantError, match="no attention of this UNet2DConditionModel calls"):
        calibrate_attention(fresh, family.records)
