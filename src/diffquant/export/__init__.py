"""Writing a quantized denoiser to ONNX (checked in ONNX Runtime), the Optimum layout, the Netron viewer."""
