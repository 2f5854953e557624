"""UNet2DConditionModel: SD 1.x/2.x and SDXL (whose pooled text and size/crop ids come in added_cond_kwargs)."""

from __future__ import annotations

import torch

from diffquant.models.denoisers.base import Denoiser, register


@register
class UNetDenoiser(Denoiser):
    module_class = "UNet2DConditionModel"
    pipeline_attribute = "unet"
    positional = ("sample", "timestep", "encoder_hidden_states")
    capture_keys = ("sample", "timestep", "encoder_hidden_states", "added_cond_kwargs", "timestep_cond", "class_labels")

    @property
    def sdxl(self) -> bool:
        return self.config.addition_embed_type == "text_time"

    def example_inputs(self, batch_size: int = 2, sequence_length: int | None = None,
                       seed: int = 0) -> dict[str, torch.Tensor]:
        config = self.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        cross = config.cross_attention_dim
        cross = cross[0] if isinstance(cross, (list, tuple)) else cross
        gen = torch.Generator().manual_seed(seed)
        inputs = {
            "sample": torch.randn(batch_size, config.in_channels, height, width, generator=gen),  # (B, C, h, w)
            "timestep": torch.full((batch_size,), 500, dtype=torch.int64),  # (B,)
            "encoder_hidden_states": torch.randn(batch_size, sequence_length or 77, cross, generator=gen),  # (B, T, D)
        }
        if self.sdxl:  # pooled text embeds + 6 size/crop ids
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            inputs["text_embeds"] = torch.randn(batch_size, pooled, generator=gen)  # (B, P)
            inputs["time_ids"] = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(batch_size, 1)
        device, dtype = self.module.device, self.module.dtype
        return {k: v.to(device) if v.dtype == torch.int64 else v.to(device, dtype) for k, v in inputs.items()}

    def flat_inputs(self, record: dict) -> dict[str, torch.Tensor]:
        flat = {k: record[k] for k in self.positional}
        added = record.get("added_cond_kwargs") or {}
        flat |= {k: added[k] for k in ("text_embeds", "time_ids") if k in added}
        return flat

    def input_names(self, inputs: dict) -> list[str]:
        return [k for k in (*self.positional, "text_embeds", "time_ids") if k in inputs]

    def forward_kwargs(self, flat: dict[str, torch.Tensor]) -> dict:
        kwargs = {k: v for k, v in flat.items() if k not in ("text_embeds", "time_ids")}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": flat["text_embeds"], "time_ids": flat["time_ids"]}
        return kwargs
