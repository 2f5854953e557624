"""Metrics of a run's image sets, read back from disk a chunk at a time (memory stays bounded whatever the
number of images): PSNR/SSIM/LPIPS and ShapeEval against the baseline, and the metrics that need a model,
from torchmetrics: CLIP score (`CLIPScore`), FID of each set against the baseline's images (SVDQuant's
"reference FID") and against real images (`FrechetInceptionDistance`).

FID's features: InceptionV3 (torchmetrics' default, through torch-fidelity) when torch-fidelity is
installed and its weights are on disk; otherwise the image tower of the `--clip-model` CLIP (projected
image embeddings, as clean-fid's CLIP variant), named as such in the report. A metric whose weights cannot
be loaded is left out with one line saying why; nothing is downloaded unless the user names a Hub model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from diffquant.evaluate.metrics import FidelityAccumulator, to_tensor
from diffquant.core.results import ImageSetScores, Quality
from diffquant.core.errors import DiffquantError

logger = logging.getLogger(__name__)
CHUNK = 64  # images read from disk at a time
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception, in torch hub's cache
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def read_images(paths: list[Path]) -> list[Image.Image]:
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def chunks(paths: list[Path], size: int = CHUNK) -> Iterator[tuple[int, list[Image.Image]]]:
    """(first index, images) of consecutive chunks of `paths`."""
    for start in range(0, len(paths), size):
        yield start, read_images(paths[start:start + size])


def reference_images(folder: str | Path) -> list[Path]:
    """The image files of a folder of real images, sorted by name."""

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DiffquantError(f"--reference-images {folder} is not a folder: pass a folder of real images "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if len(paths) < 2:
        raise DiffquantError(f"--reference-images {folder} holds {len(paths)} images; FID needs at least 2")
    return paths


def inception_unavailable_reason() -> str | None:
    """Why FID cannot use its standard InceptionV3 features offline here, or None when it can."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return "torch-fidelity is not installed"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not weights.is_file():
        return f"its InceptionV3 weights are not on disk ({weights})"
    return None


class ClipImageFeatures(torch.nn.Module):
    """FID features from a CLIP image tower: images (N, 3, H, W) in [0, 1] -> projected image embeddings.

    Resized to the CLIP input size in torch (bicubic, antialiased) and normalised with the model's
    processor statistics, as its image processor does for square images."""

    def __init__(self, model, image_processor) -> None:
        super().__init__()
        self.model = model
        crop = image_processor.crop_size
        self.size = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        self.register_buffer("mean", torch.tensor(image_processor.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(image_processor.image_std).view(1, 3, 1, 1))
        self.num_features = model.config.projection_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images.float(), size=self.size, mode="bicubic", antialias=True,
                                            align_corners=False).clamp(0, 1)
        return self.model.get_image_features(pixel_values=(x - self.mean) / self.std)  # (N, projection_dim)


def load_clip(model_id: str, device: torch.device):
    """(CLIPModel, CLIPProcessor) from a local folder or a Hub id (safetensors only, no remote code)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_id, use_safetensors=True).eval().to(device)
    return model, CLIPProcessor.from_pretrained(model_id)


class Scorer:
    """Measures a run's image sets on the main process: the baseline first, then each other set.

    Args:
        out_dir: the run folder (images are read from it).
        prompts: one per image.
        clip_model: a local folder or Hub id of a CLIP model, or None (no CLIP score; FID then needs
            Inception's weights).
        reference: a folder of real images for FID, or None.
        device: where the CLIP and FID models run.
        shapes: the prompts are shapes captions (ShapeEval is scored).
        frames: frames per clip of a video model's strips (each frame is measured too), else 1.
    """

    def __init__(self, out_dir: Path, prompts: list[str], clip_model: str | None, reference: str | None,
                 device: torch.device, shapes: bool, frames: int = 1) -> None:
        self.out_dir, self.prompts, self.device, self.shapes = Path(out_dir), prompts, device, shapes
        self.frames = frames
        self.missing: list[str] = []
        self.notes: list[str] = []  # LPIPS's reason, when it is missing
        self.detections: dict[str, list] = {}  # ShapeEval detections of each set scored so far, by label
        self.clip = None
        self.fid_features: str | None = None
        self.reference_paths = reference_images(reference) if reference else None
        if clip_model is not None:
            try:
                self.clip = load_clip(clip_model, device)
            except Exception as error:  # noqa: BLE001 - offline, missing files, wrong id: several libraries' errors
                first = (str(error).strip().splitlines() or [""])[0]
                self.missing.append(f"CLIP score not computed: the CLIP model {clip_model} cannot be loaded "
                                    f"({type(error).__name__}: {first[:200]})")
        else:
            self.missing.append("CLIP score not computed: no --clip-model given (a local CLIP folder or a Hub id "
                                "such as openai/clip-vit-large-patch14)")
        self._fid_vs_baseline, self._fid_vs_real = self._fid_metrics(clip_model)

    def _fid_metrics(self, clip_model: str | None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        reason = inception_unavailable_reason()
        if reason is None:
            feature, self.fid_features = 2048, "InceptionV3 pool features (2048, torch-fidelity weights)"
        elif self.clip is not None:
            feature = ClipImageFeatures(self.clip[0], self.clip[1].image_processor).to(self.device)
            self.fid_features = (f"CLIP image embeddings of {clip_model} ({feature.num_features}), not InceptionV3: "
                                 f"{reason}")
        else:
            why = "no CLIP model is loaded for its fallback features" if clip_model is None else \
                "the --clip-model for its fallback features cannot be loaded"
            self.missing.append(f"FID not computed: {reason}, and {why}")
            return None, None

        def metric():
            # sync_on_compute=False: only the main process measures; the others must not be waited for.
            return FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=True,
                                            sync_on_compute=False).to(self.device)

        return metric(), (metric() if self.reference_paths else None)

    def _paths(self, label: str) -> list[Path]:
        from diffquant.evaluate.sharding import image_path

        return [self.out_dir / image_path(label, k) for k in range(len(self.prompts))]

    def _clip_score(self):
        if self.clip is None:
            return None
        from torchmetrics.multimodal import CLIPScore

        return CLIPScore(model_name_or_path=lambda: self.clip, sync_on_compute=False).to(self.device)

    def _scores(self, clip, fid_real, n: int) -> ImageSetScores:
        fid = None
        if fid_real is not None:
            fid = float(fid_real.compute())
            fid_real.reset()  # keeps the real images' features (reset_real_features=False)
        return ImageSetScores(n=n, clip_score=None if clip is None else float(clip.compute()), fid_real=fid,
                              n_real=None if fid_real is None else len(self.reference_paths))

    def baseline(self) -> tuple[dict | None, ImageSetScores]:
        """Read the baseline images once: FID's reference statistics, the baseline's ShapeEval accuracy (None
        for other prompts) and its own scores."""
        if self._fid_vs_real is not None:
            size = read_images(self._paths("baseline")[:1])[0].size  # real images are resized to the generated size
            for _, images in chunks(self.reference_paths):
                resized = [image.resize(size, Image.Resampling.BICUBIC) for image in images]
                self._fid_vs_real.update(to_tensor(resized).to(self.device), real=True)
        clip = self._clip_score()
        scored = []
        for start, images in chunks(self._paths("baseline")):
            tensor = to_tensor(images).to(self.device)
            if self._fid_vs_baseline is not None:
                self._fid_vs_baseline.update(tensor, real=True)
            if self._fid_vs_real is not None:
                self._fid_vs_real.update(tensor, real=False)
            if clip is not None:
                clip.update(list(_bytes(tensor)), self.prompts[start:start + len(images)])
            if self.shapes:
                from diffquant.models.shapes.shapeeval import score

                scored += [score(image, prompt) for image, prompt in zip(images, self.prompts[start:])]
        shapeeval = None
        if self.shapes:
            from diffquant.models.shapes.shapeeval import summarize

            shapeeval = summarize(scored)
            self.detections["baseline"] = [s.detection for s in scored]
        return shapeeval, self._scores(clip, self._fid_vs_real, len(self.prompts))

    def image_set(self, label: str, reference: str = "baseline",
                  scores: bool = True) -> tuple[Quality, ImageSetScores | None]:
        """Quality of an image set against the `reference` set (against the baseline: with the reference FID),
        and its own scores (CLIP score, FID against real images) unless `scores` is False."""
        quality = FidelityAccumulator(self.shapes, self.detections.get(reference), frames=self.frames)
        clip = self._clip_score() if scores else None
        fid = self._fid_vs_baseline if reference == "baseline" else None
        real = self._fid_vs_real if scores else None
        for start, images in chunks(self._paths(label)):
            references = read_images(self._paths(reference)[start:start + len(images)])
            quality.update(references, images, self.prompts[start:start + len(images)])
            tensor = to_tensor(images).to(self.device)
            if fid is not None:
                fid.update(tensor, real=False)
            if real is not None:
                real.update(tensor, real=False)
            if clip is not None:
                clip.update(list(_bytes(tensor)), self.prompts[start:start + len(images)])
        result = quality.quality()
        if self.shapes:
            self.detections[label] = quality.detections
        self.notes = sorted(quality.notes)
        if fid is not None:
            result = replace(result, fid=float(fid.compute()))
            fid.reset()
        return result, (self._scores(clip, real, len(self.prompts)) if scores else None)


def _bytes(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the uint8 pixels they were read from (what CLIP's image processor expects)."""
    return (images * 255).round().to(torch.uint8)
