"""The shapes-sd dataset: one filled shape on a plain background, with a caption grammar.

Captions follow exactly::

    a [SIZE ]COLOR SHAPE[ POSITION] on a BGCOLOR background

with "an" instead of "a" before a vowel ("an orange circle", "on an orange background"); the parser
accepts either article.

Images are rendered on the fly with PIL, deterministically per seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # render at 4x and box-filter down, so edges are anti-aliased like a photo

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")

# Half-extent of the shape's bounding box, in pixels of the 32x32 image.
# Small shapes are at least 10 pixels wide: below that the VAE's 2x-downsampled latents blur a
# triangle's apex into a circle (the first shapes-sd VAE read 28% of 8-11 pixel shapes wrong).
SIZE_RADIUS = {"small": (5.0, 6.0), "large": (8.0, 9.5)}
# Offset of the shape centre from the image centre for a named position.
POSITION_OFFSET = (6.0, 16.0)  # (min, max) along the named axis; clipped so the shape stays inside
POSITION_JITTER = 2.0  # along the other axis
CENTER_JITTER = 1.5

_CAPTION_RE = re.compile(
    r"^an? (?:(?P<size>small|large) )?(?P<color>\w+) (?P<shape>\w+)"
    r"(?: (?P<position>on the left|on the right|at the top|at the bottom|in the center))?"
    r" on an? (?P<background>\w+) background$"
)


def article(word: str) -> str:
    """The indefinite article English puts before `word`."""
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows. `size` and `position` are None when the caption leaves them out."""

    color: str
    shape: str
    background: str
    size: str | None = None
    position: str | None = None

    @property
    def caption(self) -> str:
        size = f"{self.size} " if self.size else ""
        position = f" {self.position}" if self.position else ""
        noun_phrase = f"{size}{self.color} {self.shape}"
        return (f"{article(noun_phrase)} {noun_phrase}{position} "
                f"on {article(self.background)} {self.background} background")


def parse_caption(caption: str) -> ShapeSpec:
    """Parse a caption of the shapes grammar back into its attributes.

    Raises:
        ValueError: the caption does not follow the grammar.
    """
    match = _CAPTION_RE.match(caption.strip().lower())
    if not match or match["color"] not in PALETTE or match["background"] not in PALETTE or match["shape"] not in SHAPES:
        raise ValueError(
            f"caption {caption!r} is not in the shapes grammar "
            "'a|an [SIZE ]COLOR SHAPE[ POSITION] on a|an BGCOLOR background'"
        )
    return ShapeSpec(
        color=match["color"], shape=match["shape"], background=match["background"],
        size=match["size"], position=match["position"],
    )


def random_spec(rng: random.Random, p_size: float = 0.5, p_position: float = 0.5) -> ShapeSpec:
    """Draw a random caption's attributes; size and position are each named with their probability."""
    color, background = rng.sample(COLORS, 2)
    return ShapeSpec(
        color=color,
        shape=rng.choice(SHAPES),
        background=background,
        size=rng.choice(SIZES) if rng.random() < p_size else None,
        position=rng.choice(POSITIONS) if rng.random() < p_position else None,
    )


def sample_captions(n: int, seed: int) -> list[str]:
    """`n` captions drawn from the grammar with `seed` (use disjoint seeds for train/calibration/eval)."""
    rng = random.Random(seed)
    return [random_spec(rng).caption for _ in range(n)]


def _layout(spec: ShapeSpec, rng: random.Random) -> tuple[float, float, float]:
    """Centre (x, y) and half-extent r, in image pixels, for a spec (unnamed attributes drawn at random)."""
    size = spec.size or rng.choice(SIZES)
    r = rng.uniform(*SIZE_RADIUS[size])
    c = IMAGE_SIZE / 2
    if spec.position is None:
        return rng.uniform(r, IMAGE_SIZE - r), rng.uniform(r, IMAGE_SIZE - r), r
    if spec.position == "in the center":
        return c + rng.uniform(-CENTER_JITTER, CENTER_JITTER), c + rng.uniform(-CENTER_JITTER, CENTER_JITTER), r
    far = min(POSITION_OFFSET[1], c - r)
    along = rng.uniform(POSITION_OFFSET[0], max(POSITION_OFFSET[0], far))
    across = rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    dx, dy = {
        "on the left": (-along, across),
        "on the right": (along, across),
        "at the top": (across, -along),
        "at the bottom": (across, along),
    }[spec.position]
    return c + dx, c + dy, r


def render(spec: ShapeSpec, seed: int) -> Image.Image:
    """Render `spec` as a 32x32 RGB image; the same (spec, seed) always gives the same pixels."""
    rng = random.Random(f"layout-{seed}")  # independent of the stream that drew the spec
    cx, cy, r = _layout(spec, rng)
    s = SUPERSAMPLE
    big = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), PALETTE[spec.background])
    draw = ImageDraw.Draw(big)
    box = [(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s]
    fill = PALETTE[spec.color]
    if spec.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif spec.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # isosceles triangle, apex up, filling its box: half the box area
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def sample(seed: int, p_position: float = 0.5) -> tuple[Image.Image, str]:
    """One (image, caption) training pair for `seed`; `p_position` is the share of captions naming a position."""
    rng = random.Random(seed)
    spec = random_spec(rng, p_position=p_position)
    return render(spec, seed), spec.caption


def batch(seed: int, n: int, p_position: float = 0.5) -> tuple[np.ndarray, list[str]]:
    """`n` pairs from consecutive seeds as a float array in [-1, 1], (N, 3, H, W), and their captions."""
    images, captions = zip(*(sample(seed * 100_003 + i, p_position) for i in range(n)))
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # (N, H, W, 3)
    return array.transpose(0, 3, 1, 2) / 127.5 - 1.0, list(captions)
