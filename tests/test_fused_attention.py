"""Fused attention: every attention of the exported denoiser becomes one com.microsoft.MultiHeadAttention
(ONNX Runtime's flash-attention kernel), in the fp32 and in the int8 QDQ graph, with the same outputs
in float and the same images."""

import numpy as np
import onnx
import pytest
import torch

from diffquant.export.onnx import example_inputs, export_fp32_onnx
from diffquant.runtimes.onnxruntime import OnnxRuntime, fuse_attention, ort_pipeline

pytestmark = pytest.mark.slow  # exports, full runs or benchmarks: `pytest -m 'not slow'` leaves them out


def _attention_count(unet: torch.nn.Module) -> int:
    from diffusers.models.attention_processor import Attention

    return sum(isinstance(m, Attention) for m in unet.modules())


def _fused_copy(path, out_dir):
    model = onnx.load(str(path))
    fused = fuse_attention(model)
    onnx.checker.check_model(model)
    out_dir.mkdir()
    onnx.save(model, str(out_dir / path.name))
    return fused, out_dir / path.name


@pytest.fixture(scope="module")
def shapes_unfused(shapes_pipe, shapes_calibration, tmp_path_factory):
    """A function: recipe -> shapes-sd quantized by it and exported with torch's own attention (MatMul,
    Softmax, MatMul), each exported once."""
    from diffquant import export_onnx, quantize

    cache = {}

    def exported(recipe: str):
        if recipe not in cache:
            quantized = quantize(shapes_pipe, recipe, calibration=shapes_calibration, profile_exclusions=False)
            cache[recipe] = export_onnx(quantized, tmp_path_factory.mktemp("unfused") / recipe, fuse_attention=False)
        return cache[recipe]

    return exported


def test_fp32_attention_rewrite_is_exact_in_float_and_counted(shapes_pipe, tmp_path):
    unet = shapes_pipe.unet
    unfused = export_fp32_onnx(unet, tmp_path / "unfused", sequence_length=16, fuse_attention=False)
    fused = export_fp32_onnx(unet, tmp_path / "fused", sequence_length=16)
    runtime = OnnxRuntime()
    before, after = runtime.optimized_ops(unfused), runtime.optimized_ops(fused)
    attentions = _attention_count(unet)
    assert attentions == 14 and before.get("Softmax") == attentions and "MultiHeadAttention" not in before
    # Every attention (self and cross) is one MultiHeadAttention; no score matrix is left in the graph.
    assert after.get("MultiHeadAttention") == attentions and "Softmax" not in after
    # QK^T and softmax(.)V leave (ORT runs the scaled QK^T as FusedMatMul); the projections stay MatMul.
    float_matmuls = lambda ops: ops.get("MatMul", 0) + ops.get("FusedMatMul", 0)  # noqa: E731
    assert float_matmuls(before) - float_matmuls(after) == 2 * attentions
    inputs = example_inputs(unet, batch_size=2, sequence_length=16, seed=3)
    reference, output = runtime.run(unfused, inputs), runtime.run(fused, inputs)
    assert np.abs(output - reference).max() <= 1e-5 * max(1.0, np.abs(reference).max())


def test_int8_attention_rewrite_keeps_the_integer_projections(shapes_pipe, shapes_unfused, tmp_path):
    exported = shapes_unfused("w8a8-int8-ort")
    assert exported.fusion["fused_attention"] == 0
    fused_count, fused = _fused_copy(exported.path, tmp_path / "fused")
    attentions = _attention_count(shapes_pipe.unet)
    assert fused_count == attentions
    runtime = OnnxRuntime()
    before, after = runtime.optimized_ops(exported.path), runtime.optimized_ops(fused)
    assert after.get("MultiHeadAttention") == attentions and "Softmax" not in after and "MatMul" not in after
    # q, k, v and out projections still run on integer kernels; only softmax(QK^T)V moved into the kernel.
    assert after["MatMulIntegerToFloat"] == before["MatMulIntegerToFloat"] > 0
    assert after["QLinearConv"] == before["QLinearConv"]
    inputs = example_inputs(shapes_pipe.unet, batch_size=2, sequence_length=16, seed=4)
    reference, output = runtime.run(exported.path, inputs), runtime.run(fused, inputs)
    # Exact in float is the fp32 test above; here activations are re-quantized after attention, so a 1e-7
    # difference can flip a rounding and the flip cascades through later quantizers (one call of the
    # retrained shapes-sd: identical outputs for two input seeds, 3.7% relative for a third). The fused
    # graph must stay within the bound the export itself allows between ONNX Runtime and torch.
    assert np.linalg.norm(output - reference) <= exported.relative_error_bound * np.linalg.norm(reference)


# Weight-only: the fused graph's images equal the unfused ones to float rounding (>= 45 dB). W8A8
# re-quantizes activations, so a 1e-7 difference in attention's float output now and then lands an
# activation on the other side of a rounding boundary, and 10 steps carry it on: 43.7 dB measured.
@pytest.mark.parametrize("recipe, min_psnr_db", [("int8-w", 45), ("w8a8-int8-ort", 40)])
def test_fused_attention_gives_the_same_images(shapes_pipe, shapes_unfused, tmp_path, recipe, min_psnr_db):
    from diffquant import compare, generate
    from diffquant.models.shapes.dataset import sample_captions

    unfused = shapes_unfused(recipe).path
    _, fused = _fused_copy(unfused, tmp_path / "fused")
    prompts = sample_captions(4, seed=21)
    images = generate(ort_pipeline(shapes_pipe, unfused), prompts, seed=0, steps=10)
    fused_images = generate(ort_pipeline(shapes_pipe, fused), prompts, seed=0, steps=10)
    assert compare(images, fused_images, prompts).summary()["psnr_db"] >= min_psnr_db


def test_a_default_export_fuses_attention(shapes_pipe, shapes_calibration, tmp_path):
    """`export_onnx` writes the fused graph unless told not to (the report counts it)."""
    from diffquant import export_onnx, quantize

    exported = export_onnx(quantize(shapes_pipe, "int8-w"), tmp_path / "int8-w")
    assert exported.fusion["fused_attention"] == _attention_count(shapes_pipe.unet)
    assert exported.fused_ops["MultiHeadAttention"] == exported.fusion["fused_attention"]
    assert exported.relative_error <= exported.relative_error_bound


def _sdpa_graph(scale: float, heads: int = 2, width: int = 8, s: int = 6, kv: int = 5):
    """The attention torch exports for F.scaled_dot_product_attention with an explicit `scale`: each of
    q and k multiplied by sqrt(scale) after the head split; K and V of another length (cross-attention)."""
    from onnx import TensorProto, helper, numpy_helper

    d = width // heads
    consts = [numpy_helper.from_array(np.array([0, -1, heads, d], np.int64), "split"),
              numpy_helper.from_array(np.array([0, -1, width], np.int64), "merge"),
              numpy_helper.from_array(np.array(np.sqrt(scale), np.float32), "factor")]
    nodes = []
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("Reshape", [name, "split"], [f"{name}4"]),
                  helper.make_node("Transpose", [f"{name}4"], [f"{name}t"], perm=perm)]
    nodes += [helper.make_node("Mul", ["qt", "factor"], ["qs"]), helper.make_node("Mul", ["kt", "factor"], ["ks"]),
              helper.make_node("MatMul", ["qs", "ks"], ["scores"]), helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "vt"], ["o4"]),
              helper.make_node("Transpose", ["o4"], ["ot"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ot", "merge"], ["out"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, length, width])
              for n, length in (("q", s), ("k", kv), ("v", kv))]
    graph = helper.make_graph(nodes, "sdpa", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                                                    [2, s, width])], consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_an_explicit_scale_becomes_the_scale_attribute():
    import onnxruntime as ort

    from diffquant.runtimes.onnxruntime import session_options

    rng = np.random.default_rng(0)
    feed = {"q": rng.standard_normal((2, 6, 8)).astype(np.float32),
            "k": rng.standard_normal((2, 5, 8)).astype(np.float32),
            "v": rng.standard_normal((2, 5, 8)).astype(np.float32)}

    def run(model):
        session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
        return session.run(None, feed)[0]

    model = _sdpa_graph(scale=0.3)
    before = run(model)
    assert fuse_attention(model) == 1
    onnx.checker.check_model(model)
    [mha] = [n for n in model.graph.node]
    assert (mha.op_type, mha.domain) == ("MultiHeadAttention", "com.microsoft")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in mha.attribute}
    assert attributes["num_heads"] == 2 and attributes["scale"] == pytest.approx(0.3)
    np.testing.assert_allclose(run(model), before, rtol=1e-5, atol=1e-6)
