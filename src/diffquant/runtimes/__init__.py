"""Runtimes: engines that run an exported denoiser graph, each one class behind a registry.

    runtime = get_runtime("onnxruntime")
    ort_pipe = runtime.pipeline(pipe, "out/int8-w/unet.onnx")   # the denoiser runs in the runtime
    get_runtime("openvino").pipeline(pipe, "out/int8-w/unet.onnx")   # the same file in OpenVINO
    runtime.optimized_ops(path)                                  # which kernels really run

Adding a runtime is one new module here that subclasses `Runtime` and registers itself.
"""

from diffquant.runtimes.base import RUNTIMES, GraphDenoiser, GraphRunner, Runtime, get_runtime, register
from diffquant.runtimes import onnxruntime, openvino  # noqa: F401, I001  (register the runtimes; openvino is imported lazily)

__all__ = ["RUNTIMES", "GraphDenoiser", "GraphRunner", "Runtime", "get_runtime", "register"]
