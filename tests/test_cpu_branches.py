"""Every ONNX file diffquant writes opens and runs in ONNX Runtime with and without exact int8 products
(the branch an AVX2-only CPU takes, and the one a VNNI/AMX CPU takes), whatever CPU runs the tests: every
exportable recipe on the tiny UNet, SD3 and Flux, each branch forced through `diffquant.core.cpu`.

The exact branch failed to load every int8 graph before the export stopped sharing quantization constants
("Attempt to replace the existing tensor": ONNX Runtime rewrites each int8 weight's zero point per node)."""

from collections import Counter

import numpy as np
import onnx
import pytest

from diffquant.core.cpu import cpu_features, forced
from diffquant.models.denoisers import denoiser_of
from diffquant.core.errors import DiffquantError
from diffquant.export.onnx import missing_activation_quantizers
from diffquant.core.recipes import RECIPES
from diffquant.quantization.backends import get_backend
from diffquant.runtimes.onnxruntime import OnnxRuntime

pytestmark = pytest.mark.slow  # exports, full runs or benchmarks: `pytest -m 'not slow'` leaves them out


def _exportable(name: str) -> bool:
    try:
        get_backend().check_recipes([RECIPES[name]])
    except DiffquantError:
        return False
    return True


EXPORTABLE = [name for name in RECIPES if _exportable(name)]
INTEGER_KERNELS = ("MatMulIntegerToFloat", "QGemm", "QLinearConv", "QLinearMatMul", "MatMulNBits")


def _export(family, recipe: str):
    try:
        return family.export(recipe)
    except DiffquantError as error:  # a recipe that does not apply to this model says so in one line
        if "group size" in str(error):
            pytest.skip(f"{recipe} on the tiny {family.name}: {error}")
        raise


def test_every_exportable_recipe_is_covered():
    assert {"int8-w", "w8a8-int8", "w8a8-int8-ort", "w8a8-fp8", "int4-w", "int4-w-gptq"} <= set(EXPORTABLE)
    assert set(TRANSFORMER_RECIPES) <= set(EXPORTABLE)
    assert "mxfp4-w" not in EXPORTABLE and "svdquant-w4a4" not in EXPORTABLE and "q8_0" not in EXPORTABLE


# The transformers take one recipe per export path (int8 weights per tensor and per channel, W8A8 activation
# QDQ with smoothing, fp8, MatMulNBits, MatMulNBits beside SVDQuant's float branch); the UNet takes every
# exportable recipe. Every recipe on all three cost 28 more exports (about 3 minutes of the suite) and
# found nothing the UNet's did not.
TRANSFORMER_RECIPES = ("int8-w", "int8-w-pc", "w8a8-int8-ort-sq", "w8a8-fp8", "int4-w-gptq", "svdquant-w4a16")


CASES = [("unet", r) for r in EXPORTABLE] + [(f, r) for f in ("sd3", "flux") for r in TRANSFORMER_RECIPES]


@pytest.mark.parametrize(("family_name", "recipe"), CASES, ids=[f"{f}-{r}" for f, r in CASES])
def test_the_export_opens_and_runs_with_and_without_exact_int8_products(tiny_families, family_name, recipe):
    family = tiny_families(family_name)
    quantized, exported = _export(family, recipe)
    model = onnx.load(str(exported.path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    readers = Counter(name for node in model.graph.node for name in set(node.input) if name in initializers)
    shared = [name for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
              for name in node.input if readers[name] > 1]
    assert shared == []  # what ONNX Runtime's exact-int8 transform rewrites per node is the node's own
    assert missing_activation_quantizers(model, denoiser_of(quantized).module) == []

    feed = {name: family.family.graph_inputs(family.records[0])[name] for name in exported.inputs}
    if not family.family.dynamic_batch:
        feed = {k: v if k in family.family.unbatched_inputs else v[:1] for k, v in feed.items()}
    outputs, kernels = {}, {}
    for exact in ("1", "0"):
        with forced(ort_exact_int8=exact):
            runtime = OnnxRuntime()
            ops = runtime.optimized_ops(exported.path)  # a fresh session under this branch's options
            kernels[exact] = {k: v for k, v in ops.items() if k in INTEGER_KERNELS}
            outputs[exact] = runtime.run(exported.path, feed)
        assert np.isfinite(outputs[exact]).all()
    assert kernels["1"] == kernels["0"]  # the exact products still run on the fused integer kernels
    if cpu_features().exact_u8s8:  # VNNI/AMX: both branches multiply exactly, so they agree
        difference = np.linalg.norm(outputs["1"] - outputs["0"]) / max(np.linalg.norm(outputs["0"]), 1e-12)
        assert difference < 1e-4


def test_the_export_check_fails_when_the_graph_bypasses_an_activation_quantizer(tiny_families, tmp_path,
                                                                               monkeypatch):
    """One activation QuantizeLinear -> DequantizeLinear pair is taken out of a W8A8 fp8 graph as it is
    written (its layer then reads float activations: a change within the relative-error bound when the
    quantizer's rounding is small): the export check names the torch quantizer that has no counterpart in
    the graph, and the folder is not left behind."""
    import diffquant.passes.graph as onnx_graph
    from diffquant.export.onnx import export_onnx

    unet = tiny_families("unet")
    quantized, exported = unet.export("w8a8-fp8")
    module = denoiser_of(quantized).module
    assert missing_activation_quantizers(onnx.load(str(exported.path)), module) == []
    own = onnx_graph.own_quantization_constants

    def bypass_one_then_own(graph):
        initializers = {t.name for t in graph.initializer}
        q = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in initializers)
        assert _bypass(graph, q) >= 1
        return own(graph)

    monkeypatch.setattr(onnx_graph, "own_quantization_constants", bypass_one_then_own)
    with pytest.raises(DiffquantError, match=r"has no QuantizeLinear for 1 activation quantizer\(s\) of the torch unet "
                                             r"\(first: .*\.(input|output)\): the export bypassed"):
        export_onnx(quantized, tmp_path / "bypassed")
    assert not (tmp_path / "bypassed").exists()  # nothing half-checked left behind


def _bypass(graph, q) -> int:
    """Rewire every reader of `q`'s DequantizeLinear (and of any other QuantizeLinear with the same scale value:
    ONNX Runtime's fusion form quantizes one tensor once per layer) to the float input; returns how many
    QuantizeLinear nodes were removed."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    value = numpy_helper.to_array(initializers[q.input[1]]).tobytes()
    removed = 0
    for quantize in [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[1] in initializers
                     and numpy_helper.to_array(initializers[n.input[1]]).tobytes() == value]:
        for dq in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == quantize.output[0]]:
            for node in graph.node:
                for k, name in enumerate(node.input):
                    if name == dq.output[0]:
                        node.input[k] = quantize.input[0]
            graph.node.remove(dq)
        graph.node.remove(quantize)
        removed += 1
    return removed
