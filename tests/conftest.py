"""Tiny real components (diffusers-style: seeded, a few channels, 2 inference steps on CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the Hub
os.environ.setdefault("QUARK_DISABLE_COMPILE", "1")
os.environ.setdefault("QUARK_LOG_LEVEL", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers (`pytest -n N`) share the cores: one thread each, so N workers do not oversubscribe them.
    torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER = FIXTURES / "tokenizer"


def _text_encoder(tokenizer, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                            projection_dim=32, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4,
                         sample_size=16)


def build_tiny_sd():
    """An SD-1.x-style pipeline: 16x16 images, 8x8 latents, random weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4)
    return StableDiffusionPipeline(vae=_vae(), unet=unet, text_encoder=_text_encoder(tokenizer), tokenizer=tokenizer,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_tiny_sdxl():
    """An SDXL-style pipeline: two text encoders, added text/time conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, cross_attention_dim=64,
        norm_num_groups=4)
    return StableDiffusionXLPipeline(
        vae=_vae(), unet=unet, text_encoder=_text_encoder(tokenizer), text_encoder_2=_text_encoder(tokenizer, True),
        tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=EulerDiscreteScheduler())


T5_TOKENIZER = FIXTURES / "t5_tokenizer"  # written by diffquant.models.shapes.model_sd3.write_t5_tokenizer


def _t5_encoder(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   decoder_start_token_id=0))


def build_tiny_sd3():
    """An SD3-style pipeline: a 2-layer MMDiT, two CLIP encoders with projection (32 + 32 = the joint
    width 64), a tiny T5; 16x16 images, 8x8 latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    t5_tokenizer = T5TokenizerFast.from_pretrained(T5_TOKENIZER)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
        pos_embed_max_size=8)
    vae = _vae()
    vae.register_to_config(shift_factor=0.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=_text_encoder(tokenizer, True), tokenizer=tokenizer,
        text_encoder_2=_text_encoder(tokenizer, True), tokenizer_2=tokenizer,
        text_encoder_3=_t5_encoder(t5_tokenizer, 64), tokenizer_3=t5_tokenizer)


def build_tiny_flux(guidance_embeds: bool = True):
    """A FLUX.1-dev-style pipeline: one double and one single block, CLIP pooled + T5 sequence;
    in_channels is 4x the VAE's latent channels (2x2 packing), the RoPE axes sum to the head width."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer, T5TokenizerFast

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    t5_tokenizer = T5TokenizerFast.from_pretrained(T5_TOKENIZER)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6],
        guidance_embeds=guidance_embeds)
    vae = _vae()
    vae.register_to_config(shift_factor=0.0)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_text_encoder(tokenizer),
                        tokenizer=tokenizer, text_encoder_2=_t5_encoder(t5_tokenizer, 64), tokenizer_2=t5_tokenizer,
                        transformer=transformer)


def build_tiny_pixart():
    """A PixArt-Σ-style pipeline: a 2-layer DiT with T5 cross-attention and learned variance (8 output channels
    for 4 latent ones); 16x16 images, 8x8 latents, 2x2 patches."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5TokenizerFast

    torch.manual_seed(0)
    t5_tokenizer = T5TokenizerFast.from_pretrained(T5_TOKENIZER)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False)
    return PixArtSigmaPipeline(tokenizer=t5_tokenizer, text_encoder=_t5_encoder(t5_tokenizer, 32), vae=_vae(),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())


def _saved(tmp_path_factory, name: str, builder) -> Path:
    """A folder holding the pipeline `builder()` makes, saved as diffusers saves it (safetensors)."""
    path = tmp_path_factory.mktemp(name)
    builder().save_pretrained(path, safe_serialization=True)
    return path


def _gemma_tokenizer():
    """A Gemma tokenizer made offline from the T5 fixture's vocabulary (Sana's pipeline takes a Gemma tokenizer)."""
    from tokenizers import Tokenizer
    from transformers import GemmaTokenizerFast

    return GemmaTokenizerFast(tokenizer_object=Tokenizer.from_file(str(T5_TOKENIZER / "tokenizer.json")),
                              bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def build_tiny_sana():
    """A Sana-style pipeline: a 1-layer DiT (linear self-attention, cross-attention, conv GLU), a 2-stage
    deep-compression VAE (x2) and a 1-layer Gemma-2; 32x32 images (Sana's pipeline takes multiples of 32), 16x16
    latents."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    tokenizer = _gemma_tokenizer()
    text_encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                            head_dim=8, max_position_embeddings=512, attn_implementation="eager",
                                            pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=(1, 1), downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                         num_attention_heads=2, attention_head_dim=8, num_cross_attention_heads=2,
                                         cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
                                         sample_size=16)
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


QWEN_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _qwen_tokenizer():
    """A Qwen2 tokenizer made offline from the T5 fixture's vocabulary, with a Qwen-style chat template (FLUX.2
    [klein]'s and Z-Image's pipelines wrap every prompt in it; Qwen-Image's pipeline writes its own template)."""
    from tokenizers import Tokenizer
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast(tokenizer_object=Tokenizer.from_file(str(T5_TOKENIZER / "tokenizer.json")),
                              bos_token=None, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                              chat_template=QWEN_CHAT_TEMPLATE)


def build_tiny_flux2():
    """A FLUX.2 [klein]-style pipeline: one double and one single block, a Qwen3 text encoder whose layers 9, 18 and
    27 the pipeline stacks (so 27 tiny layers), a 2-stage FLUX.2 VAE (x2) with its batch-norm over 2x2-patchified
    latents; in_channels is 4x the VAE's latent channels, the 4 RoPE axes sum to the head width."""
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tokenizer = _qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16,
                                                num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=1,
                                                head_dim=4, max_position_embeddings=512, tie_word_embeddings=True,
                                                pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                             layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                          timestep_guidance_channels=32, axes_dims_rope=[4, 4, 4, 4],
                                          guidance_embeds=False)
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer, is_distilled=True)


def build_tiny_z_image():
    """A Z-Image-style pipeline: a single-stream DiT (one noise-refiner, one context-refiner and two main blocks,
    2x2 patches, 3-axis RoPE whose 8-token row and column tables make 32x32 its default size), a 2-layer Qwen3
    text encoder and a 16-channel AutoencoderKL (x2); 32x32 images, 16x16 latents."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    tokenizer = _qwen_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                          head_dim=8, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id))
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                           axes_dims=[8, 4, 4], axes_lens=[1024, 8, 8])
    with torch.no_grad():  # made with torch.empty: give them values
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=32,
                        scaling_factor=0.3611, shift_factor=0.1159)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)


@pytest.fixture(scope="session")
def tiny_z_image_dir(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory, "tiny-z-image", build_tiny_z_image)


def build_tiny_qwen_image():
    """A Qwen-Image-style pipeline: a 1-layer double-stream MMDiT on 2x2 patches (in_channels 16 for 4 latent
    channels), a 1-stage Qwen-Image VAE (x2) and a 1-layer Qwen2.5-VL with a tiny vision tower; the T5 pieces
    make the pipeline's prompt template ~180 tokens, more than the 34 it drops."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = _qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "rope_theta": 1000000.0, "vocab_size": len(tokenizer),
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(8, 4, 4))
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                             text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer=tokenizer,
                             transformer=transformer)


@pytest.fixture(scope="session")
def tiny_qwen_image_dir(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory, "tiny-qwen-image", build_tiny_qwen_image)


@pytest.fixture(scope="session")
def tiny_flux2_dir(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory, "tiny-flux2", build_tiny_flux2)


def build_tiny_wan():
    """A Wan-2.1-style text-to-video pipeline: a 2-layer video DiT (1x2x2 patches, 32 wide: GGUF's 32-weight blocks
    divide its Linears), a tiny Wan VAE (x8 in space, x4 in time) and a tiny T5; 32x32 frames, 5-frame clips (2
    latent frames)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import T5TokenizerFast

    torch.manual_seed(0)
    tokenizer = T5TokenizerFast.from_pretrained(T5_TOKENIZER)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=_t5_encoder(tokenizer, 32), vae=vae, transformer=transformer,
                       scheduler=scheduler)


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory, "tiny-wan", build_tiny_wan)


@pytest.fixture(scope="session")
def tiny_sana_dir(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory, "tiny-sana", build_tiny_sana)


@pytest.fixture(scope="session")
def tiny_pixart_dir(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory, "tiny-pixart", build_tiny_pixart)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory, "tiny-sd3", build_tiny_sd3)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory, "tiny-flux", build_tiny_flux)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny SD-1.x pipeline saved as a local diffusers folder (the layout of a Hub snapshot)."""
    path = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir):
    from diffquant import load_pipeline

    return load_pipeline(str(tiny_sd_dir), device="cpu")


@pytest.fixture(scope="session")
def shapes_pipe():
    from diffquant import load_pipeline

    return load_pipeline(device="cpu")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_dir):
    from diffquant import load_pipeline

    return load_pipeline(str(tiny_sdxl_dir), device="cpu")


# Shared expensive artifacts: each is built once per session and only read by the tests that use it.

CALIBRATION_PROMPTS = ["a red circle on a blue background", "a small green square on the left on a white background",
                       "a black triangle on a red background"]


@pytest.fixture(scope="session")
def tiny_calibration(tiny_sd):
    """Captured UNet inputs of the tiny SD pipeline: 3 prompts in batches of 2, 3 of 6 steps -> 6 calls."""
    from diffquant.quantization.calibration import CalibrationConfig, capture_denoiser_inputs

    return capture_denoiser_inputs(tiny_sd, CALIBRATION_PROMPTS,
                               CalibrationConfig(size=3, steps=6, timesteps=3, batch_size=2))


@pytest.fixture(scope="session")
def tiny_w8a8(tiny_sd, tiny_calibration):
    """A function: W8A8 recipe name -> the tiny SD pipeline quantized by it on `tiny_calibration`
    (each recipe quantized once per session)."""
    from diffquant import quantize

    cache = {}

    def quantized(recipe: str):
        if recipe not in cache:
            cache[recipe] = quantize(tiny_sd, recipe, calibration=tiny_calibration)
        return cache[recipe]

    return quantized


@pytest.fixture(scope="session")
def tiny_int8_w(tiny_sd):
    """The tiny SD pipeline with its UNet quantized by `int8-w`."""
    from diffquant import quantize

    return quantize(tiny_sd, "int8-w")


@pytest.fixture(scope="session")
def tiny_int8_w_export(tiny_int8_w, tmp_path_factory):
    """(`tiny_int8_w`, its UNet's ONNX ExportResult); the export's folder holds only unet.onnx."""
    from diffquant import export_onnx

    return tiny_int8_w, export_onnx(tiny_int8_w, tmp_path_factory.mktemp("tiny-int8-w") / "int8-w")


@pytest.fixture(scope="session")
def tiny_sdxl_int8_w_export(tiny_sdxl, tmp_path_factory):
    """(the tiny SDXL pipeline quantized by `int8-w`, its UNet's ONNX ExportResult)."""
    from diffquant import export_onnx, quantize

    quantized = quantize(tiny_sdxl, "int8-w")
    return quantized, export_onnx(quantized, tmp_path_factory.mktemp("tiny-sdxl-int8-w") / "int8-w")


@pytest.fixture(scope="session")
def shapes_calibration(shapes_pipe):
    """shapes-sd's captured UNet inputs for the W8A8 tests: 4 captions, 3 of 6 steps."""
    from diffquant.quantization.calibration import CalibrationConfig, capture_denoiser_inputs
    from diffquant.models.shapes.dataset import sample_captions

    return capture_denoiser_inputs(shapes_pipe, sample_captions(4, seed=9),
                               CalibrationConfig(size=4, steps=6, timesteps=3, batch_size=4))


@pytest.fixture(scope="session")
def tiny_flux_schnell_dir(tmp_path_factory) -> Path:
    """A FLUX.1-schnell-style folder: the tiny Flux without a guidance embedding."""
    path = tmp_path_factory.mktemp("tiny-flux-schnell")
    build_tiny_flux(guidance_embeds=False).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_sd3(tiny_sd3_dir):
    from diffquant import load_pipeline

    return load_pipeline(str(tiny_sd3_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_flux(tiny_flux_dir):
    from diffquant import load_pipeline

    return load_pipeline(str(tiny_flux_dir), device="cpu")


@pytest.fixture(scope="session")
def shapes_ort_export(shapes_pipe, shapes_calibration, tmp_path_factory):
    """(shapes-sd quantized with w8a8-int8-ort on every layer, its UNet's ONNX ExportResult).

    Every layer: the fusion tests count integer kernels against the whole UNet, so the profile's measured
    float layers (tests/test_profile_exclusions.py) are turned off."""
    from diffquant import export_onnx, quantize

    quantized = quantize(shapes_pipe, "w8a8-int8-ort", calibration=shapes_calibration, profile_exclusions=False)
    return quantized, export_onnx(quantized, tmp_path_factory.mktemp("ort") / "w8a8-int8-ort")


# Tiny pipelines of each denoiser family with the calls they generate with, and their quantized exports
# (each recipe once per session): the transformer export tests and the CPU-branch tests share them.
FAMILY_PROMPTS = ["a red circle", "a blue square on a white background"]
# Flux's graph keeps the image size and text length it was traced with, so it is traced on a captured input.
FAMILY_CALLS = {"unet": {}, "sd3": {"max_sequence_length": 16},
                "flux": {"height": 16, "width": 16, "max_sequence_length": 16},
                "pixart": {"max_sequence_length": 16, "use_resolution_binning": False}}
FAMILY_BUILDERS = {"unet": build_tiny_sd, "sd3": build_tiny_sd3, "flux": build_tiny_flux,
                   "pixart": build_tiny_pixart}


def tiny_images(pipe, name: str):
    generators = [torch.Generator().manual_seed(7 + k) for k in range(len(FAMILY_PROMPTS))]
    return pipe(prompt=FAMILY_PROMPTS, num_inference_steps=2, generator=generators, output_type="np",
                **FAMILY_CALLS[name]).images


class TinyFamily:
    """One tiny pipeline of a family, the denoiser calls it generates with (the calibration records), and
    its quantized exports."""

    def __init__(self, name: str, root: Path):
        from diffquant.models.denoisers import denoiser_of

        self.name, self.root = name, root
        self.pipe = FAMILY_BUILDERS[name]()
        self.pipe.set_progress_bar_config(disable=True)
        self.family = denoiser_of(self.pipe)
        self.records = []
        hook = self.family.module.register_forward_pre_hook(
            lambda module, args, kwargs: self.records.append(self.family.record(args, kwargs)), with_kwargs=True)
        try:
            tiny_images(self.pipe, name)
        finally:
            hook.remove()
        self._exports = {}

    def quantized(self, recipe: str):
        """The pipeline with its denoiser quantized by `recipe` on the recorded calls."""
        import copy

        from diffquant.quantization.api import quantize_module

        module = quantize_module(self.family.module, recipe, calibration=self.records)
        quantized = copy.copy(self.pipe)
        object.__setattr__(quantized, self.family.pipeline_attribute, module)
        return quantized

    def export(self, recipe: str):
        """(quantized pipeline, its OnnxExport), once per recipe. Random weights put activations on rounding
        ties, so the ORT-vs-torch error is measured, and asserted by the tests that need it."""
        from diffquant.export.onnx import export_onnx

        if recipe not in self._exports:
            quantized = self.quantized(recipe)
            # UNet/SD3 from the pipeline (its tokenizers give the text length); Flux from a captured input.
            inputs = self.family.flat_inputs(self.records[0]) if self.name == "flux" else None
            self._exports[recipe] = quantized, export_onnx(quantized, self.root / f"{self.name}-{recipe}",
                                                           inputs=inputs, check=False)
        return self._exports[recipe]


@pytest.fixture(scope="session")
def tiny_families(tmp_path_factory):
    """A function: family name ("unet", "sd3", "flux") -> its `TinyFamily`, built once per session."""
    built = {}

    def family(name: str) -> TinyFamily:
        if name not in built:
            built[name] = TinyFamily(name, tmp_path_factory.mktemp(name))
        return built[name]

    return family


@pytest.fixture(params=["exact", "u8s8"])
def int8_products(request):
    """Runs a test twice, with ONNX Runtime's exact int8 products (u8 x u8: what a CPU without VNNI gets) and
    without (u8 x s8: VNNI/AMX), forced through diffquant.core.cpu whatever this CPU would choose."""
    from diffquant.core.cpu import forced

    with forced(ort_exact_int8="1" if request.param == "exact" else "0"):
        yield request.param
