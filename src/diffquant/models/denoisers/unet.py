"""UNet2DConditionModel: SD 1.x/2.x and SDXL (whose pooled text and size/crop ids come in added_cond_kwargs)."""

from __future__ import annotations

import math
import re

import torch

from diffquant.models.denoisers.base import Denoiser, register
from diffquant.models.denoisers.layout import Layout, whole

# LDM names of a ResNet's parts, and of the layers outside the blocks.
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


@register
class UNetDenoiser(Denoiser):
    module_class = "UNet2DConditionModel"
    pipeline_attribute = "unet"
    positional = ("sample", "timestep", "encoder_hidden_states")
    capture_keys = ("sample", "timestep", "encoder_hidden_states", "added_cond_kwargs", "timestep_cond", "class_labels")

    original_prefix = "model.diffusion_model."  # diffusers' LDM converter reads only keys under it

    def size_multiple(self, pipe) -> int:
        # diffusers' SD and SDXL pipelines refuse sizes that are not multiples of 8, whatever their VAE's scale
        return math.lcm(8, super().size_multiple(pipe))

    @property
    def sdxl(self) -> bool:
        return self.config.addition_embed_type == "text_time"

    @property
    def gguf_arch(self) -> str:
        return "sdxl" if self.sdxl else "sd1"

    def original_layout(self, rows: dict[str, int]) -> Layout:
        """LDM names (input_blocks / middle_block / output_blocks); transformer internals keep their names."""
        per_block = self.config.layers_per_block
        per_block = per_block[0] if isinstance(per_block, (list, tuple)) else per_block
        span = per_block + 1  # LDM blocks per diffusers down or up block: its ResNets and one sampler
        up_attentions = {int(m[1]) for k in rows if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}

        def resnet(rest: str) -> str:
            part, _, leaf = rest.partition(".")
            return f"{_RESNET[part]}.{leaf}"

        # (diffusers pattern, its LDM name from the match) for the tensors inside the down, mid and up blocks.
        blocks = (
            (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$",
             lambda m: f"input_blocks.{span * int(m[1]) + int(m[2]) + 1}.0.{resnet(m[3])}"),
            (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$",
             lambda m: f"input_blocks.{span * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"),
            (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", lambda m: f"input_blocks.{span * (int(m[1]) + 1)}.0.op.{m[2]}"),
            (r"mid_block\.resnets\.(\d+)\.(.+)$", lambda m: f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"),
            (r"mid_block\.attentions\.0\.(.+)$", lambda m: f"middle_block.1.{m[1]}"),
            (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$",
             lambda m: f"output_blocks.{span * int(m[1]) + int(m[2])}.0.{resnet(m[3])}"),
            (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$",
             lambda m: f"output_blocks.{span * int(m[1]) + int(m[2])}.1.{m[3]}"),
            (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$",
             lambda m: f"output_blocks.{span * int(m[1]) + span - 1}.{2 if int(m[1]) in up_attentions else 1}.conv.{m[2]}"),
        )
        layout = {}
        for key in rows:
            head, _, leaf = key.rpartition(".")
            name = f"{_TOP[head]}.{leaf}" if head in _TOP else next(
                (rename(m) for pattern, rename in blocks if (m := re.match(pattern, key))), None)
            if name is None:
                raise ValueError(f"no LDM name for the UNet tensor {key}")
            layout[name] = whole(key, rows)
        return layout

    def example_inputs(self, batch_size: int = 2, sequence_length: int | None = None,
                       seed: int = 0, latent: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        config = self.config
        size = config.sample_size
        height, width = latent or ((size, size) if isinstance(size, int) else tuple(size))
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
