"""What a run produced: frozen, versioned dataclasses written to results.json and read back by the CLI,
the report and the tests (`RunResult.load(path)`), instead of dicts probed with `.get` chains."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from diffquant.core.errors import DiffquantError

RESULTS_VERSION = 5  # 5: per-frame fidelity of clips (Quality.frames); 4: per-image PSNR/SSIM/LPIPS, p10 and worst; 3: n, CLIP score, FID, the evaluation's
# processes; 2: typed results, the denoiser named
READABLE_VERSIONS = (2, 3, 4, 5)  # older files load with the new fields empty
WORST_SHOWN = 3  # the worst images of each set that the report shows beside their reference


@dataclass(frozen=True)
class PerImage:
    """Each image's fidelity to its reference image, in image order (image k: prompt k, seed + k)."""

    psnr_db: tuple[float, ...]
    ssim: tuple[float, ...]
    lpips: tuple[float, ...] | None = None

    def worst(self, k: int = WORST_SHOWN) -> tuple[int, ...]:
        """Indices of the `k` images of lowest PSNR, worst first (ties: the lower index)."""
        return tuple(sorted(range(len(self.psnr_db)), key=lambda i: (self.psnr_db[i], i))[:k])


@dataclass(frozen=True)
class Quality:
    """Mean image metrics of a set of images against a reference set (same prompts and seeds)."""

    psnr_db: float
    ssim: float
    lpips: float | None = None
    shapeeval: dict | None = None  # per-attribute accuracy vs the captions (shapes models only)
    shapeeval_agreement: dict | None = None  # share of images whose detections equal the reference's
    n: int | None = None  # images measured
    fid: float | None = None  # FID of the images against the reference set's (SVDQuant's "reference FID")
    psnr_p10_db: float | None = None  # 10th percentile of the images' PSNR (the steadier tail)
    psnr_worst_db: float | None = None
    ssim_p10: float | None = None
    ssim_worst: float | None = None
    per_image: PerImage | None = None
    frames: FrameQuality | None = None  # clips (video models): every frame of every clip measured on its own

    @classmethod
    def of_images(cls, psnr: list[float], ssim: list[float], lpips: list[float] | None = None,
                  shapeeval: dict | None = None, agreement: dict | None = None) -> Quality:
        """Means, 10th percentiles and worst values of per-image metrics, the values kept."""
        import numpy as np

        return cls(psnr_db=float(np.mean(psnr)), ssim=float(np.mean(ssim)),
                   lpips=None if lpips is None else float(np.mean(lpips)), shapeeval=shapeeval,
                   shapeeval_agreement=agreement, n=len(psnr), psnr_p10_db=float(np.percentile(psnr, 10)),
                   psnr_worst_db=float(min(psnr)), ssim_p10=float(np.percentile(ssim, 10)), ssim_worst=float(min(ssim)),
                   per_image=PerImage(tuple(psnr), tuple(ssim), None if lpips is None else tuple(lpips)))

    @classmethod
    def from_dict(cls, data: dict) -> Quality:
        per_image = data.get("per_image")
        if per_image is not None:
            per_image = PerImage(tuple(per_image["psnr_db"]), tuple(per_image["ssim"]),
                                 None if per_image.get("lpips") is None else tuple(per_image["lpips"]))
        frames = data.get("frames")
        return cls(**{**data, "per_image": per_image,
                      "frames": None if frames is None else FrameQuality.from_dict(frames)})


@dataclass(frozen=True)
class FrameQuality:
    """Fidelity of clips frame by frame: over every frame of every clip, the mean and worst PSNR/SSIM, and the mean
    PSNR of each frame index (where in the clip quantization error grows)."""

    n_frames: int  # frames per clip
    psnr_db: float
    psnr_worst_db: float
    ssim: float
    ssim_worst: float
    psnr_db_by_frame: tuple[float, ...]

    @classmethod
    def of_clips(cls, psnr: list[list[float]], ssim: list[list[float]]) -> FrameQuality:
        import numpy as np

        p, s = np.asarray(psnr, dtype=float), np.asarray(ssim, dtype=float)  # (clips, frames)
        return cls(n_frames=p.shape[1], psnr_db=float(p.mean()), psnr_worst_db=float(p.min()), ssim=float(s.mean()),
                   ssim_worst=float(s.min()), psnr_db_by_frame=tuple(float(v) for v in p.mean(axis=0)))

    @classmethod
    def from_dict(cls, data: dict) -> FrameQuality:
        return cls(**{**data, "psnr_db_by_frame": tuple(data["psnr_db_by_frame"])})


@dataclass(frozen=True)
class ImageSetScores:
    """Metrics of one image set on its own: CLIP score against its prompts, FID against real images."""

    n: int
    clip_score: float | None = None  # torchmetrics CLIPScore: 100 * cosine(image, prompt), mean over images
    fid_real: float | None = None  # FID against --reference-images
    n_real: int | None = None


@dataclass(frozen=True)
class Throughput:
    """What one process generated for one image set."""

    process: int
    images: str  # the image set's label
    generated: int  # images made by this process (images already on disk are not counted)
    skipped: int  # images found on disk (a resumed run)
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Evaluation:
    """How the images were made and measured: prompt source, processes, which model metrics ran."""

    prompt_source: str
    n: int
    processes: int
    batch_size: int
    fid_features: str | None = None  # the feature extractor FID used, in words
    clip_model: str | None = None
    reference_images: str | None = None
    missing: tuple[str, ...] = ()  # one line per metric not computed, saying why
    calibration_overlap: tuple[str, ...] = ()  # evaluation prompts that are also calibration prompts
    throughput: tuple[Throughput, ...] = ()


@dataclass(frozen=True)
class OrtImages:
    """The quantized denoiser's ONNX export run by ONNX Runtime inside the pipeline."""

    images: tuple[str, ...]
    vs_torch: Quality  # against the torch fake-quant images: what the export changes
    vs_baseline: Quality


@dataclass(frozen=True)
class RecipeResult:
    recipe: dict
    images: tuple[str, ...]
    quality: Quality
    sqnr_db: float  # denoiser output vs fp32 over recorded inputs of the evaluation trajectories
    layers: dict  # {"n_quantized", "n_float", "quantized": [...], "float": [...]}
    notes: tuple[str, ...] = ()
    onnx: dict | None = None  # OnnxExport.to_dict(), path relative to the run folder
    ort: OrtImages | None = None
    pipeline: dict | None = None  # the deployable ONNX pipeline folder, when asked
    scores: ImageSetScores | None = None
    gguf: dict | None = None  # GgufExport.to_dict() of a "gguf" recipe, path relative to the run folder
    gguf_images: OrtImages | None = None  # its images, the GGUF file loaded by diffusers' GGUF loader


@dataclass(frozen=True)
class RunResult:
    out_dir: str
    status: str  # running | complete | interrupted | failed
    model: str
    denoiser: str  # the diffusers class of the denoiser
    prompts: tuple[str, ...]
    settings: dict  # seed, steps, guidance
    config: dict  # RunConfig.to_dict()
    versions: dict
    denoiser_fp32_bytes: int
    baseline_images: tuple[str, ...] = ()
    baseline_shapeeval: dict | None = None
    recipes: dict[str, RecipeResult] = field(default_factory=dict)
    calibration: dict | None = None
    timings: dict = field(default_factory=dict)
    grid: str | None = None
    error: str | None = None
    baseline_scores: ImageSetScores | None = None
    evaluation: Evaluation | None = None

    def with_recipe(self, name: str, result: RecipeResult) -> RunResult:
        return replace(self, recipes={**self.recipes, name: result})

    def to_dict(self) -> dict:
        return {"type": "RunResult", "version": RESULTS_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> RunResult:
        if not isinstance(data, dict) or data.get("type") != "RunResult":
            raise DiffquantError("not a diffquant results file (no \"type\": \"RunResult\"): pass the results.json "
                                 "a run wrote")
        if data.get("version") not in READABLE_VERSIONS:
            raise DiffquantError(f"results version {data.get('version')!r} is not the {RESULTS_VERSION} this "
                                 "diffquant reads: rerun with this version")
        values = {k: v for k, v in data.items() if k not in ("type", "version")}
        recipes = {}
        for name, r in values.pop("recipes").items():
            ort = r.pop("ort")
            if ort is not None:
                ort = OrtImages(tuple(ort["images"]), Quality.from_dict(ort["vs_torch"]),
                                Quality.from_dict(ort["vs_baseline"]))
            scores = r.pop("scores", None)
            gguf_images = r.pop("gguf_images", None)
            if gguf_images is not None:
                gguf_images = OrtImages(tuple(gguf_images["images"]), Quality.from_dict(gguf_images["vs_torch"]),
                                        Quality.from_dict(gguf_images["vs_baseline"]))
            recipes[name] = RecipeResult(**{**r, "images": tuple(r["images"]), "quality": Quality.from_dict(r["quality"]),
                                            "notes": tuple(r["notes"]), "ort": ort, "gguf_images": gguf_images,
                                            "scores": None if scores is None else ImageSetScores(**scores)})
        baseline_scores = values.pop("baseline_scores", None)
        evaluation = values.pop("evaluation", None)
        if evaluation is not None:
            evaluation = Evaluation(**{**evaluation, "missing": tuple(evaluation["missing"]),
                                       "calibration_overlap": tuple(evaluation["calibration_overlap"]),
                                       "throughput": tuple(Throughput(**t) for t in evaluation["throughput"])})
        return cls(**{**values, "prompts": tuple(values["prompts"]), "baseline_images": tuple(values["baseline_images"]),
                      "recipes": recipes, "evaluation": evaluation,
                      "baseline_scores": None if baseline_scores is None else ImageSetScores(**baseline_scores)})

    @classmethod
    def load(cls, path: str | Path) -> RunResult:
        """Read a results.json (or the run folder holding it)."""
        path = Path(path)
        path = path / "results.json" if path.is_dir() else path
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise DiffquantError(f"{path} does not exist: pass a run folder or its results.json") from None
