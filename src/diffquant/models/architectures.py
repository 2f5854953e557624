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

# black-forest-labs/FLUX.2-klein-4B, transformer/config.json (5 double-stream + 20 single-stream blocks of 24 heads
# of 128; text features stacked from three Qwen3-4B layers, 3 x 2560; no guidance embedding). FLUX.2-dev is the
# class's defaults (48 heads, 8 + 48 blocks, 32B): two of its blocks alone outgrow this machine's export.
FLUX2_KLEIN_4B_TRANSFORMER = {
    "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 7680, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000, "eps": 1e-06, "guidance_embeds": False,
}

# Qwen/Qwen-Image, transformer/config.json (60 double-stream blocks of 24 heads of 128, Qwen2.5-VL-7B's 3584-wide
# features; 20B parameters): the class's defaults.
QWEN_IMAGE_TRANSFORMER = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False, "axes_dims_rope": [16, 56, 56],
}

# Tongyi-MAI/Z-Image-Turbo, transformer/config.json (30 single-stream blocks 3840 wide, 30 heads, 2 noise- and 2
# context-refiner blocks, Qwen3-4B's 2560-wide features; 6B parameters): the class's defaults.
Z_IMAGE_TRANSFORMER = {
    "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-05, "qk_norm": True, "cap_feat_dim": 2560,
    "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48], "axes_lens": [1024, 512, 512],
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
    # 1 double + 1 single block, 512x512 images (32x32 tokens as FLUX.1's), 512 text tokens
    "flux2-klein": Architecture("flux2-klein", "Flux2Transformer2DModel", FLUX2_KLEIN_4B_TRANSFORMER,
                                depth_keys=("num_layers", "num_single_layers"),
                                reduced_depth={"num_layers": 1, "num_single_layers": 1}, sequence_length=512),
    # 1 of 60 blocks; 512x512 images (32x32 tokens), 512 text tokens (the pipeline pads to the longest prompt)
    "qwen-image": Architecture("qwen-image", "QwenImageTransformer2DModel", QWEN_IMAGE_TRANSFORMER,
                               depth_keys=("num_layers",), reduced_depth={"num_layers": 1}, sequence_length=512),
    # 1 of 30 main blocks and 1 of 2 refiner blocks of each kind; 512x512 images (32x32 tokens), 512 caption tokens
    "z-image": Architecture("z-image", "ZImageTransformer2DModel", Z_IMAGE_TRANSFORMER,
                            depth_keys=("n_layers", "n_refiner_layers"),
                            reduced_depth={"n_layers": 1, "n_refiner_layers": 1}, sequence_length=512),
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
