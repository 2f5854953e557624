"""Stage 4, generate: seeded images (image k always uses seed + k, whatever the batch) and image grids."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from .progress import progress

logger = logging.getLogger(__name__)

TUTORIAL_PROMPT = "A rabbit in a flower meadow"


@dataclass(frozen=True)
class GenerationSettings:
    """What makes a set of images reproducible."""

    steps: int
    guidance: float
    seed: int = 1024


def default_settings(pipe, seed: int = 1024) -> GenerationSettings:
    """shapes-sd: 25 DDIM steps, guidance 4; real models: the tutorial's 50 steps, guidance 7.5."""
    from .pipeline import is_shapes_sd
    from .shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS

    if is_shapes_sd(pipe):
        return GenerationSettings(DEFAULT_STEPS, DEFAULT_GUIDANCE, seed)
    return GenerationSettings(50, 7.5, seed)


def default_prompts(pipe, num_images: int = 3) -> list[str]:
    """shapes-sd: captions of its grammar; real models: the tutorial's prompt repeated."""
    from .pipeline import is_shapes_sd
    from .shapes.dataset import sample_captions

    if is_shapes_sd(pipe):
        return sample_captions(num_images, seed=2024)
    return [TUTORIAL_PROMPT] * num_images


@torch.inference_mode()
def generate(pipe, prompts: list[str], seed: int = 1024, steps: int | None = None,
             guidance: float | None = None, batch_size: int = 8, desc: str = "generate") -> list[Image.Image]:
    """Generate one image per prompt; image k uses its own CPU generator seeded `seed + k`.

    Args:
        pipe: a diffusers text-to-image pipeline.
        prompts: one prompt per image.
        seed: the first image's seed.
        steps, guidance: None for the model's defaults (see `default_settings`).
        batch_size: images per pipeline call; it does not change the images.

    Returns:
        PIL images, in prompt order.
    """
    defaults = default_settings(pipe, seed)
    steps = defaults.steps if steps is None else steps
    guidance = defaults.guidance if guidance is None else guidance
    images: list[Image.Image] = []
    starts = range(0, len(prompts), batch_size)
    for start in progress(starts, desc=desc, total=len(starts)):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed + start + k) for k in range(len(chunk))]
        out = pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators)
        images.extend(out.images)
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
