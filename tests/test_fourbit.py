"""4-bit weights: the int4 / MXFP4 recipes quantize the Linears they claim and report the ones they cannot
take; packed codes round-trip bit-exact through save -> load; int4 Linears export as MatMulNBits that
ONNX Runtime runs and dequantizes to exactly the torch fake-quantized weights, and OpenVINO runs
with 4-bit weights."""

import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from diffquant import export_onnx, layer_report, quantize
from diffquant.quantization.backends.quark import fourbit, internals
from diffquant.passes.matmul_nbits import MAX_RELATIVE_ERROR_NBITS
from diffquant.core.errors import DiffquantError
from diffquant.export.onnx import example_inputs
from diffquant.evaluate.metrics import sqnr_db
from diffquant.core.recipes import PerChannel, PerGroup, Recipe, SVDQuant, TensorQuant
from diffquant.core.record import record_of

pytestmark = pytest.mark.slow  # exports, full runs or benchmarks: `pytest -m 'not slow'` leaves them out

# The tiny UNet's Linears are 8, 16 or 32 wide: group 16 takes all but the 8-wide time_embedding.linear_1.
INT4_G16 = Recipe("int4-w-g16", TensorQuant("int4", PerGroup(16)))
CONV8_G16 = Recipe("int4-w-conv8-g16", TensorQuant("int4", PerGroup(16)), fallback=TensorQuant("int8", PerChannel()))


def _output(unet):
    inputs = example_inputs(unet, batch_size=2, sequence_length=16, seed=3)
    with torch.no_grad():
        return unet(**inputs, return_dict=False)[0]


def _layers(unet, kind):
    return {n: m for n, m in unet.named_modules() if isinstance(m, kind)}


@pytest.fixture(scope="module")
def tiny_int4(tiny_sd):
    return quantize(tiny_sd, INT4_G16)


@pytest.fixture(scope="module")
def tiny_conv8(tiny_sd):
    return quantize(tiny_sd, CONV8_G16)


@pytest.mark.parametrize("recipe, group, scheme", [(INT4_G16, 16, "int4 per_group"), ("mxfp4-w", 32, "fp4 per_group")])
def test_4bit_recipe_quantizes_the_linears_it_claims_and_reports_the_rest(tiny_sd, recipe, group, scheme, caplog):
    linears = _layers(tiny_sd.unet, torch.nn.Linear)
    convs = _layers(tiny_sd.unet, torch.nn.Conv2d)
    fit = {n for n, m in linears.items() if m.in_features % group == 0}
    assert fit and len(fit) < len(linears)  # the tiny UNet has layers on both sides
    with caplog.at_level(logging.INFO, logger="diffquant"):
        quantized = quantize(tiny_sd, recipe)
    report = layer_report(quantized.unet)
    assert set(report.quantized) == fit and set(report.quantized.values()) == {scheme}
    assert set(report.float_layers) == (set(linears) - fit) | set(convs)
    assert set(report.notes) == set(report.float_layers)
    narrow = next(n for n in linears if n not in fit)
    assert f"not a multiple of the group size {group}" in report.notes[narrow]
    assert all(report.notes[n].startswith("Conv2d") for n in convs)
    assert narrow in caplog.text and "stay float" in caplog.text  # logged, no traceback
    assert sqnr_db(_output(tiny_sd.unet), _output(quantized.unet)) > 10
    # Bits per weight: 4-bit codes plus one fp16 (int4) or e8m0 (MX) scale per group, float layers 32.
    elements = {n: m.weight.numel() for n, m in {**linears, **convs}.items()}
    scale_bits = 16 if "int4" in scheme else 8
    expected = sum((4 + scale_bits / group) * e if n in fit else 32 * e for n, e in elements.items())
    assert report.bits_per_weight == pytest.approx(expected / sum(elements.values()))


def test_conv8_recipe_puts_convolutions_and_narrow_linears_in_int8(tiny_sd, tiny_conv8):
    report = layer_report(tiny_conv8.unet)
    linears = _layers(tiny_sd.unet, torch.nn.Linear)
    convs = _layers(tiny_sd.unet, torch.nn.Conv2d)
    assert not report.float_layers
    int8 = {n for n, d in report.quantized.items() if d == "int8 per_channel"}
    assert int8 == set(convs) | {n for n, m in linears.items() if m.in_features % 16}
    assert {d for n, d in report.quantized.items() if n not in int8} == {"int4 per_group"}
    assert 4 < report.bits_per_weight < layer_report(quantize(tiny_sd, "int8-w-pc").unet).bits_per_weight


def test_bad_4bit_recipes_are_one_clear_line():
    with pytest.raises(DiffquantError, match="use one of 16, 32, 64, 128, 256"):
        PerGroup(48)
    with pytest.raises(DiffquantError, match="take PerGroup"):
        TensorQuant("int4", PerChannel())
    with pytest.raises(DiffquantError, match="groups are for 4-bit dtypes and int8"):
        TensorQuant("fp8_e4m3", PerGroup(64))
    with pytest.raises(DiffquantError, match="GGUF's Q8_0 blocks: weight-only, format gguf"):
        Recipe("x", TensorQuant("int8", PerGroup(32)))  # int8 blocks exist for GGUF's Q8_0 only
    with pytest.raises(DiffquantError, match="needs weights on a GGML block grid"):  # a branch GGUF cannot hold
        Recipe("x", TensorQuant("int8", PerGroup(32)), algorithm=SVDQuant(rank=16), format="gguf")
    with pytest.raises(DiffquantError, match="PerGroup\\(32\\)"):
        TensorQuant("mxfp4", PerGroup(64))
    with pytest.raises(DiffquantError, match="fallback"):
        Recipe("x", TensorQuant("int8"), fallback=TensorQuant("int8", PerChannel()))
    with pytest.raises(DiffquantError, match="weight-only"):
        Recipe("x", TensorQuant("int4", PerGroup(64)), TensorQuant("int8"))


@pytest.mark.parametrize("recipe", [CONV8_G16, "mxfp4-w"])
def test_packed_4bit_codes_round_trip_bit_exact_through_save_and_load(tiny_sd, tiny_sd_dir, tmp_path, recipe,
                                                                       monkeypatch):
    from safetensors.torch import load_file

    from diffquant import load_quantized, save_quantized

    quantized = quantize(tiny_sd, recipe)
    save_quantized(quantized, tmp_path / "q", model=str(tiny_sd_dir))
    saved = load_file(str(tmp_path / "q" / "unet_quantized.safetensors"))
    four = {n: m for n, m in quantized.unet.named_modules() if fourbit.weight_kind(m) in ("int4", "mxfp4")}
    assert four and all(f"{n}.weight" not in saved and saved[f"{n}.weight_packed4"].dtype == torch.uint8
                        for n in four)  # codes, not float master weights
    # int4 scales stored in fp16 (the codes were taken on them), MX scales as e8m0 exponent bytes
    assert all(saved[f"{n}._weight_quantizer.scale"].dtype == torch.float16 if fourbit.weight_kind(m) == "int4"
               else saved[f"{n}.weight_scale_e8m0"].dtype == torch.uint8 for n, m in four.items())
    monkeypatch.setattr(internals.import_quark().ModelQuantizer, "quantize_model", None)  # no re-quantization
    reloaded = load_quantized(tmp_path / "q", device="cpu")
    assert layer_report(reloaded.unet).quantized == layer_report(quantized.unet).quantized
    modules = dict(reloaded.unet.named_modules())
    for name, layer in four.items():
        nibbles, scale, kind = fourbit.group_codes(layer)
        nibbles_r, scale_r, kind_r = fourbit.group_codes(modules[name])
        assert kind == kind_r and torch.equal(nibbles, nibbles_r) and torch.equal(scale, scale_r)
        assert torch.equal(fourbit.dequantize_groups(nibbles, scale, kind), internals.fake_quantized_weight(layer))
    assert torch.equal(_output(quantized.unet), _output(reloaded.unet))


@pytest.fixture(scope="module")
def tiny_int4_export(tiny_int4, tmp_path_factory):
    return tiny_int4, export_onnx(tiny_int4, tmp_path_factory.mktemp("int4") / "int4-w")


def _matmul_nbits_output(node, initializers, a: np.ndarray) -> np.ndarray:
    """ONNX Runtime's MatMulNBits alone, with the exported node's weights, applied to `a`."""
    import onnxruntime as ort

    k = next(attr.i for attr in node.attribute if attr.name == "K")
    lone = onnx.helper.make_node("MatMulNBits", ["A", *node.input[1:3]], ["Y"], domain="com.microsoft",
                                 **{a_.name: onnx.helper.get_attribute_value(a_) for a_ in node.attribute})
    graph = onnx.helper.make_graph(
        [lone], "one", [onnx.helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [None, k])],
        [onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
        [initializers[node.input[1]], initializers[node.input[2]]])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": a})[0]


def test_int4_linears_export_as_matmul_nbits_that_ort_dequantizes_to_torchs_weights(tiny_int4_export):
    quantized, result = tiny_int4_export
    int4 = {n: m for n, m in quantized.unet.named_modules() if fourbit.weight_kind(m) == "int4"}
    assert result.nbits["layers"] == result.nbits["bit_exact_layers"] == len(int4)
    model = onnx.load(str(result.path))
    initializers = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == len(int4)
    for node in nodes:
        name = node.input[1].removesuffix(".weight_uint4")
        weight = internals.fake_quantized_weight(int4[name])  # (N, K)
        assert numpy_helper.to_array(initializers[node.input[1]]).dtype == np.uint8
        # A = identity: ORT's output is its dequantized weight (transposed), each sum one product and zeros.
        dequantized = _matmul_nbits_output(node, initializers, np.eye(weight.shape[1], dtype=np.float32))
        assert np.array_equal(dequantized, weight.T.numpy())
    # ONNX Runtime runs them (counted after its optimizations) and matches torch.
    assert result.fused_ops.get("MatMulNBits") == len(int4) and "DequantizeLinear" not in result.fused_ops
    assert result.relative_error <= MAX_RELATIVE_ERROR_NBITS


def test_openvino_runs_the_matmul_nbits_export_on_int4_weights_and_matches_onnx_runtime(tiny_int4_export):
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'diffquant[openvino]')")
    from diffquant.runtimes import get_runtime

    quantized, result = tiny_int4_export
    # each MatMulNBits is one FullyConnected whose weights stay 4-bit (u4) in OpenVINO's compiled model
    assert get_runtime("openvino").optimized_ops(result.path).get("FullyConnected u4") == result.nbits["layers"]
    inputs = example_inputs(quantized.unet, batch_size=2, sequence_length=16, seed=3)
    ort, ov = get_runtime("onnxruntime").run(result.path, inputs), get_runtime("openvino").run(result.path, inputs)
    assert np.linalg.norm(ov - ort) / np.linalg.norm(ort) < 0.01  # 0.36% on shapes-sd's 83 int4-w Linears


def test_a_large_int4_export_matches_the_in_memory_one(tiny_int4_export, tmp_path, monkeypatch):
    """Above the external-data size the int4 Linears' float weights are never loaded: the same graph results."""
    from diffquant.export import onnx as export_module
    from diffquant.runtimes import get_runtime

    quantized, in_memory = tiny_int4_export
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_ABOVE_BYTES", 0)  # treat the tiny UNet as > 2 GB
    result = export_onnx(quantized, tmp_path / "big")
    assert (tmp_path / "big" / "unet.onnx.data").is_file()
    assert result.op_counts == in_memory.op_counts and result.nbits == in_memory.nbits
    inputs = example_inputs(quantized.unet, batch_size=2, sequence_length=16, seed=3)
    ort = get_runtime("onnxruntime")
    assert np.array_equal(ort.run(result.path, inputs), ort.run(in_memory.path, inputs))


def test_int8_compute_asks_onnx_runtime_for_integer_dot_products(tiny_int4_export, tmp_path):
    """int4_compute="int8": every MatMulNBits carries accuracy_level 4 (ONNX Runtime rounds its input to int8
    per block), the weights are the same nibbles and scales, ORT still runs them all and stays within the
    export's bound of torch; an unknown choice is one line."""
    quantized, exact = tiny_int4_export
    result = export_onnx(quantized, tmp_path / "int8-compute", int4_compute="int8")
    nodes = [n for n in onnx.load(str(result.path)).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == exact.nbits["layers"] and result.nbits["accuracy_level"] == 4
    assert all(onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "accuracy_level")) == 4
               for n in nodes)
    exact_nodes = {n.name: n for n in onnx.load(str(exact.path)).graph.node if n.op_type == "MatMulNBits"}
    assert not any(a.name == "accuracy_level" for n in exact_nodes.values() for a in n.attribute)
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(result.path)).graph.initializer}
    exact_weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(exact.path)).graph.initializer}
    assert all(np.array_equal(weights[n.input[i]], exact_weights[exact_nodes[n.name].input[i]])
               for n in nodes for i in (1, 2))
    assert result.fused_ops.get("MatMulNBits") == len(nodes)
    assert result.relative_error <= result.relative_error_bound
    with pytest.raises(DiffquantError, match="unknown int4 compute 'int2': use float, int8 or auto"):
        export_onnx(quantized, tmp_path / "bad", int4_compute="int2")


def test_conv8_export_keeps_int8_convolutions_beside_matmul_nbits(tiny_conv8, tmp_path):
    result = export_onnx(tiny_conv8, tmp_path / "conv8")
    n_int4 = sum(fourbit.weight_kind(m) == "int4" for m in tiny_conv8.unet.modules())
    assert result.nbits["layers"] == n_int4 and result.fused_ops["MatMulNBits"] >= n_int4
    assert result.compression["int8_layers"] == sum(fourbit.weight_kind(m) == "int8" for m in tiny_conv8.unet.modules())
    assert result.relative_error <= result.relative_error_bound


def test_mxfp4_export_is_refused_in_one_line(tiny_sd, tmp_path):
    with pytest.raises(DiffquantError, match="MXFP4 .* no kernel"):
        export_onnx(quantize(tiny_sd, "mxfp4-w"), tmp_path / "mx")


def test_a_transformer_denoiser_runs_its_int4_linears_on_matmul_nbits(tiny_sd3, tmp_path):
    """A DiT is almost all Linear: every Linear that the group divides runs as MatMulNBits in ORT."""
    quantized = quantize(tiny_sd3, "int4-w")
    group = record_of(quantized.transformer).recipe.weight.granularity.size
    linears = _layers(tiny_sd3.transformer, torch.nn.Linear)
    int4 = {n for n, m in quantized.transformer.named_modules() if fourbit.weight_kind(m) == "int4"}
    assert int4 == {n for n, m in linears.items() if m.in_features % group == 0} and len(int4) > 20
    result = export_onnx(quantized, tmp_path / "sd3")
    assert result.nbits["layers"] == len(int4) and result.fused_ops["MatMulNBits"] == len(int4)
    assert result.relative_error <= MAX_RELATIVE_ERROR_NBITS


def test_a_run_refuses_to_export_mxfp4_before_any_slow_work(tmp_path, monkeypatch):
    from diffquant import RunConfig, run
    from diffquant.models import pipeline

    monkeypatch.setattr(pipeline, "load_pipeline", None)  # reaching it would fail differently
    with pytest.raises(DiffquantError, match="--no-export"):
        run(RunConfig(recipes=("int4-w", "mxfp4-w"), out=str(tmp_path / "run")))
