"""The quantization backends: the registry, and the Quark backend's recipe -> QConfig mapping."""

import pytest
import torch

from diffquant.backends import get_backend
from diffquant.errors import DiffquantError
from diffquant.recipes import PerChannel, Recipe, TensorQuant, get_recipe


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(DiffquantError, match="unknown quantization backend 'nope': choose from quark"):
        get_backend("nope")


def test_quark_config_matches_the_recipe():
    from quark.torch.quantization.config.type import Dtype, QSchemeType

    from diffquant.backends.quark import to_quark_config

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
