"""FluxTransformer2DModel: FLUX.1 (packed 2x2 latent patches as tokens, RoPE from position ids, and for
the guidance-distilled dev model a `guidance` input instead of classifier-free guidance)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from diffquant.models.denoisers.base import Denoiser, register
from diffquant.models.denoisers.layout import Layout, stacked, swapped, whole


def _rms_norm(self, x: torch.Tensor) -> torch.Tensor:
    # torch.onnx at opset 20 has no symbolic for aten::rms_norm; the same arithmetic in basic ops exports.
    # Casts only where the dtype changes: ONNX Runtime 1.32's CastElimination breaks the graph on the
    # float->float Cast pair that `x.float()` twice traces to ("... is not a graph input" at load).
    h = x if x.dtype == torch.float32 else x.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + (self.eps or torch.finfo(torch.float32).eps))
    out = out if out.dtype == x.dtype else out.to(x.dtype)
    return out * self.weight if self.weight is not None else out


@contextmanager
def exportable_rms_norms(module: torch.nn.Module) -> Iterator[None]:
    """Every torch RMSNorm of `module` computed in basic ops while the context lasts (`_rms_norm`)."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.RMSNorm)]
    for m in norms:
        m.forward = _rms_norm.__get__(m)
    try:
        yield
    finally:
        for m in norms:
            del m.forward


@register
class FluxDenoiser(Denoiser):
    module_class = "FluxTransformer2DModel"
    pipeline_attribute = "transformer"
    positional = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
                  "guidance")
    capture_keys = positional
    # Its rotary embedding traces the export batch into the graph: a dynamic-batch export fails at any
    # other batch even in fp32, so the graph keeps its batch and runtimes call it once per sample.
    dynamic_batch = False

    def latent_patch(self) -> int:
        return 2  # the pipeline packs 2x2 latent pixels into one token (its config's patch_size is 1)
    unbatched_inputs = ("img_ids", "txt_ids")
    # ModelOpt keeps these in high precision for Flux; ours is a measured default (see docs/quantization.md).
    default_exclusions = ()

    gguf_arch = "flux"

    def original_layout(self, rows: dict[str, int]) -> Layout:
        """Black Forest Labs' names (double_blocks / single_blocks, fused qkv, single blocks' linear1 of q, k,
        v and the MLP input)."""
        top = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
               "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
               "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
               "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
               "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
               "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
               "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
        double = 1 + max((int(k.split(".")[1]) for k in rows if k.startswith("transformer_blocks.")), default=-1)
        single = 1 + max((int(k.split(".")[1]) for k in rows if k.startswith("single_transformer_blocks.")),
                         default=-1)
        layout: Layout = {}
        for leaf in ("weight", "bias"):
            layout |= {f"{o}.{leaf}": whole(f"{d}.{leaf}", rows) for d, o in top.items() if f"{d}.{leaf}" in rows}
            layout[f"final_layer.adaLN_modulation.1.{leaf}"] = swapped(f"norm_out.linear.{leaf}", rows)
            for i in range(double):
                d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
                parts = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
                         "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
                         "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
                         "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
                layout |= {f"{o}{k}.{leaf}": whole(f"{d}{v}.{leaf}", rows) for k, v in parts.items()}
                layout[f"{o}img_attn.qkv.{leaf}"] = stacked([f"{d}attn.to_{c}.{leaf}" for c in "qkv"], rows)
                layout[f"{o}txt_attn.qkv.{leaf}"] = stacked([f"{d}attn.add_{c}_proj.{leaf}" for c in "qkv"], rows)
            for i in range(single):
                d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
                layout[f"{o}modulation.lin.{leaf}"] = whole(f"{d}norm.linear.{leaf}", rows)
                layout[f"{o}linear1.{leaf}"] = stacked([f"{d}attn.to_{c}.{leaf}" for c in "qkv"]
                                                       + [f"{d}proj_mlp.{leaf}"], rows)
                layout[f"{o}linear2.{leaf}"] = whole(f"{d}proj_out.{leaf}", rows)
        norms = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                 "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
        for i in range(double):
            layout |= {f"double_blocks.{i}.{o}.scale": whole(f"transformer_blocks.{i}.{d}.weight", rows)
                       for o, d in norms.items()}
        for i in range(single):
            layout |= {f"single_blocks.{i}.norm.{o}_norm.scale": whole(f"single_transformer_blocks.{i}.attn.norm_{o[0]}.weight", rows)
                       for o in ("query", "key")}
        return layout

    @property
    def guidance_distilled(self) -> bool:
        return bool(self.config.guidance_embeds)

    def sequence_length(self, pipe=None) -> int:
        t5 = getattr(pipe, "tokenizer_2", None)
        return min(t5.model_max_length, 512) if t5 is not None else 512

    def example_inputs(self, batch_size: int = 1, sequence_length: int | None = None,
                       seed: int = 0, latent: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        config = self.config
        gen = torch.Generator().manual_seed(seed)
        tokens = sequence_length or 512
        # a 128x128 latent packs into 64x64 patches at full size; 32x32 keeps examples small
        rows, cols = (latent[0] // 2, latent[1] // 2) if latent else (32, 32)
        inputs = {
            "hidden_states": torch.randn(batch_size, rows * cols, config.in_channels, generator=gen),  # (B, N, 4C)
            "encoder_hidden_states": torch.randn(batch_size, tokens, config.joint_attention_dim, generator=gen),
            "pooled_projections": torch.randn(batch_size, config.pooled_projection_dim, generator=gen),  # (B, P)
            "timestep": torch.full((batch_size,), 0.5),  # (B,) sigma
            "img_ids": _image_ids(rows, cols),  # (N, 3)
            "txt_ids": torch.zeros(tokens, 3),  # (T, 3)
        }
        if self.guidance_distilled:
            inputs["guidance"] = torch.full((batch_size,), 3.5)  # (B,)
        return {k: v.to(self.module.device, self.module.dtype) for k, v in inputs.items()}

    def batch_size(self, record: dict) -> int:
        return record["hidden_states"].shape[0]

    def dynamic_axes(self, names: list[str]) -> dict:
        return {}

    def exportable(self):
        return exportable_rms_norms(self.module)


def _image_ids(height: int, width: int) -> torch.Tensor:
    """Flux's latent position ids for a height x width patch grid: (0, row, column) per token."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()  # (N, 3)
