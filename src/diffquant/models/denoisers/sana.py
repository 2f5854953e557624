"""SanaTransformer2DModel: Sana (a DiT on a 32x deep-compression VAE's latents: linear self-attention, softmax
cross-attention to Gemma-2 text features, convolutional GLU feed-forwards). The text padding mask is a graph
input; Sana-Sprint's guidance embedding, where the model has one, is too."""

from __future__ import annotations

import math

import torch

from diffquant.models.denoisers.base import Denoiser, caption_inputs, register
from diffquant.models.denoisers.layout import Layout, stacked, whole


@register
class SanaDenoiser(Denoiser):
    module_class = "SanaTransformer2DModel"
    pipeline_attribute = "transformer"
    positional = ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask", "guidance")
    capture_keys = positional
    text_tokens = 300  # Gemma-2 tokens

    # ComfyUI-GGUF has no Sana (its loader's IMG_ARCH_LIST and tools/convert.py's arch_list name none, so it refuses
    # this file): "sana" is the name its converter's scheme would give; diffusers' loader does not read the arch.
    gguf_arch = "sana"

    def original_layout(self, rows: dict[str, int]) -> Layout:
        """Sana's own names (NVlabs' checkpoints: blocks.N with a fused self-attention qkv and a fused cross-
        attention kv_linear), the inverse of diffusers' `convert_sana_transformer_to_diffusers`. That converter pops
        `pos_embed` and `y_embedder.y_embedding` (Sana's positional table and null caption, which diffusers' model
        has no use for) without a default, so the layout writes both as empty (0-row) placeholders. It names no qk
        norm (Sana 1.5), guidance embedder (Sana-Sprint) or self-attention bias: a model with any is refused."""
        blocks = sorted({int(k.split(".")[1]) for k in rows if k.startswith("transformer_blocks.")})
        renames = dict(_TOP) | {f"transformer_blocks.{i}.{d}": f"blocks.{i}.{o}" for i in blocks for d, o in _BLOCK}
        layout: Layout = {"pos_embed": [("scale_shift_table", 0, 0)],
                          "y_embedder.y_embedding": [("scale_shift_table", 0, 0)]}
        for d, o in renames.items():
            layout |= {f"{o}.{leaf}": whole(f"{d}.{leaf}", rows) for leaf in ("weight", "bias")
                       if f"{d}.{leaf}" in rows}
        layout |= {f"blocks.{i}.scale_shift_table": whole(f"transformer_blocks.{i}.scale_shift_table", rows)
                   for i in blocks}
        layout["final_layer.scale_shift_table"] = whole("scale_shift_table", rows)
        for i in blocks:
            d = f"transformer_blocks.{i}."
            layout[f"blocks.{i}.attn.qkv.weight"] = stacked([f"{d}attn1.to_{c}.weight" for c in "qkv"], rows)
            for leaf in ("weight", "bias"):
                layout[f"blocks.{i}.cross_attn.kv_linear.{leaf}"] = stacked([f"{d}attn2.to_{c}.{leaf}" for c in "kv"],
                                                                           rows)
        named = {key for parts in layout.values() for key, _, _ in parts}
        unnamed = sorted(set(rows) - named)
        if unnamed:
            raise ValueError(f"diffusers' Sana single-file converter reads no original name for {unnamed[:3]} "
                             "(Sana 1.5's qk norms, Sana-Sprint's guidance embedder and self-attention biases are "
                             "not in it)")
        return layout

    def default_size(self, pipe) -> tuple[int, int]:
        """The trained size: SanaPipeline draws 1024x1024 whatever the model (Sana 512 included)."""
        side = int(self.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 32))
        return side, side

    def size_multiple(self, pipe) -> int:
        # diffusers' Sana pipelines refuse sizes that are not multiples of 32, whatever their VAE's scale
        return math.lcm(32, super().size_multiple(pipe))

    def example_inputs(self, batch_size: int = 2, sequence_length: int | None = None,
                       seed: int = 0, latent: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        config = self.config
        inputs = caption_inputs(config, batch_size, sequence_length or 300, latent, torch.tensor([500.0]), seed)
        if config.guidance_embeds:  # Sana-Sprint
            inputs["guidance"] = torch.full((batch_size,), 4.5)  # (B,)
        return {k: v.to(self.module.device, self.module.dtype) for k, v in inputs.items()}


# diffusers' module names -> Sana's, whole tensors (`convert_sana_transformer_to_diffusers` is the other way).
_TOP = (("patch_embed.proj", "x_embedder.proj"),
        ("time_embed.emb.timestep_embedder.linear_1", "t_embedder.mlp.0"),
        ("time_embed.emb.timestep_embedder.linear_2", "t_embedder.mlp.2"),
        ("time_embed.linear", "t_block.1"),
        ("caption_projection.linear_1", "y_embedder.y_proj.fc1"),
        ("caption_projection.linear_2", "y_embedder.y_proj.fc2"),
        ("caption_norm", "attention_y_norm"),
        ("proj_out", "final_layer.linear"))
_BLOCK = (("attn1.to_out.0", "attn.proj"),
          ("attn2.to_q", "cross_attn.q_linear"),
          ("attn2.to_out.0", "cross_attn.proj"),
          ("ff.conv_inverted", "mlp.inverted_conv.conv"),
          ("ff.conv_depth", "mlp.depth_conv.conv"),
          ("ff.conv_point", "mlp.point_conv.conv"))
