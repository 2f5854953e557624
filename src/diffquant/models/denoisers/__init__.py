"""Denoiser families: what diffquant must know about a UNet or a DiT, one small class per diffusers class.

    family = denoiser_of(pipe)          # the family of pipe.unet or pipe.transformer
    family.module                       # the torch module itself
    family.example_inputs(batch_size=2) # flat ONNX inputs shaped from its config

Adding a family is one new module here that subclasses `Denoiser` and registers itself: every module of this
package is imported (and so registered) here, the first four families first, the others by name.
"""

import importlib
import pkgutil

from diffquant.models.denoisers.base import DENOISERS, Denoiser, denoiser_for, denoiser_of, register, supported_classes

_FIRST = ("unet", "sd3", "flux")  # the order `supported_classes` lists them in
_HELPERS = ("base", "layout")
for _module in (*_FIRST, *sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _FIRST + _HELPERS)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["DENOISERS", "Denoiser", "denoiser_for", "denoiser_of", "register", "supported_classes"]
