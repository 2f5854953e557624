"""Model profiles: the defaults of each model diffquant knows (steps, guidance, prompts, extra pipeline
arguments, GPU dtype), in one place instead of guessed from a pipeline's parts.

    profile = profile_of(pipe)           # the embedded shapes models by their folder, real models by class
    pipe(prompt, num_inference_steps=profile.steps, guidance_scale=profile.guidance, **profile.pipeline_kwargs())

The numbers of real models are those of their model cards (the diffusers examples on them).
"""

from __future__ import annotations

import json

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffquant.core.errors import DiffquantError

GUIDANCE_KINDS = ("cfg", "distilled", "none")
PROMPT_SOURCES = ("shapes", "tutorial")
GPU_DTYPES = ("fp16", "bf16", "fp32")
TUTORIAL_PROMPT = "A rabbit in a flower meadow"
SHAPES_PROMPT_SEED = 2024  # default prompts; calibration captions use CALIBRATION_SEED in calibration.py


@dataclass(frozen=True)
class KeepFloat:
    """Layers a model's profile keeps in float under some recipes, and the measurement behind it.

    recipes: the recipe names it applies to; patterns: fnmatch patterns of module names (as in
    `Recipe.exclude`); reason: one sentence for the report (what was measured, on what)."""

    recipes: tuple[str, ...]
    patterns: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class ModelProfile:
    """What diffquant needs to know about one model beyond its pipeline class.

    name: the profile's id; title: the model's name for people; denoiser: its diffusers denoiser class.
    steps, guidance: the generation defaults.
    guidance_kind: "cfg" (classifier-free guidance, 0 or 1 turns it off), "distilled" (a value the
        denoiser takes as an input: FLUX.1-dev) or "none" (the model takes no guidance: FLUX.1-schnell).
    prompt_source: "shapes" (default prompts and calibration captions are drawn from the shapes grammar)
        or "tutorial" (the tutorial's prompt; calibration needs the user's prompts).
    shapeeval: ShapeEval scores its images (it draws the shapes grammar).
    num_images: images of a run when none are asked for.
    call_kwargs: extra pipeline call arguments, as (name, value) pairs (frozen): e.g. SD3's T5 length.
    gpu_dtype: what dtype="auto" loads on a GPU (CPU always gets fp32).
    keep_float: measured per-recipe float layers (`KeepFloat`), applied by `quantize` unless turned off.
    pipelines: diffusers pipeline classes this profile is for, found by `class_profile` (a family added after
        the first four needs only its profile here and its denoiser file).
    guidance_argument: the pipeline call argument the guidance goes to ("true_cfg_scale" for Qwen-Image, whose
        `guidance_scale` is for guidance-distilled checkpoints only).
    frames: frames of a video model's clip when none are asked for (0: an image model).
    """

    name: str
    title: str
    denoiser: str
    steps: int
    guidance: float
    guidance_kind: str = "cfg"
    prompt_source: str = "tutorial"
    shapeeval: bool = False
    num_images: int = 3
    call_kwargs: tuple[tuple[str, Any], ...] = ()
    gpu_dtype: str = "fp16"
    keep_float: tuple[KeepFloat, ...] = ()
    pipelines: tuple[str, ...] = ()  # the diffusers pipeline classes that name this model (families added later)
    guidance_argument: str = "guidance_scale"
    frames: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.guidance < 0:
            raise DiffquantError(f"profile {self.name}: steps must be at least 1 and guidance at least 0")
        for field, value, allowed in (("guidance_kind", self.guidance_kind, GUIDANCE_KINDS),
                                      ("prompt_source", self.prompt_source, PROMPT_SOURCES),
                                      ("gpu_dtype", self.gpu_dtype, GPU_DTYPES)):
            if value not in allowed:
                raise DiffquantError(f"profile {self.name}: {field} {value!r} is not one of {', '.join(allowed)}")

    def keep_float_for(self, recipe_name: str) -> KeepFloat | None:
        """The profile's measured float layers for this recipe name, or None."""
        return next((k for k in self.keep_float if recipe_name in k.recipes), None)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The extra pipeline call arguments, as a new dict."""
        return dict(self.call_kwargs)

    def check_guidance(self, guidance: float | None) -> None:
        """Refuse a guidance value the model cannot use (None means the profile's default)."""
        if guidance is None or self.guidance_kind != "none" or guidance in (0, 1):
            return
        raise DiffquantError(f"{self.title} takes no guidance (it has no guidance embedding and is not run with "
                             f"classifier-free guidance), so guidance {guidance:g} would be ignored: leave guidance "
                             "unset or pass 0")

    def default_prompts(self, n: int) -> list[str]:
        """`n` prompts for a run that names none: shapes captions, or the tutorial's prompt repeated."""
        if self.prompt_source == "shapes":
            from diffquant.models.shapes.dataset import sample_captions

            return sample_captions(n, seed=SHAPES_PROMPT_SEED)
        return [TUTORIAL_PROMPT] * n


# shapes-sd's W8A8 float layers: the 33 that `diffquant sensitivity --recipe w8a8-int8-sq --max-keep 36` (and
# `--recipe w8a8-int8-ort-sq` for the -ort recipes, whose Conv outputs are quantized too) ranks most sensitive,
# most sensitive first. 33 keeps 100 of the UNet's 133 layers quantized; the PSNR rises with every step of the
# keep-float curve up to it (64 captions vs fp32, w8a8-int8-sq: 0 float 48.35 dB, 8: 50.39, 16: 51.32,
# 24: 53.40, 33: 54.14), and ModelOpt's hand-written filter keeps a similar 30 float (49.29 dB).
_SHAPES_SD_W8A8_FLOAT = (
    "conv_in", "up_blocks.2.resnets.1.conv_shortcut", "up_blocks.2.resnets.1.conv1",
    "up_blocks.2.resnets.0.conv_shortcut", "conv_out", "up_blocks.2.resnets.0.conv1", "up_blocks.2.resnets.1.conv2",
    "up_blocks.2.resnets.0.conv2", "up_blocks.2.attentions.0.proj_out", "up_blocks.1.resnets.1.conv_shortcut",
    "up_blocks.2.attentions.1.proj_out", "up_blocks.1.upsamplers.0.conv", "down_blocks.0.resnets.0.conv2",
    "down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.proj_out", "up_blocks.2.attentions.1.proj_in",
    "up_blocks.1.resnets.1.conv2", "down_blocks.0.resnets.0.conv1", "up_blocks.1.attentions.1.proj_out",
    "up_blocks.2.attentions.0.transformer_blocks.0.ff.net.2",
    "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2", "up_blocks.1.resnets.0.conv_shortcut",
    "up_blocks.2.attentions.1.transformer_blocks.0.ff.net.2", "up_blocks.2.attentions.0.proj_in",
    "up_blocks.1.attentions.1.proj_in", "down_blocks.0.downsamplers.0.conv",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", "up_blocks.1.resnets.1.conv1",
    "up_blocks.1.resnets.0.conv2", "up_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj",
    "time_embedding.linear_2", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj",
)
_SHAPES_SD_W8A8_ORT_FLOAT = (
    "conv_in", "up_blocks.2.resnets.1.conv_shortcut", "up_blocks.2.resnets.1.conv1",
    "up_blocks.2.resnets.0.conv_shortcut", "conv_out", "up_blocks.1.upsamplers.0.conv",
    "up_blocks.2.resnets.0.conv1", "up_blocks.2.resnets.1.conv2", "up_blocks.2.resnets.0.conv2",
    "up_blocks.2.attentions.0.proj_out", "up_blocks.2.attentions.1.proj_out", "up_blocks.1.resnets.1.conv_shortcut",
    "down_blocks.0.attentions.0.proj_in", "down_blocks.0.resnets.0.conv2", "down_blocks.0.attentions.0.proj_out",
    "down_blocks.0.resnets.0.conv1", "up_blocks.2.attentions.1.proj_in", "up_blocks.1.resnets.1.conv2",
    "up_blocks.2.attentions.0.proj_in", "up_blocks.1.resnets.0.conv_shortcut", "up_blocks.1.attentions.1.proj_out",
    "up_blocks.1.resnets.1.conv1", "up_blocks.1.attentions.1.proj_in", "down_blocks.0.downsamplers.0.conv",
    "up_blocks.2.attentions.0.transformer_blocks.0.ff.net.2",
    "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
    "up_blocks.2.attentions.1.transformer_blocks.0.ff.net.2", "down_blocks.1.resnets.0.conv_shortcut",
    "up_blocks.1.resnets.0.conv1", "up_blocks.1.attentions.0.proj_out", "up_blocks.1.resnets.0.conv2",
    "up_blocks.1.attentions.0.proj_in", "up_blocks.0.upsamplers.0.conv",
)
_SHAPES_SD_KEEP_FLOAT = (
    KeepFloat(("w8a8-int8", "w8a8-int8-sq", "w8a8-int8-sq-attn"), _SHAPES_SD_W8A8_FLOAT,
              "the 33 layers `diffquant sensitivity --recipe w8a8-int8-sq` ranks most sensitive on shapes-sd "
              "(images vs fp32, 64 captions: w8a8-int8-sq 48.35 dB with every layer quantized, 54.14 dB with "
              "these float; w8a8-int8 54.71 dB); 100 of 133 layers stay quantized"),
    KeepFloat(("w8a8-fp8",), _SHAPES_SD_W8A8_FLOAT,
              "the 33 layers `diffquant sensitivity --recipe w8a8-int8-sq` ranks most sensitive on shapes-sd, "
              "measured for fp8 too (images vs fp32, 64 captions: 41.63 dB with every layer quantized, 46.28 dB "
              "with these float); 100 of 133 layers stay quantized"),
    KeepFloat(("w8a8-int8-ort", "w8a8-int8-ort-sq", "w8a8-int8-ort-sq-attn"), _SHAPES_SD_W8A8_ORT_FLOAT,
              "the 33 layers `diffquant sensitivity --recipe w8a8-int8-ort-sq` ranks most sensitive on shapes-sd "
              "(images vs fp32, 64 captions: 46.51 dB with every layer quantized, 54.82 dB with these float); "
              "100 of 133 layers stay quantized"),
)

# shapes-sd3's (v2, the 13,500-step model): the 24 layers `diffquant sensitivity --model shapes-sd3 --recipe w8a8-int8
# --max-keep 24 --quantize-all` ranks most sensitive (65 of 89 quantized, about the share shapes-sd keeps). 64
# captions vs fp32 (`diffquant peers --model shapes-sd3 --n 64`), mean / p10 / worst: every layer 44.07 / 36.30 /
# 30.65 dB, these 24 float 47.30 / 39.67 / 21.15 (one trajectory diverges), ModelOpt's best (INT8 SmoothQuant + its
# filter, 81 quantized) 44.33 / 36.95 / 21.04. Its MMDiT has no smoothing fold point and its one Conv
# (pos_embed.proj) is float here, so the -sq and -ort recipes quantize exactly what w8a8-int8 does. fp8 with the 16
# most sensitive float: 38.16 dB against 36.44 with every layer and ModelOpt's fp8 38.66.
_SHAPES_SD3_W8A8_FLOAT = (
    "pos_embed.proj", "proj_out", "transformer_blocks.4.ff.net.2", "transformer_blocks.0.ff.net.0.proj",
    "transformer_blocks.4.ff.net.0.proj", "transformer_blocks.3.ff.net.0.proj", "transformer_blocks.2.ff.net.0.proj",
    "transformer_blocks.2.norm1.linear", "transformer_blocks.2.ff.net.2", "transformer_blocks.5.ff.net.0.proj",
    "transformer_blocks.0.ff.net.2", "transformer_blocks.1.ff.net.0.proj", "transformer_blocks.4.norm1.linear",
    "transformer_blocks.0.norm1.linear", "transformer_blocks.1.ff.net.2", "transformer_blocks.5.ff.net.2",
    "transformer_blocks.1.norm1.linear", "transformer_blocks.3.norm1.linear", "transformer_blocks.5.norm1.linear",
    "transformer_blocks.4.attn.to_out.0", "transformer_blocks.3.ff.net.2", "norm_out.linear",
    "transformer_blocks.2.attn.to_out.0", "transformer_blocks.5.attn.to_out.0",
)
_SHAPES_SD3_KEEP_FLOAT = (
    KeepFloat(("w8a8-int8", "w8a8-int8-sq", "w8a8-int8-ort", "w8a8-int8-ort-sq", "w8a8-int8-sq-attn",
               "w8a8-int8-ort-sq-attn"), _SHAPES_SD3_W8A8_FLOAT,
              "the 24 layers `diffquant sensitivity --model shapes-sd3 --recipe w8a8-int8 --quantize-all` ranks most "
              "sensitive (images vs fp32, 64 captions: 44.07 dB with every layer quantized, 47.30 dB with these "
              "float); 65 of 89 layers stay quantized"),
    KeepFloat(("w8a8-fp8",), _SHAPES_SD3_W8A8_FLOAT[:16],
              "the 16 layers `diffquant sensitivity --model shapes-sd3 --recipe w8a8-int8 --quantize-all` ranks most "
              "sensitive (images vs fp32, 64 captions: 36.44 dB with every layer quantized, 38.16 dB with these "
              "float); 73 of 89 layers stay quantized"),
)


def _shapes_profiles() -> tuple[ModelProfile, ModelProfile]:
    from diffquant.models.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS
    from diffquant.models.shapes.model_sd3 import SD3_DEFAULT_GUIDANCE, SD3_DEFAULT_STEPS, SD3_MAX_SEQUENCE_LENGTH

    shapes = dict(prompt_source="shapes", shapeeval=True, num_images=6)
    return (ModelProfile("shapes-sd", "shapes-sd", "UNet2DConditionModel", DEFAULT_STEPS, DEFAULT_GUIDANCE,
                         keep_float=_SHAPES_SD_KEEP_FLOAT, **shapes),
            ModelProfile("shapes-sd3", "shapes-sd3", "SD3Transformer2DModel", SD3_DEFAULT_STEPS, SD3_DEFAULT_GUIDANCE,
                         call_kwargs=(("max_sequence_length", SD3_MAX_SEQUENCE_LENGTH),), gpu_dtype="bf16",
                         keep_float=_SHAPES_SD3_KEEP_FLOAT, **shapes))


SHAPES_SD, SHAPES_SD3 = _shapes_profiles()
SD = ModelProfile("sd", "SD 1.x/2.x", "UNet2DConditionModel", 50, 7.5)
SDXL = ModelProfile("sdxl", "SDXL", "UNet2DConditionModel", 50, 5.0)
_SD3 = dict(denoiser="SD3Transformer2DModel", call_kwargs=(("max_sequence_length", 256),), gpu_dtype="bf16")
SD3 = ModelProfile("sd3", "SD3-medium", steps=28, guidance=7.0, **_SD3)
SD35_LARGE = ModelProfile("sd3.5-large", "SD3.5-large", steps=28, guidance=3.5, **_SD3)
SD35_MEDIUM = ModelProfile("sd3.5-medium", "SD3.5-medium", steps=40, guidance=4.5, **_SD3)
_FLUX = dict(denoiser="FluxTransformer2DModel", gpu_dtype="bf16")
FLUX_DEV = ModelProfile("flux-dev", "FLUX.1-dev", steps=50, guidance=3.5, guidance_kind="distilled",
                        call_kwargs=(("height", 1024), ("width", 1024), ("max_sequence_length", 512)), **_FLUX)
FLUX_SCHNELL = ModelProfile("flux-schnell", "FLUX.1-schnell", steps=4, guidance=0.0, guidance_kind="none",
                            call_kwargs=(("height", 1024), ("width", 1024), ("max_sequence_length", 256)), **_FLUX)
# PixArt: the image is drawn at the size asked (diffusers' default "resolution binning" would draw it at the nearest
# of its trained aspect ratios and resize: calibration, export shapes and --height/--width would not be what they say).
_PIXART = dict(denoiser="PixArtTransformer2DModel", pipelines=("PixArtSigmaPipeline",))
PIXART_SIGMA = ModelProfile("pixart-sigma", "PixArt-Σ", steps=20, guidance=4.5,
                            call_kwargs=(("max_sequence_length", 300), ("use_resolution_binning", False)), **_PIXART)
PIXART_ALPHA = ModelProfile("pixart-alpha", "PixArt-α", "PixArtTransformer2DModel", steps=20, guidance=4.5,
                            call_kwargs=(("max_sequence_length", 120), ("use_resolution_binning", False)),
                            pipelines=("PixArtAlphaPipeline",))
# Sana 1600M/600M: 20 steps at guidance 4.5 with 300 Gemma-2 tokens (SanaPipeline's defaults), at the size asked.
SANA = ModelProfile("sana", "Sana", "SanaTransformer2DModel", steps=20, guidance=4.5, gpu_dtype="bf16",
                    call_kwargs=(("max_sequence_length", 300), ("use_resolution_binning", False)),
                    pipelines=("SanaPipeline",))
# Z-Image-Turbo: its model card's 8 steps (9 schedule points) without guidance, 512 Qwen3 tokens.
Z_IMAGE = ModelProfile("z-image-turbo", "Z-Image-Turbo", "ZImageTransformer2DModel", steps=8, guidance=0.0,
                       gpu_dtype="bf16", call_kwargs=(("max_sequence_length", 512),), pipelines=("ZImagePipeline",))
# Qwen-Image: 50 steps of true classifier-free guidance 4.0 against a blank negative prompt (its model card); the
# pipeline's `guidance_scale` is for guidance-distilled checkpoints only, so the guidance goes to `true_cfg_scale`.
QWEN_IMAGE = ModelProfile("qwen-image", "Qwen-Image", "QwenImageTransformer2DModel", steps=50, guidance=4.0,
                          gpu_dtype="bf16", guidance_argument="true_cfg_scale",
                          call_kwargs=(("negative_prompt", " "), ("max_sequence_length", 512)),
                          pipelines=("QwenImagePipeline",))
# FLUX.2-dev: guidance-distilled (guidance 4.0 is an input of the denoiser), 50 steps; FLUX.2 [klein] 4B/9B: the
# step-distilled releases' 4 steps at guidance 1.0 (no CFG; the -base checkpoints want 50 steps at 4.0).
FLUX2_DEV = ModelProfile("flux2-dev", "FLUX.2-dev", "Flux2Transformer2DModel", steps=50, guidance=4.0,
                         guidance_kind="distilled", gpu_dtype="bf16", call_kwargs=(("max_sequence_length", 512),),
                         pipelines=("Flux2Pipeline",))
FLUX2_KLEIN = ModelProfile("flux2-klein", "FLUX.2 [klein]", "Flux2Transformer2DModel", steps=4, guidance=1.0,
                           gpu_dtype="bf16", call_kwargs=(("max_sequence_length", 512),),
                           pipelines=("Flux2KleinPipeline",))
# Wan 2.1/2.2 text-to-video: 50 steps at guidance 5.0, 81 frames (its model card), 480x832 (the pipeline's default).
WAN = ModelProfile("wan", "Wan 2.x T2V", "WanTransformer3DModel", steps=50, guidance=5.0, gpu_dtype="bf16",
                   call_kwargs=(("max_sequence_length", 512),), frames=81, pipelines=("WanPipeline",))
PROFILES = {p.name: p for p in (SHAPES_SD, SHAPES_SD3, SD, SDXL, SD3, SD35_LARGE, SD35_MEDIUM, FLUX_DEV, FLUX_SCHNELL,
                                PIXART_SIGMA, PIXART_ALPHA, SANA, Z_IMAGE, QWEN_IMAGE, FLUX2_DEV, FLUX2_KLEIN, WAN)}


def embedded_models() -> dict[str, Path]:
    """The models shipped inside the package: name -> folder (a folder may be absent until it is shipped)."""
    from diffquant.models.shapes.model import WEIGHTS_DIR
    from diffquant.models.shapes.model_sd3 import SD3_WEIGHTS_DIR

    return {"shapes-sd": WEIGHTS_DIR, "shapes-sd3": SD3_WEIGHTS_DIR}


def embedded_profile(path: str | Path | None) -> ModelProfile | None:
    """The profile of an embedded model when `path` is its folder, else None.

    The folder is the marker: a pipeline keeps the path it was loaded from (`pipe.name_or_path`), and
    so do its quantized and ONNX Runtime copies."""
    if not path:
        return None
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    for name, folder in embedded_models().items():
        if resolved == folder.resolve():
            return PROFILES[name]
    return trained_profile(resolved)


def trained_profile(folder: Path) -> ModelProfile | None:
    """The profile a shapes trainer wrote into `folder` (a model retrained with `train` / `train_sd3` gets
    its model's steps, guidance and text length), or None."""
    from diffquant.models.shapes.model import PROFILE_FILE

    marker = folder / PROFILE_FILE
    if not marker.is_file():
        return None
    try:
        name = json.loads(marker.read_text()).get("profile")
    except (OSError, ValueError, AttributeError):
        return None
    profile = PROFILES.get(name)
    return profile if profile is not None and profile.prompt_source == "shapes" else None



def class_profile(pipeline_class: str, denoiser_config: Mapping | None = None) -> ModelProfile:
    """The profile of a real model from its pipeline class, refined by its denoiser's config when given
    (SDXL's added conditioning, SD3.5's QK norm and dual attention, FLUX.1-dev's guidance embedding)."""
    config = dict(denoiser_config or {})
    named = [p for p in PROFILES.values() if pipeline_class in p.pipelines]
    if named:
        return named[0]
    if "Flux" in pipeline_class or config.get("_class_name") == "FluxTransformer2DModel":
        return FLUX_SCHNELL if config.get("guidance_embeds") is False else FLUX_DEV
    if "StableDiffusion3" in pipeline_class or config.get("_class_name") == "SD3Transformer2DModel":
        if config.get("dual_attention_layers"):  # MMDiT-X: SD3.5-medium
            return SD35_MEDIUM
        return SD35_LARGE if config.get("qk_norm") else SD3
    if "XL" in pipeline_class or config.get("addition_embed_type") == "text_time":
        return SDXL
    by_denoiser = [p for p in PROFILES.values() if p.pipelines and p.denoiser == config.get("_class_name")]
    return by_denoiser[0] if by_denoiser else SD


def profile_of(pipe) -> ModelProfile:
    """The profile of a loaded pipeline: an embedded model's by its folder, else by pipeline class."""
    embedded = embedded_profile(getattr(pipe, "name_or_path", None))
    if embedded is not None:
        return embedded
    denoiser = next((m for m in (getattr(pipe, "transformer", None), getattr(pipe, "unet", None)) if m is not None),
                    None)
    config = getattr(denoiser, "config", None)
    if config is not None:
        config = {"_class_name": type(denoiser).__name__} | dict(config)
    return class_profile(type(pipe).__name__, config)


def supported_models() -> str:
    """The supported denoiser classes with the models they run, e.g. 'UNet2DConditionModel (SD 1.x/2.x, SDXL)'."""
    from diffquant.models.denoisers import supported_classes

    parts = []
    for cls in supported_classes():
        titles = [p.title for p in PROFILES.values() if p.denoiser == cls and p.prompt_source != "shapes"]
        parts.append(f"{cls} ({', '.join(titles)})" if titles else cls)
    return ", ".join(parts)
