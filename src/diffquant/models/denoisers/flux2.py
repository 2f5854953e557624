"""Flux2Transformer2DModel: FLUX.2-dev and FLUX.2 [klein] (packed 2x2 latent patches as tokens, text features
stacked from three layers of a Mistral3 or Qwen3 text encoder, RoPE over 4-axis (t, h, w, l) position ids, and
for the guidance-distilled dev model a `guidance` input). The position ids are graph inputs, batched as the
pipelines pass them (the model reads the first sample's); the graph's batch is dynamic."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from diffquant.models.denoisers.base import Denoiser, register
from diffquant.models.denoisers.flux import exportable_rms_norms
from diffquant.models.denoisers.layout import Layout, stacked, swapped, whole


@register
class Flux2Denoiser(Denoiser):
    module_class = "Flux2Transformer2DModel"
    pipeline_attribute = "transformer"
    positional = ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids", "guidance")
    capture_keys = positional
    text_tokens = 512  # the text tokens the pipelines pad to

    # ComfyUI-GGUF has no FLUX.2 architecture of its own: city96's converter (tools/convert.py) detects FLUX.2's
    # double_blocks names as "flux", its llama.cpp patch quantizes FLUX.2 under LLM_ARCH_FLUX, and its loader
    # refuses any name outside IMG_ARCH_LIST (which has no "flux2"); ComfyUI tells the two apart by the tensor names.
    gguf_arch = "flux"

    def original_layout(self, rows: dict[str, int]) -> Layout:
        """Black Forest Labs' FLUX.2 names (the inverse of diffusers' `convert_flux2_transformer_checkpoint_to_
        diffusers`): double_blocks with fused q, k, v per stream, single_blocks as they are (diffusers keeps
        linear1 fused as `to_qkv_mlp_proj`), the shared modulations, and the final AdaLayerNorm's halves swapped.
        FLUX.2 has no biases; a state with one is refused (diffusers' converter would not rename it either)."""
        top = {"time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
               "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
               "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
               "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
               "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
               "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
               "single_stream_modulation.linear": "single_stream_modulation.lin",
               "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear"}
        double = _blocks(rows, "transformer_blocks.")
        single = _blocks(rows, "single_transformer_blocks.")
        layout: Layout = {f"{o}.weight": whole(f"{d}.weight", rows) for d, o in top.items() if f"{d}.weight" in rows}
        layout["final_layer.adaLN_modulation.1.weight"] = swapped("norm_out.linear.weight", rows)
        for i in range(double):
            d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            layout |= {f"{o}{k}": whole(f"{d}{v}", rows) for k, v in _DOUBLE.items()}
            layout[f"{o}img_attn.qkv.weight"] = stacked([f"{d}attn.to_{c}.weight" for c in "qkv"], rows)
            layout[f"{o}txt_attn.qkv.weight"] = stacked([f"{d}attn.add_{c}_proj.weight" for c in "qkv"], rows)
        for i in range(single):
            d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            layout |= {f"{o}{k}": whole(f"{d}{v}", rows) for k, v in _SINGLE.items()}
        return layout

    def latent_patch(self) -> int:
        return 2  # the pipelines patchify 2x2 latent pixels into one token (the config's patch_size is 1)

    def example_inputs(self, batch_size: int = 2, sequence_length: int | None = None,
                       seed: int = 0, latent: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        config = self.config
        gen = torch.Generator().manual_seed(seed)
        tokens = sequence_length or 512
        # a 1024x1024 image is a 128x128 latent, 64x64 tokens at full size; 32x32 keeps examples small
        rows, cols = (latent[0] // 2, latent[1] // 2) if latent else (32, 32)
        inputs = {
            "hidden_states": torch.randn(batch_size, rows * cols, config.in_channels, generator=gen),  # (B, N, 4C)
            "encoder_hidden_states": torch.randn(batch_size, tokens, config.joint_attention_dim, generator=gen),
            "timestep": torch.full((batch_size,), 0.5),  # (B,) sigma: the pipelines pass timestep / 1000
        }
        if config.guidance_embeds:  # FLUX.2-dev
            inputs["guidance"] = torch.full((batch_size,), 4.0)  # (B,)
        device, dtype = self.module.device, self.module.dtype
        inputs = {k: v.to(device, dtype) for k, v in inputs.items()}
        # int64 (t, h, w, l) ids as the pipelines build them: image tokens (0, row, col, 0), text (0, 0, 0, k)
        grid = torch.cartesian_prod(torch.arange(1), torch.arange(rows), torch.arange(cols), torch.arange(1))
        text = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(tokens))
        inputs["img_ids"] = grid.expand(batch_size, -1, -1).to(device)  # (B, N, 4)
        inputs["txt_ids"] = text.expand(batch_size, -1, -1).to(device)  # (B, T, 4)
        return {k: inputs[k] for k in self.positional if k in inputs}

    @contextmanager
    def exportable(self) -> Iterator[None]:
        from diffusers.models.transformers import transformer_flux2

        rotary, transformer_flux2.apply_rotary_emb = transformer_flux2.apply_rotary_emb, _apply_rotary_emb
        try:
            with exportable_rms_norms(self.module):
                yield
        finally:
            transformer_flux2.apply_rotary_emb = rotary


# FLUX.2's block tensors: original name within the block -> diffusers' (norm scales are diffusers' weights)
_DOUBLE = {"img_attn.proj.weight": "attn.to_out.0.weight", "txt_attn.proj.weight": "attn.to_add_out.weight",
           "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
           "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
           "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
           "img_mlp.0.weight": "ff.linear_in.weight", "img_mlp.2.weight": "ff.linear_out.weight",
           "txt_mlp.0.weight": "ff_context.linear_in.weight", "txt_mlp.2.weight": "ff_context.linear_out.weight"}
_SINGLE = {"linear1.weight": "attn.to_qkv_mlp_proj.weight", "linear2.weight": "attn.to_out.weight",
           "norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


def _blocks(rows: dict[str, int], prefix: str) -> int:
    return 1 + max((int(k.split(".")[1]) for k in rows if k.startswith(prefix)), default=-1)


def _apply_rotary_emb(x: torch.Tensor, freqs_cis: tuple[torch.Tensor, torch.Tensor], sequence_dim: int = 1,
                      **_) -> torch.Tensor:
    """diffusers' `apply_rotary_emb` (real form, interleaved pairs) on x (B, S, H, D), as the export traces it.
    diffusers splits the pairs with `x.reshape(*x.shape[:-1], -1, 2)`, which the tracer writes with the export's
    batch as a constant (the graph then fails at any other batch); strided slices keep every axis dynamic."""
    cos, sin = (f[None, :, None, :] if sequence_dim == 1 else f[None, None, :, :] for f in freqs_cis)
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    h, r = (x, rotated) if x.dtype == torch.float32 else (x.float(), rotated.float())
    out = h * cos + r * sin
    return out if out.dtype == x.dtype else out.to(x.dtype)
