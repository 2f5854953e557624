"""Model profiles: the defaults of each model diffquant knows (steps, guidance, prompts, extra pipeline
arguments, GPU dtype), in one place instead of guessed from a pipeline's parts.

    profile = profile_of(pipe)           # the embedded shapes models by their folder, real models by class
    pipe(prompt, num_inference_steps=profile.steps, guidance_scale=profile.guidance, **profile.pipeline_kwargs())

The numbers of real models are those of their model cards (the diffusers examples on them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DiffquantError

GUIDANCE_KINDS = ("cfg", "distilled", "none")
PROMPT_SOURCES = ("shapes", "tutorial")
GPU_DTYPES = ("fp16", "bf16", "fp32")
TUTORIAL_PROMPT = "A rabbit in a flower meadow"
SHAPES_PROMPT_SEED = 2024  # default prompts; calibration captions use CALIBRATION_SEED in calibration.py


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

    def __post_init__(self) -> None:
        if self.steps < 1 or self.guidance < 0:
            raise DiffquantError(f"profile {self.name}: steps must be at least 1 and guidance at least 0")
        for field, value, allowed in (("guidance_kind", self.guidance_kind, GUIDANCE_KINDS),
                                      ("prompt_source", self.prompt_source, PROMPT_SOURCES),
                                      ("gpu_dtype", self.gpu_dtype, GPU_DTYPES)):
            if value not in allowed:
                raise DiffquantError(f"profile {self.name}: {field} {value!r} is not one of {', '.join(allowed)}")

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
            from .shapes.dataset import sample_captions

            return sample_captions(n, seed=SHAPES_PROMPT_SEED)
        return [TUTORIAL_PROMPT] * n


def _shapes_profiles() -> tuple[ModelProfile, ModelProfile]:
    from .shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS
    from .shapes.model_sd3 import SD3_DEFAULT_GUIDANCE, SD3_DEFAULT_STEPS, SD3_MAX_SEQUENCE_LENGTH

    shapes = dict(prompt_source="shapes", shapeeval=True, num_images=6)
    return (ModelProfile("shapes-sd", "shapes-sd", "UNet2DConditionModel", DEFAULT_STEPS, DEFAULT_GUIDANCE, **shapes),
            ModelProfile("shapes-sd3", "shapes-sd3", "SD3Transformer2DModel", SD3_DEFAULT_STEPS, SD3_DEFAULT_GUIDANCE,
                         call_kwargs=(("max_sequence_length", SD3_MAX_SEQUENCE_LENGTH),), gpu_dtype="bf16", **shapes))


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
PROFILES = {p.name: p for p in (SHAPES_SD, SHAPES_SD3, SD, SDXL, SD3, SD35_LARGE, SD35_MEDIUM, FLUX_DEV, FLUX_SCHNELL)}


def embedded_models() -> dict[str, Path]:
    """The models shipped inside the package: name -> folder (a folder may be absent until it is shipped)."""
    from .shapes.model import WEIGHTS_DIR
    from .shapes.model_sd3 import SD3_WEIGHTS_DIR

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
    return None


def class_profile(pipeline_class: str, denoiser_config: Mapping | None = None) -> ModelProfile:
    """The profile of a real model from its pipeline class, refined by its denoiser's config when given
    (SDXL's added conditioning, SD3.5's QK norm and dual attention, FLUX.1-dev's guidance embedding)."""
    config = dict(denoiser_config or {})
    if "Flux" in pipeline_class or config.get("_class_name") == "FluxTransformer2DModel":
        return FLUX_SCHNELL if config.get("guidance_embeds") is False else FLUX_DEV
    if "StableDiffusion3" in pipeline_class or config.get("_class_name") == "SD3Transformer2DModel":
        if config.get("dual_attention_layers"):  # MMDiT-X: SD3.5-medium
            return SD35_MEDIUM
        return SD35_LARGE if config.get("qk_norm") else SD3
    if "XL" in pipeline_class or config.get("addition_embed_type") == "text_time":
        return SDXL
    return SD


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
    from .denoisers import supported_classes

    parts = []
    for cls in supported_classes():
        titles = [p.title for p in PROFILES.values() if p.denoiser == cls and p.prompt_source != "shapes"]
        parts.append(f"{cls} ({', '.join(titles)})" if titles else cls)
    return ", ".join(parts)
