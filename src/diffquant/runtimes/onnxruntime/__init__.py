"""ONNX Runtime: sessions (`session`), the runtime (`OnnxRuntime`, `ort_pipeline`, `profile_operators`),
the graph rewrites that let its QDQ fusions run quantized layers on integer kernels (`rewrites`), and
fused attention (`attention`: one MultiHeadAttention per attention, flash attention on CPU)."""

from diffquant.passes.attention import fuse_attention
from diffquant.passes.qdq_fusion import FusionReport, prepare_for_ort_fusion
from diffquant.runtimes.onnxruntime.runtime import OnnxRuntime, OrtRunner, ort_pipeline, profile_operators, run_onnx
from diffquant.runtimes.onnxruntime.session import EXACT_INT8_PRODUCTS, int8_products_saturate, session, session_options

__all__ = ["EXACT_INT8_PRODUCTS", "FusionReport", "fuse_attention", "OnnxRuntime", "OrtRunner", "int8_products_saturate",
           "ort_pipeline", "prepare_for_ort_fusion", "profile_operators", "run_onnx", "session", "session_options"]
