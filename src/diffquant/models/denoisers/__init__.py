"""Denoiser families: what diffquant must know about a UNet or a DiT, one small class per diffusers class.

    family = denoiser_of(pipe)          # the family of pipe.unet or pipe.transformer
    family.module                       # the torch module itself
    family.example_inputs(batch_size=2) # flat ONNX inputs shaped from its config

Adding a family is one new module here that subclasses `Denoiser` and registers itself.
"""

from diffquant.models.denoisers.base import DENOISERS, Denoiser, denoiser_for, denoiser_of, register, supported_classes
from diffquant.models.denoisers import unet, sd3, flux, pixart, sana  # noqa: F401, I001  (registers the families, UNet first)

__all__ = ["DENOISERS", "Denoiser", "denoiser_for", "denoiser_of", "register", "supported_classes"]
