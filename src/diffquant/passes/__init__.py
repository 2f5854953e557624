"""ONNX graph helpers and passes (constant ownership, QDQ fusion preparation, attention fusion); onnx only."""
