"""Quantization backends: each library that quantizes a denoiser sits behind one small class.

    backend = get_backend("quark")
    backend.quantize(module, recipe, excluded, calibration)
    backend.restore(float_module, recipe, excluded, state)   # reload without calibration

Adding a backend is one new folder here whose class subclasses `QuantBackend` and registers itself.
Importing this package is cheap: a backend imports its library only when it is used.
"""

from diffquant.quantization.backends.base import (BACKENDS, DEFAULT_BACKEND, QUANTIZABLE, LayerReport, QuantBackend, Storage,
                                              TracedGraph, backend_of, get_backend, register)
from diffquant.quantization.backends import quark  # noqa: F401, I001  (registers the Quark backend)

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "QUANTIZABLE", "LayerReport", "QuantBackend", "Storage", "TracedGraph", "backend_of",
           "get_backend", "register"]
