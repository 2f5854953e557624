"""SD3Transformer2DModel: the MMDiT of Stable Diffusion 3 and 3.5 (a joint text/image attention stream,
pooled CLIP embeddings in the AdaLayerNorm modulation)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from diffquant.models.denoisers.base import Denoiser, register
from diffquant.models.denoisers.layout import Layout, stacked, swapped, whole


@register
class SD3Denoiser(Denoiser):
    module_class = "SD3Transformer2DModel"
    pipeline_attribute = "transformer"
    positional = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
    capture_keys = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")

    gguf_arch = "sd3"

    def original_layout(self, rows: dict[str, int]) -> Layout:
        """Stability's MMDiT names (joint_blocks.N.x_block / context_block, fused qkv)."""
        layout: Layout = {"pos_embed": whole("pos_embed.pos_embed", rows)}
        top = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
               "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
               "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
        blocks = 1 + max(int(k.split(".")[1]) for k in rows if k.startswith("transformer_blocks."))
        for leaf in ("weight", "bias"):
            layout |= {f"{o}.{leaf}": whole(f"{d}.{leaf}", rows) for d, o in top.items()}
            layout[f"final_layer.adaLN_modulation.1.{leaf}"] = swapped(f"norm_out.linear.{leaf}", rows)
            for i in range(blocks):
                d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
                last = f"{d}attn.to_add_out.weight" not in rows  # context_pre_only: no context output
                parts = {f"x_block.attn.qkv.{leaf}": stacked([f"{d}attn.to_{c}.{leaf}" for c in "qkv"], rows),
                         f"context_block.attn.qkv.{leaf}": stacked([f"{d}attn.add_{c}_proj.{leaf}" for c in "qkv"],
                                                                   rows),
                         f"x_block.attn.proj.{leaf}": whole(f"{d}attn.to_out.0.{leaf}", rows),
                         f"x_block.adaLN_modulation.1.{leaf}": whole(f"{d}norm1.linear.{leaf}", rows),
                         f"context_block.adaLN_modulation.1.{leaf}": (swapped if last else whole)(
                             f"{d}norm1_context.linear.{leaf}", rows),
                         f"x_block.mlp.fc1.{leaf}": whole(f"{d}ff.net.0.proj.{leaf}", rows),
                         f"x_block.mlp.fc2.{leaf}": whole(f"{d}ff.net.2.{leaf}", rows)}
                if not last:
                    parts |= {f"context_block.attn.proj.{leaf}": whole(f"{d}attn.to_add_out.{leaf}", rows),
                              f"context_block.mlp.fc1.{leaf}": whole(f"{d}ff_context.net.0.proj.{leaf}", rows),
                              f"context_block.mlp.fc2.{leaf}": whole(f"{d}ff_context.net.2.{leaf}", rows)}
                if f"{d}attn2.to_q.{leaf}" in rows:  # SD3.5's second image attention (MMDiT-X)
                    parts |= {f"x_block.attn2.qkv.{leaf}": stacked([f"{d}attn2.to_{c}.{leaf}" for c in "qkv"], rows),
                              f"x_block.attn2.proj.{leaf}": whole(f"{d}attn2.to_out.0.{leaf}", rows)}
                layout |= {o + k: v for k, v in parts.items()}
        norms = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
                 "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
                 "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
        for i in range(blocks):  # SD3.5's RMS norms of queries and keys
            layout |= {f"joint_blocks.{i}.{o}.weight": whole(f"transformer_blocks.{i}.{d}.weight", rows)
                       for d, o in norms.items() if f"transformer_blocks.{i}.{d}.weight" in rows}
        return layout

    def sequence_length(self, pipe=None) -> int:
        """CLIP tokens plus T5 tokens: the pipeline concatenates them along the sequence."""
        clip = getattr(pipe, "tokenizer", None)
        clip_length = clip.model_max_length if clip is not None else 77
        t5 = getattr(pipe, "tokenizer_3", None)
        return clip_length + (min(t5.model_max_length, 256) if t5 is not None else clip_length)

    def example_inputs(self, batch_size: int = 2, sequence_length: int | None = None,
                       seed: int = 0, latent: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        config = self.config
        gen = torch.Generator().manual_seed(seed)
        height, width = latent or (config.sample_size, config.sample_size)
        inputs = {
            "hidden_states": torch.randn(batch_size, config.in_channels, height, width, generator=gen),  # (B, C, h, w)
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
