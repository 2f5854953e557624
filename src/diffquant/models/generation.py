"""Stage 4, generate: seeded images (image k always uses seed + k, whatever the batch) and image grids."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from diffquant.core.config import as_prompt_list, check_settings
from diffquant.core.errors import DiffquantError
from diffquant.core.progress import progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """What makes a set of images reproducible."""

    steps: int
    guidance: float
    seed: int = 1024


def default_settings(pipe, seed: int = 1024) -> GenerationSettings:
    """The model profile's steps and guidance (see `profiles.py`): shapes-sd 25 steps at guidance 2, SD 1.x/2.x
    the tutorial's 50 at 7.5, SD3 and FLUX.1 their model cards'."""
    from diffquant.models.profiles import profile_of

    profile = profile_of(pipe)
    return GenerationSettings(profile.steps, profile.guidance, seed)


def default_prompts(pipe, num_images: int = 3) -> list[str]:
    """The model profile's prompts: shapes captions for the shapes models, the tutorial's prompt repeated otherwise."""
    from diffquant.models.profiles import profile_of

    return profile_of(pipe).default_prompts(num_images)


def pipeline_kwargs(pipe, guidance: float | None = None, height: int | None = None,
                    width: int | None = None) -> dict:
    """The model profile's extra pipeline call arguments (SD3: the T5 length; FLUX.1: size and T5 length), with
    `height`/`width` when given; refuses a guidance the model cannot use (FLUX.1-schnell takes none)."""
    from diffquant.models.profiles import profile_of

    profile = profile_of(pipe)
    profile.check_guidance(guidance)
    for name, value in (("height", height), ("width", width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise DiffquantError(f"{name} must be a whole number of pixels of at least 1, got {value!r}")
    sizes = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    return profile.pipeline_kwargs() | sizes


@torch.inference_mode()
def generate(pipe, prompts: str | list[str], seed: int = 1024, steps: int | None = None,
             guidance: float | None = None, batch_size: int = 8, desc: str = "generate",
             on_image: Callable[[int, Image.Image], None] | None = None, height: int | None = None,
             width: int | None = None, show_progress: bool = True) -> list[Image.Image]:
    """Generate one image per prompt; image k uses its own CPU generator seeded `seed + k`.

    Args:
        pipe: a diffusers text-to-image pipeline.
        prompts: one prompt per image; a single string is one prompt (one image).
        seed: the first image's seed.
        steps, guidance: None for the model's defaults (see `default_settings`).
        batch_size: images per pipeline call; it does not change the images.
        on_image: called as `on_image(k, image)` as soon as each batch is made (e.g. to save it, so
            an interrupted run keeps the images already generated).
        height, width: image size in pixels (None: the model profile's, else the pipeline's default).
        show_progress: a progress bar over the batches (callers that show their own turn it off).

    Returns:
        PIL images, in prompt order.
    """
    prompts = as_prompt_list(prompts)
    check_settings(steps, guidance)
    if batch_size < 1:
        raise DiffquantError(f"batch_size must be at least 1, got {batch_size}")
    extra = pipeline_kwargs(pipe, guidance, height, width)
    defaults = default_settings(pipe, seed)
    steps = defaults.steps if steps is None else steps
    guidance = defaults.guidance if guidance is None else guidance
    images: list[Image.Image] = []
    starts = range(0, len(prompts), batch_size)
    for start in progress(starts, desc=desc, total=len(starts), disable=not show_progress):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed + start + k) for k in range(len(chunk))]
        out = pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators, **extra)
        for k, image in enumerate(out.images, start=start):
            if on_image is not None:
                on_image(k, image)
            images.append(image)
    return images


def image_grid(rows: dict[str, list[Image.Image]], column_labels: list[str] | None = None,
               cell: int | None = None) -> Image.Image:
    """A labelled grid: one row per entry of `rows` (label -> images), one column per prompt/seed.

    Small images (shapes-sd's 32x32) are upscaled with nearest neighbour to `cell` pixels so they
    stay visible; labels are drawn in a left margin and a header.
    """
    first = next(iter(rows.values()))[0]
    cell = cell or max(first.width, 128)
    label_w, header_h = 110, 18 if column_labels else 0
    ncols = max(len(images) for images in rows.values())
    grid = Image.new("RGB", (label_w + ncols * cell, header_h + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels or []):
        draw.text((label_w + c * cell + 3, 3), label[: cell // 6], fill="black")
    for r, (label, images) in enumerate(rows.items()):
        draw.text((4, header_h + r * cell + cell // 2 - 6), label[:18], fill="black")
        for c, image in enumerate(images):
            resample = Image.Resampling.NEAREST if image.width < cell else Image.Resampling.LANCZOS
            grid.paste(image.resize((cell, cell), resample), (label_w + c * cell, header_h + r * cell))
    return grid
