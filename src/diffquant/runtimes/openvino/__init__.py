"""OpenVINO: the same exported ONNX file (QDQ int8 or float, fused attention included) compiled for the
CPU, with the precision of every kernel it runs counted from its runtime model."""

from diffquant.runtimes.openvino.runtime import OpenVino, OvRunner, kernel_precisions, openvino_pipeline

__all__ = ["OpenVino", "OvRunner", "kernel_precisions", "openvino_pipeline"]
