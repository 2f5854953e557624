"""SanaTransformer2DModel: Sana (a DiT on a 32x deep-compression VAE's latents: linear self-attention, softmax
cross-attention to Gemma-2 text features, convolutional GLU feed-forwards). The text padding mask is a graph
input; Sana-Sprint's guidance embedding, where the model has one, is too."""

from __future__ import annotations

import math

import torch

from diffquant.models.denoisers.base import Denoiser, call_default, caption_inputs, register


@register
class SanaDenoiser(Denoiser):
    module_class = "SanaTransformer2DModel"
    pipeline_attribute = "transformer"
    positional = ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask", "guidance")
    capture_keys = positional
    # no original layout here: diffusers' single-file loader reads Sana's original checkpoints, GGUF is not wired

    def default_size(self, pipe) -> tuple[int, int]:
        """The trained size: SanaPipeline draws 1024x1024 whatever the model (Sana 512 included)."""
        side = int(self.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 32))
        return side, side

    def size_multiple(self, pipe) -> int:
        # diffusers' Sana pipelines refuse sizes that are not multiples of 32, whatever their VAE's scale
        return math.lcm(32, super().size_multiple(pipe))

    def sequence_length(self, pipe=None) -> int:
        """The Gemma tokens the pipeline pads to (300; its profile asks for the same)."""
        return int(call_default(pipe, "max_sequence_length", 300))

    def example_inputs(self, batch_size: int = 2, sequence_length: int | None = None,
                       seed: int = 0, latent: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        config = self.config
        inputs = caption_inputs(config, batch_size, sequence_length or 300, latent, torch.tensor([500.0]), seed)
        if config.guidance_embeds:  # Sana-Sprint
            inputs["guidance"] = torch.full((batch_size,), 4.5)  # (B,)
        return {k: v.to(self.module.device, self.module.dtype) for k, v in inputs.items()}
