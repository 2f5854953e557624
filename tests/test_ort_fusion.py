"""The rewrite that lets ONNX Runtime run the quantized layers on integer kernels: exact on hand-built
graphs (attention's shared inputs, a transformer's biased Gemm and fixed-shape MatMul + Add), and on
shapes-sd most Convs become QLinearConv and every Linear a MatMulIntegerToFloat or QGemm, with images
that match Quark's torch fake-quant."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from diffquant.runtimes.onnxruntime import prepare_for_ort_fusion
from diffquant.runtimes.onnxruntime import session_options

pytestmark = pytest.mark.slow  # exports, full runs or benchmarks: `pytest -m 'not slow'` leaves them out

RNG = np.random.default_rng(0)


def _run(model, feed, optimize: bool):
    options = session_options(optimize=optimize)  # diffquant's sessions: exact int8 products on every CPU
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def _fused_ops(model, tmp_path) -> list[str]:
    options = session_options()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


def _quark_like_linear_graph(identical_chains: bool):
    """What Quark exports for attention: one quantized input read by three Linears (weights stored
    as [out, in] int8 codes with zero zero points per output channel, as `compress_weights` writes
    them, then DequantizeLinear -> Transpose -> MatMul) and by
    a float ReduceSum. Small models get one shared QuantizeLinear -> DequantizeLinear chain; above
    2 GB the export has one identical chain per Linear, reading the same scale and zero point."""
    k, n = 32, 24
    initializers = [numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
                    numpy_helper.from_array(np.array(0, np.int8), "x_zero")]
    nodes = []
    for i in range(3):
        initializers += [numpy_helper.from_array(RNG.integers(-127, 128, (n, k)).astype(np.int8), f"w{i}"),
                         numpy_helper.from_array((RNG.random(n) + 0.5).astype(np.float32) * 1e-2, f"w{i}_scale"),
                         numpy_helper.from_array(np.zeros(n, np.int8), f"w{i}_zero")]
        chain = f"_{i}" if identical_chains else ""
        if identical_chains or i == 0:
            nodes += [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], [f"x_q{chain}"]),
                      helper.make_node("DequantizeLinear", [f"x_q{chain}", "x_scale", "x_zero"], [f"x_dq{chain}"])]
        nodes += [helper.make_node("DequantizeLinear", [f"w{i}", f"w{i}_scale", f"w{i}_zero"], [f"w{i}_dq"], axis=0),
                  helper.make_node("Transpose", [f"w{i}_dq"], [f"w{i}_t"], perm=[1, 0]),
                  helper.make_node("MatMul", [f"x_dq{chain}", f"w{i}_t"], [f"y{i}"])]
    if identical_chains:
        nodes.append(helper.make_node("DequantizeLinear", ["x_q_0", "x_scale", "x_zero"], ["x_dq"]))
    nodes += [helper.make_node("Concat", ["y0", "y1", "y2"], ["y"], axis=-1),
              helper.make_node("ReduceSum", ["x_dq"], ["s"], keepdims=1),
              helper.make_node("Add", ["y", "s"], ["out"])]
    graph = helper.make_graph(nodes, "linears", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 7, k])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 7, 3 * n])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


@pytest.mark.parametrize("identical_chains", [False, True])
def test_linear_rewrite_is_exact_and_unlocks_integer_matmuls(tmp_path, identical_chains):
    model = _quark_like_linear_graph(identical_chains)
    feed = {"x": RNG.standard_normal((2, 7, 32)).astype(np.float32)}
    before = _run(model, feed, optimize=False)
    assert "MatMulIntegerToFloat" not in _fused_ops(model, tmp_path)

    report = prepare_for_ort_fusion(model)
    onnx.checker.check_model(model)
    assert report.folded_transposes == 3
    # Each Linear ends up with its own chain and its own copies of the scale and zero point.
    assert report.split_quantize + report.distinct_quantize >= 2
    assert np.array_equal(_run(model, feed, optimize=False), before)  # same codes, same scales
    ops = _fused_ops(model, tmp_path)
    assert ops.count("MatMulIntegerToFloat") == 3 and "MatMul" not in ops and "Transpose" not in ops
    np.testing.assert_allclose(_run(model, feed, optimize=True), before, rtol=1e-4, atol=1e-4)


def _quantized_linear_with_bias(gemm: bool):
    """One quantized Linear with a float bias as Quark exports it for a transformer: on a 2-D input
    (an embedder or an AdaLayerNorm modulation) torch writes Gemm(x, W, b, transB=1); on a 3-D input
    of fixed shape (Flux's export) MatMul(x, W^T) -> Add(b), which ORT's MatMulAddFusion makes a Gemm."""
    k, n = 32, 24
    shape = [4, k] if gemm else [2, 7, k]
    weights = RNG.integers(-127, 128, (n, k)).astype(np.int8)
    initializers = [numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
                    numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
                    numpy_helper.from_array(weights if gemm else np.ascontiguousarray(weights.T), "w"),
                    numpy_helper.from_array((RNG.random(n) + 0.5).astype(np.float32) * 1e-2, "w_scale"),
                    numpy_helper.from_array(np.zeros(n, np.int8), "w_zero"),
                    numpy_helper.from_array(RNG.standard_normal(n).astype(np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["w_dq"], axis=0 if gemm else 1)]
    if gemm:
        nodes.append(helper.make_node("Gemm", ["x_dq", "w_dq", "b"], ["out"], transB=1))
    else:
        nodes += [helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"]), helper.make_node("Add", ["y", "b"], ["out"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [*shape[:-1], n])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


@pytest.mark.parametrize("gemm, kernel", [(True, "QGemm"), (False, "MatMulIntegerToFloat")])
def test_transformer_linears_with_a_bias_reach_an_integer_kernel(tmp_path, gemm, kernel):
    model = _quantized_linear_with_bias(gemm)
    feed = {"x": RNG.standard_normal((4, 32) if gemm else (2, 7, 32)).astype(np.float32)}
    before = _run(model, feed, optimize=False)
    ops = _fused_ops(model, tmp_path)
    assert "Gemm" in ops and kernel not in ops  # ORT runs it in float: dequantized weights, float Gemm

    report = prepare_for_ort_fusion(model)
    onnx.checker.check_model(model)
    assert (report.unbiased_gemms, report.shielded_biases) == ((1, 0) if gemm else (0, 1))
    assert np.array_equal(_run(model, feed, optimize=False), before)
    ops = _fused_ops(model, tmp_path)
    assert ops.count(kernel) == 1 and "Gemm" not in ops and "MatMul" not in ops
    np.testing.assert_allclose(_run(model, feed, optimize=True), before, rtol=1e-4, atol=1e-4)


def test_shapes_sd_runs_convs_and_every_linear_on_integer_kernels(shapes_ort_export, tmp_path, int8_products):
    from diffquant.export.onnx import example_inputs
    from diffquant.runtimes.onnxruntime import profile_operators

    quantized, exported = shapes_ort_export
    unet = quantized.unet
    quantized_layers = [m for m in unet.modules() if hasattr(m, "_weight_quantizer")]
    convs = [m for m in quantized_layers if "Conv2d" in type(m).__name__]
    linears = [m for m in quantized_layers if "Linear" in type(m).__name__]
    assert convs and linears
    assert all(m._output_quantizer is not None for m in convs)  # conv_output quantizes Conv2d only
    assert all(m._output_quantizer is None for m in linears)
    per_op, ops = profile_operators(exported.path, example_inputs(unet, 2, 16), tmp_path)
    # 45 of the 50: conv_in, the downsamplers and the conv_shortcut that reads one stay float in ORT.
    assert ops.get("QLinearConv", 0) >= 0.8 * len(convs)
    assert ops.get("QLinearConv", 0) + ops.get("Conv", 0) == len(convs)
    attention_linears = [n for n, m in unet.named_modules() if m in linears and "attentions" in n]
    assert ops.get("MatMulIntegerToFloat", 0) == len(attention_linears)
    # The time embedding's Linears, on a 2-D input, are Gemms: QGemm once their float bias is moved out.
    assert ops.get("QGemm", 0) == len(linears) - len(attention_linears) > 0 and "Gemm" not in ops
    assert per_op["QLinearConv"] > 0 and sum(per_op.values()) > 0
    assert exported.relative_error <= exported.relative_error_bound


def test_shapes_sd_images_from_onnx_runtime_match_torch_fake_quant(shapes_pipe, shapes_ort_export, int8_products):
    from diffquant import compare, generate
    from diffquant.core.cpu import cpu_features
    from diffquant.runtimes.onnxruntime import ort_pipeline
    from diffquant.models.shapes.dataset import sample_captions

    if int8_products == "u8s8" and not cpu_features().exact_u8s8:
        pytest.skip(f"u8 x s8 products saturate on this CPU ({cpu_features().describe()}): diffquant runs the exact "
                    "ones here, and the images of the saturating kernels are not expected to match")

    quantized, exported = shapes_ort_export
    prompts = sample_captions(4, seed=77)
    torch_images = generate(quantized, prompts, seed=0, steps=10)
    ort_images = generate(ort_pipeline(shapes_pipe, exported.path), prompts, seed=0, steps=10)
    assert compare(torch_images, ort_images, prompts).summary()["psnr_db"] >= 35


def test_fp8_w8a8_export_is_left_to_onnx_runtime_as_it_is(shapes_pipe, shapes_calibration, tmp_path):
    """The rewrites touch int8 chains only: split fp8 chains would make ORT fuse them into an
    integer MatMul that rejects fp8 (an invalid graph)."""
    from diffquant import export_onnx, quantize

    result = export_onnx(quantize(shapes_pipe, "w8a8-fp8", calibration=shapes_calibration),
                         tmp_path / "fp8")
    assert result.fusion["folded_transposes"] == result.fusion["split_quantize"] == 0
    assert result.weight_dtypes.get("FLOAT8E4M3FN", 0) > 0
    assert result.relative_error <= result.relative_error_bound  # ORT loaded and ran the graph
