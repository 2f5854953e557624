"""ShapeEval: an objective prompt-adherence metric for shapes-sd, in the spirit of GenEval.

A deterministic detector (numpy only, no learned weights) reads background colour, shape colour,
shape class, position and size from an image; a scorer compares them with what the caption asks.
Hand-written because no library detects this synthetic grammar.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from diffquant.models.shapes.dataset import IMAGE_SIZE, PALETTE, ShapeSpec, parse_caption

ATTRIBUTES = ("background", "color", "shape", "position", "size")
_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float32)  # (P, 3)
_BORDER = 2  # pixels of the image border that are read as background
_MIN_CONTRAST = 40.0  # RGB distance from the background above which a pixel belongs to the shape
# Fill ratio of the shape's extent box: square 1.0, circle pi/4, triangle 0.5.
_SQUARE_ABOVE, _TRIANGLE_BELOW = 0.89, 0.70
_CENTER_WITHIN = 3.0  # pixels (of a 32-pixel image) from the centre still read as "in the center"
_LARGE_ABOVE = 14.0  # extent (pixels of a 32-pixel image) between small (<= 12) and large (>= 16)


@dataclass(frozen=True)
class Detection:
    """What the detector read from one image; `shape` is None when no shape was found."""

    background: str
    color: str | None
    shape: str | None
    position: str | None
    size: str | None
    fill_ratio: float = 0.0
    extent: float = 0.0


def _nearest_color(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE_RGB - rgb, axis=1)))]


def detect(image: Image.Image) -> Detection:
    """Read background colour, shape colour and class, position and size from an RGB image."""
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    px = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    border = np.concatenate([
        px[:_BORDER].reshape(-1, 3), px[-_BORDER:].reshape(-1, 3),
        px[:, :_BORDER].reshape(-1, 3), px[:, -_BORDER:].reshape(-1, 3),
    ])
    bg_rgb = np.median(border, axis=0)
    background = _nearest_color(bg_rgb)
    bg_rgb = _PALETTE_RGB[_PALETTE_NAMES.index(background)]

    far = np.linalg.norm(px - bg_rgb, axis=2) > _MIN_CONTRAST  # (H, W)
    if far.sum() < 4:
        return Detection(background, None, None, None, None)
    fg_rgb = np.median(px[far], axis=0)
    color = _nearest_color(fg_rgb)
    if color == background:  # the median sits nearest the background's colour: read it raw
        color = _nearest_color(fg_rgb + (fg_rgb - bg_rgb))
    fg_rgb = _PALETTE_RGB[_PALETTE_NAMES.index(color)]

    # Soft coverage of each pixel by the shape, so anti-aliased edges count fractionally and the
    # geometry below is sub-pixel accurate even for 8-pixel shapes.
    direction = fg_rgb - bg_rgb
    if not direction.any():  # the shape reads as the background's colour: no geometry to measure
        return Detection(background, color, None, None, None)
    alpha = np.clip(((px - bg_rgb) @ direction) / float(direction @ direction), 0.0, 1.0)  # (H, W)
    alpha[alpha < 0.2] = 0.0
    area = float(alpha.sum())
    width = float(alpha.sum(axis=1).max())  # widest row
    height = float(alpha.sum(axis=0).max())  # tallest column
    fill = area / max(width * height, 1e-6)
    shape = "square" if fill > _SQUARE_ABOVE else "triangle" if fill < _TRIANGLE_BELOW else "circle"

    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    dx = float((alpha * xs).sum() / area) - IMAGE_SIZE / 2
    dy = float((alpha * ys).sum() / area) - IMAGE_SIZE / 2
    if shape == "triangle":
        dy -= height / 6  # the centroid of an apex-up triangle sits a third below its box centre
    if max(abs(dx), abs(dy)) < _CENTER_WITHIN:
        position = "in the center"
    elif abs(dx) >= abs(dy):
        position = "on the left" if dx < 0 else "on the right"
    else:
        position = "at the top" if dy < 0 else "at the bottom"
    extent = max(width, height)
    size = "large" if extent > _LARGE_ABOVE else "small"
    return Detection(background, color, shape, position, size, fill, extent)


@dataclass
class Score:
    """Per-attribute hits for one image: None where the caption does not name the attribute."""

    caption: str
    detection: Detection
    hits: dict[str, bool | None] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        """All attributes the caption names were found (GenEval's per-image success)."""
        return all(h for h in self.hits.values() if h is not None)


def score(image: Image.Image, caption: str) -> Score:
    """Score one image against its caption."""
    spec: ShapeSpec = parse_caption(caption)
    found = detect(image)
    hits = {name: (None if getattr(spec, name) is None else getattr(found, name) == getattr(spec, name))
            for name in ATTRIBUTES}
    return Score(caption, found, hits)


def evaluate(images: list[Image.Image], captions: list[str]) -> dict[str, float]:
    """Accuracy per attribute (over the captions that name it), and `overall`: images with every
    named attribute right. Values are fractions in [0, 1]; `n_<attribute>` counts are included."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions: pass one caption per image")
    return summarize([score(im, cap) for im, cap in zip(images, captions)])


def summarize(scores: list[Score]) -> dict[str, float]:
    """`evaluate`'s accuracies from per-image scores (so a long evaluation can score image by image)."""
    result: dict[str, float] = {}
    for name in ATTRIBUTES:
        named = [s.hits[name] for s in scores if s.hits[name] is not None]
        if named:
            result[name] = sum(named) / len(named)
            result[f"n_{name}"] = len(named)
    result["overall"] = sum(s.correct for s in scores) / max(len(scores), 1)
    return result


def agreement(reference: list[Image.Image], images: list[Image.Image]) -> dict[str, float]:
    """Share of images whose detected attributes equal those detected in the reference image of the
    same index (e.g. the fp32 image of the same prompt and seed), per attribute and for all five.

    Unlike accuracy, this does not depend on the reference model's own mistakes: it counts what a
    change of the model (quantization) changed in what the image shows."""
    if len(reference) != len(images):
        raise ValueError(f"{len(reference)} reference images but {len(images)} images: pass one of each per seed")
    return agreement_of([detect(r) for r in reference], [detect(i) for i in images])


def agreement_of(reference: list[Detection], detections: list[Detection]) -> dict[str, float]:
    """`agreement` from per-image detections (so a long evaluation can detect image by image)."""
    pairs = list(zip(reference, detections))
    n = max(len(pairs), 1)
    result = {name: sum(getattr(a, name) == getattr(b, name) for a, b in pairs) / n for name in ATTRIBUTES}
    result["all"] = sum(all(getattr(a, name) == getattr(b, name) for name in ATTRIBUTES) for a, b in pairs) / n
    return result
