"""Configs of real denoiser architectures, to build them with random weights for benchmarks at real scale
without downloads. Quality numbers need real weights; these measure only size and speed."""

from __future__ import annotations

from dataclasses import dataclass, field
from diffquant.core.errors import DiffquantError

# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json (860M parameters, 64x64 latents).
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0, "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-05,
    "cross_attention_dim": 768, "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (24 MMDiT blocks, the first 13 with
# a second self-attention; 2.2B parameters, 128x128 latents at 1024 px).
SD35_MEDIUM_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "qk_norm": "rms_norm", "dual_attention_layers": list(range(13)),
}

# black-forest-labs/FLUX.1-dev, transformer/config.json (19 double-stream + 38 single-stream blocks,
# 12B parameters; the guidance-distilled dev model embeds the guidance value).
FLUX1_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}


# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json (30 blocks of 1536 wide, 12 heads; UMT5-XXL features).
WAN21_T2V_1_3B_TRANSFORMER = {
    "patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-06, "rope_max_seq_len": 1024,
}

@dataclass(frozen=True)
class Architecture:
    """A real denoiser config, optionally at reduced depth (real widths and heads, fewer blocks) where the
    whole model does not fit this machine for export + ONNX Runtime: a block's time is then real and the
    whole model's time scales with depth."""

    name: str
    module_class: str  # the diffusers class
    config: dict
    depth_keys: tuple[str, ...] = ()  # config keys holding the block counts
    reduced_depth: dict = field(default_factory=dict)  # the depth the bench builds, when reduced
    sequence_length: int = 77  # text tokens fed by the real pipeline

    def build_config(self) -> dict:
        return {**self.config, **self.reduced_depth}

    @property
    def depth_note(self) -> str:
        if not self.reduced_depth:
            return "full depth"
        parts = [f"{self.reduced_depth[k]} of {self.config[k]} {k}" for k in self.depth_keys]
        size = self.reduced_depth.get("sample_size")
        return "reduced depth: " + ", ".join(parts) + (f", {size}x{size} latents" if size else "")


ARCHITECTURES = {
    "sd15": Architecture("sd15", "UNet2DConditionModel", SD15_UNET),
    # 2 of 24 blocks (one with the dual attention, one without), 4096-wide T5 features of 77 + 256 tokens,
    # 512x512 images (64x64 latents, 1024 image tokens) as Flux's example inputs below.
    "sd35-medium": Architecture("sd35-medium", "SD3Transformer2DModel", SD35_MEDIUM_TRANSFORMER,
                                depth_keys=("num_layers",),
                                reduced_depth={"num_layers": 2, "dual_attention_layers": [0], "sample_size": 64},
                                sequence_length=77 + 256),
    "flux": Architecture("flux", "FluxTransformer2DModel", FLUX1_DEV_TRANSFORMER,
                         depth_keys=("num_layers", "num_single_layers"),
                         reduced_depth={"num_layers": 1, "num_single_layers": 1}, sequence_length=512),
    # 2 of 30 blocks; 9-frame 240x416 clips (3 latent frames of 30x52, 1170 video tokens), 512 UMT5 tokens
    "wan": Architecture("wan", "WanTransformer3DModel", WAN21_T2V_1_3B_TRANSFORMER, depth_keys=("num_layers",),
                        reduced_depth={"num_layers": 2}, sequence_length=512),
}


def build(arch: str):
    """The named architecture with random weights (seeded), in eval mode."""
    import diffusers
    import torch

    if arch not in ARCHITECTURES:
        raise DiffquantError(f"unknown --arch {arch!r}: choose from {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    torch.manual_seed(0)
    return getattr(diffusers, spec.module_class).from_config(spec.build_config()).eval()
