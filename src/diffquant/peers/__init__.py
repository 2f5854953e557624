"""Other quantization libraries on the same model, captions and calibration, 8 and 4 bits."""
