"""PixArtTransformer2DModel: PixArt-α and PixArt-Σ (a DiT with T5 cross-attention, AdaLN-single timestep
modulation, and learned variance: its output has twice the latent's channels, of which the pipeline keeps the
first half). The T5 padding mask is a graph input: the model turns it into an attention bias."""

from __future__ import annotations

import torch

from diffquant.models.denoisers.base import Denoiser, caption_inputs, register


@register
class PixArtDenoiser(Denoiser):
    module_class = "PixArtTransformer2DModel"
    pipeline_attribute = "transformer"
    positional = ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask")
    capture_keys = ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask",
                    "added_cond_kwargs")
    text_tokens = 300  # T5 tokens: PixArt-Σ's 300 (PixArt-α's pipeline defaults to 120)
    # no original layout here: diffusers' single-file (and so GGUF) loader does not cover PixArt

    def example_inputs(self, batch_size: int = 2, sequence_length: int | None = None,
                       seed: int = 0, latent: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        inputs = caption_inputs(self.config, batch_size, sequence_length or 300, latent,
                                torch.tensor([500], dtype=torch.int64), seed)
        height, width = inputs["hidden_states"].shape[-2:]
        if self.size_conditioned:  # the image's (height, width) in pixels and its aspect ratio, per sample
            inputs["resolution"] = torch.tensor([[height * 8.0, width * 8.0]]).repeat(batch_size, 1)  # (B, 2)
            inputs["aspect_ratio"] = torch.full((batch_size, 1), height / width)  # (B, 1)
        device, dtype = self.module.device, self.module.dtype
        return {k: v.to(device) if v.dtype == torch.int64 else v.to(device, dtype) for k, v in inputs.items()}

    @property
    def size_conditioned(self) -> bool:
        """PixArt-α at 1024 takes the image's resolution and aspect ratio as inputs; Σ and α-512 do not."""
        return bool(getattr(self.module, "use_additional_conditions", False))

    def flat_inputs(self, record: dict) -> dict[str, torch.Tensor]:
        flat = {k: record[k] for k in self.positional if isinstance(record.get(k), torch.Tensor)}
        added = record.get("added_cond_kwargs") or {}
        return flat | {k: added[k] for k in CONDITIONS if isinstance(added.get(k), torch.Tensor)}

    def input_names(self, inputs: dict) -> list[str]:
        return [k for k in (*self.positional, *CONDITIONS) if isinstance(inputs.get(k), torch.Tensor)]

    def forward_kwargs(self, flat: dict[str, torch.Tensor]) -> dict:
        # the module reads the dict's keys even where it takes no size conditioning (their values are then None)
        kwargs = {k: v for k, v in flat.items() if k not in CONDITIONS}
        return kwargs | {"added_cond_kwargs": {k: flat.get(k) for k in CONDITIONS}}


CONDITIONS = ("resolution", "aspect_ratio")
