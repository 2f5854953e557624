"""Stage 5, measure: fidelity of quantized images against the baseline's (same prompts, same seeds),
the protocol of SVDQuant and ModelOpt: PSNR and SSIM (torchmetrics), LPIPS where its weights are
on disk, and ShapeEval prompt adherence for shapes-sd."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffquant.core.results import FrameQuality, Quality
from diffquant.models.shapes.dataset import parse_caption
from diffquant.models.shapes.shapeeval import evaluate

logger = logging.getLogger(__name__)
PSNR_IDENTICAL = 100.0  # dB reported for pixel-identical images (true PSNR is infinite, JSON has no inf)
_LPIPS_ALEX = "alexnet-owt-7be5be79.pth"  # the torchvision backbone torchmetrics' LPIPS needs


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2)  # (N, 3, H, W) in [0, 1]


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - test|^2)."""
    noise = (reference.float() - test.float()).pow(2).sum().item()
    signal = reference.float().pow(2).sum().item()
    return PSNR_IDENTICAL if noise == 0 else 10 * math.log10(signal / noise)


def lpips_unavailable_reason() -> str | None:
    """Why LPIPS cannot be computed offline here, or None when it can."""
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # noqa: BLE001 - torchvision can fail at import with several error types
        return f"LPIPS not computed: torchvision is not importable ({type(error).__name__})"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / _LPIPS_ALEX
    if not weights.is_file():
        return f"LPIPS not computed: its AlexNet backbone weights are not on disk ({weights})"
    return None


@dataclass
class Comparison:
    """Per-image fidelity of `images` against the baseline, and prompt adherence where measurable."""

    psnr_db: list[float]
    ssim: list[float]
    lpips: list[float] | None = None
    notes: list[str] = field(default_factory=list)
    shapeeval: dict[str, float] | None = None
    shapeeval_agreement: dict[str, float] | None = None
    frames: FrameQuality | None = None  # clips: their fidelity frame by frame

    def summary(self) -> dict:
        """Means over images (what the report's table shows)."""
        out = {"psnr_db": float(np.mean(self.psnr_db)), "ssim": float(np.mean(self.ssim)),
               "lpips": None if self.lpips is None else float(np.mean(self.lpips))}
        if self.shapeeval is not None:
            out["shapeeval"] = self.shapeeval
            out["shapeeval_agreement"] = self.shapeeval_agreement
        return out

    def to_dict(self) -> dict:
        out = {"per_image": {"psnr_db": self.psnr_db, "ssim": self.ssim, "lpips": self.lpips},
               "mean": self.summary(), "notes": self.notes}
        return out | ({"frames": asdict(self.frames)} if self.frames is not None else {})


def are_shapes_captions(prompts: list[str]) -> bool:
    try:
        for prompt in prompts:
            parse_caption(prompt)
    except ValueError:
        return False
    return True


def prompt_adherence(images: list[Image.Image], prompts: list[str]) -> dict[str, float] | None:
    """ShapeEval accuracy when every prompt is a caption of the shapes grammar, else None."""

    return evaluate(images, prompts) if are_shapes_captions(prompts) else None


def fidelity(ref: torch.Tensor, test: torch.Tensor,
             lpips: bool = True) -> tuple[list[float], list[float], list[float] | None, str | None]:
    """Per-image PSNR (dB), SSIM and LPIPS (unless `lpips` is False) of `test` against `ref`, both (N, 3, H, W) in
    [0, 1].

    Returns (psnr, ssim, lpips or None, the reason LPIPS is missing or None)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    psnr = [PSNR_IDENTICAL if torch.equal(r, t) else
            float(peak_signal_noise_ratio(t[None], r[None], data_range=1.0)) for r, t in zip(ref, test)]
    ssim = structural_similarity_index_measure(test, ref, data_range=1.0, reduction="none")
    reason = lpips_unavailable_reason() if lpips else "LPIPS not asked for"
    lpips_values = None
    if reason is None:
        from torchmetrics.functional.image import learned_perceptual_image_patch_similarity as lpips_fn

        lpips_values = [float(lpips_fn(t[None], r[None], net_type="alex", normalize=True)) for r, t in zip(ref, test)]
    return psnr, [float(s) for s in ssim.reshape(-1)], lpips_values, reason


def frame_tiles(images: torch.Tensor, frames: int) -> torch.Tensor:
    """Clips saved as strips (N, 3, H, frames * W) -> their frames (N * frames, 3, H, W), clip by clip."""
    n, c, h, w = images.shape
    if w % frames:
        raise ValueError(f"a strip {w} pixels wide does not hold {frames} frames of equal width")
    return images.reshape(n, c, h, frames, w // frames).permute(0, 3, 1, 2, 4).reshape(n * frames, c, h, w // frames)


class FidelityAccumulator:
    """Per-image fidelity of an image set against a reference set (same prompts and seeds), and ShapeEval,
    accumulated chunk by chunk: the one place diffquant measures images against a reference.

    `reference_detections`: the reference set's ShapeEval detections when they are known already (they are
    then not detected again), else None. `frames` > 1: the images are clips saved as strips of that many frames;
    each clip's own PSNR/SSIM is the strip's, and every frame is measured too (`Quality.frames`)."""

    def __init__(self, shapes: bool, reference_detections: list | None = None, frames: int = 1) -> None:
        self.frames = frames
        self.frame_psnr: list[list[float]] = []  # per clip, per frame
        self.frame_ssim: list[list[float]] = []
        self.known_reference = reference_detections is not None
        self.reference_detections: list = list(reference_detections or [])
        self.psnr: list[float] = []
        self.ssim: list[float] = []
        self.lpips: list[float] | None = []
        self.notes: set[str] = set()
        self.shapes = shapes
        self.scores: list = []
        self.detections: list = []

    def update(self, reference: list[Image.Image], images: list[Image.Image], prompts: list[str]) -> None:
        reference_tensor, images_tensor = to_tensor(reference), to_tensor(images)
        if self.frames > 1:
            psnr, ssim, _, _ = fidelity(frame_tiles(reference_tensor, self.frames),
                                        frame_tiles(images_tensor, self.frames), lpips=False)
            self.frame_psnr += [psnr[k:k + self.frames] for k in range(0, len(psnr), self.frames)]
            self.frame_ssim += [ssim[k:k + self.frames] for k in range(0, len(ssim), self.frames)]
        psnr, ssim, lpips, note = fidelity(reference_tensor, images_tensor)
        self.psnr += psnr
        self.ssim += ssim
        if lpips is None:
            self.lpips = None
            self.notes.add(note)
        elif self.lpips is not None:
            self.lpips += lpips
        if self.shapes:
            from diffquant.models.shapes.shapeeval import detect, score

            if not self.known_reference:
                self.reference_detections += [detect(image) for image in reference]
            scored = [score(image, prompt) for image, prompt in zip(images, prompts)]
            self.scores += scored
            self.detections += [s.detection for s in scored]

    def quality(self) -> Quality:
        """Means, the 10th percentile and worst image, and every image's values (in image order)."""
        shapeeval = agreement = None
        if self.shapes:
            from diffquant.models.shapes.shapeeval import agreement_of, summarize

            shapeeval = summarize(self.scores)
            agreement = agreement_of(self.reference_detections, self.detections)
        quality = Quality.of_images(self.psnr, self.ssim, self.lpips, shapeeval, agreement)
        if self.frames > 1:
            quality = replace(quality, frames=FrameQuality.of_clips(self.frame_psnr, self.frame_ssim))
        return quality

    def comparison(self) -> Comparison:
        quality = self.quality()
        return Comparison(psnr_db=list(self.psnr), ssim=list(self.ssim),
                          lpips=None if self.lpips is None else list(self.lpips), notes=sorted(self.notes),
                          shapeeval=quality.shapeeval, shapeeval_agreement=quality.shapeeval_agreement,
                          frames=quality.frames)


def compare(baseline_images: list[Image.Image], images: list[Image.Image], prompts: list[str],
            frames: int = 1) -> Comparison:
    """Compare images generated with the same prompts and seeds against the baseline's.

    Args:
        baseline_images: the reference (e.g. fp32) images.
        images: the images to judge, in the same order.
        prompts: the prompt of each image (ShapeEval is scored when they are shapes captions).
        frames: the images are clips saved as strips of this many frames (`generation.strip`): each frame is
            measured too.

    Returns:
        A `Comparison` with per-image PSNR (dB), SSIM, LPIPS (or a note why not) and, for shapes
        captions, ShapeEval accuracy per attribute and agreement with the baseline's detections.
    """
    if not (len(baseline_images) == len(images) == len(prompts)):
        raise ValueError(f"compare needs as many images as baseline images and prompts, got "
                         f"{len(images)}, {len(baseline_images)} and {len(prompts)}")
    accumulator = FidelityAccumulator(are_shapes_captions(prompts), frames=frames)
    accumulator.update(baseline_images, images, prompts)
    return accumulator.comparison()
