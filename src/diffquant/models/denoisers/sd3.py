"""SD3Transformer2DModel: the MMDiT of Stable Diffusion 3 and 3.5 (a joint text/image attention stream,
pooled CLIP embeddings in the AdaLayerNorm modulation)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from diffquant.models.denoisers.base import Denoiser, register


@register
class SD3Denoiser(Denoiser):
    module_class = "SD3Transformer2DModel"
    pipeline_attribute = "transformer"
    positional = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
    capture_keys = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")

    def sequence_length(self, pipe=None) -> int:
        """CLIP tokens plus T5 tokens: the pipeline concatenates them along the sequence."""
        clip = getattr(pipe, "tokenizer", None)
        clip_length = clip.model_max_length if clip is not None else 77
        t5 = getattr(pipe, "tokenizer_3", None)
        return clip_length + (min(t5.model_max_length, 256) if t5 is not None else clip_length)

    def example_inputs(self, batch_size: int = 2, sequence_length: int | None = None,
                       seed: int = 0) -> dict[str, torch.Tensor]:
        config = self.config
        gen = torch.Generator().manual_seed(seed)
        size = config.sample_size
        inputs = {
            "hidden_states": torch.randn(batch_size, config.in_channels, size, size, generator=gen),  # (B, C, h, w)
            "encoder_hidden_states": torch.randn(batch_size, sequence_length or 77 + 256, config.joint_attention_dim,
                                                 generator=gen),  # (B, T, D)
            "pooled_projections": torch.randn(batch_size, config.pooled_projection_dim, generator=gen),  # (B, P)
            "timestep": torch.full((batch_size,), 500.0),  # (B,) sigma * 1000
        }
        return {k: v.to(self.module.device, self.module.dtype) for k, v in inputs.items()}

    @contextmanager
    def exportable(self) -> Iterator[None]:
        """The patch grid's position embedding as a constant crop: diffusers slices SD3's whole sincos table
        (pos_embed_max_size² tokens: 384 x 384 x 1536 floats, 906 MB, at SD3.5's widths) with indices traced
        from the latent's shape, so the exported graph would store the whole table although its spatial size
        is fixed (only the batch is dynamic). With the crop's indices as Python ints the exporter folds the
        slice into an initializer of the tokens the graph uses."""
        embeds = [m for m in self.module.modules() if getattr(m, "pos_embed_max_size", None) is not None
                  and hasattr(m, "cropped_pos_embed")]
        for m in embeds:
            m.cropped_pos_embed = _constant_crop(m)
        try:
            yield
        finally:
            for m in embeds:
                del m.cropped_pos_embed


def _constant_crop(embed):
    crop = type(embed).cropped_pos_embed.__get__(embed)
    return lambda height, width: crop(int(height), int(width))
