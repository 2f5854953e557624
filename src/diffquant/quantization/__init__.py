"""Quantizing a denoiser: the quantize/save/load API, calibration, prompt sources, smoothing, backends."""
