"""A model card (README.md in the Hugging Face Hub's form) for every exported folder: YAML front matter (base
model, library, quantization tags), the recipe and the per-layer plan summarised (which layers stay float and
why), bits per weight and bytes, the fidelity against the fp32 images with n and the seed rule, and the snippet
that loads the format. The front matter is written by huggingface_hub's `ModelCardData`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffquant.core.artifacts import write_text
from diffquant.core.plan import FALLBACK, FLOAT, LayerPlan
from diffquant.core.provenance import describe, measured
from diffquant.core.recipes import Recipe
from diffquant.core.record import record_of
from diffquant.quantization.backends import backend_of

CARD_FILE = "README.md"
LISTED = 8  # layer names listed per reason; the rest are counted


@dataclass(frozen=True)
class Fidelity:
    """One row of the card's fidelity table: a set of images against the fp32 images of the same seeds."""

    images: str  # what drew them: "torch fake-quant", "the GGUF file in diffusers", "ONNX Runtime"
    n: int
    psnr_db: float
    psnr_p10_db: float | None
    psnr_worst_db: float | None
    ssim: float


@dataclass(frozen=True)
class CardFacts:
    base_model: str
    denoiser: str  # the diffusers class
    recipe: Recipe
    format: str  # "gguf", "onnx" or "onnx-pipeline" (Optimum's folder layout)
    file_name: str  # the exported file, relative to the folder
    file_bytes: int
    fp32_bytes: int | None = None
    bits_per_weight: float | None = None  # of the quantized layers
    plan: LayerPlan | None = None
    fidelity: tuple[Fidelity, ...] = ()
    settings: dict = field(default_factory=dict)  # seed, steps, guidance of the fidelity images
    call: dict = field(default_factory=dict)  # pipeline call arguments a fixed-shape graph needs (onnx-pipeline)


def _snippet(facts: CardFacts) -> str:
    attribute = "unet" if facts.denoiser == "UNet2DConditionModel" else "transformer"
    if facts.format == "gguf":
        return (f"```python\nimport torch\nfrom diffusers import DiffusionPipeline, GGUFQuantizationConfig, "
                f"{facts.denoiser}\n\n"
                f"{attribute} = {facts.denoiser}.from_single_file(\n"
                f"    \"{facts.file_name}\", config=\"{facts.base_model}\", subfolder=\"{attribute}\",\n"
                "    quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16))\n"
                f"pipe = DiffusionPipeline.from_pretrained(\"{facts.base_model}\", {attribute}={attribute})\n```\n\n"
                "ComfyUI: put the file in `models/unet` and load it with ComfyUI-GGUF's Unet Loader (GGUF); its "
                "keys are the original checkpoint's.")
    if facts.format == "onnx-pipeline":
        call = "".join(f", {k}={v!r}" for k, v in facts.call.items() if k != "batch")
        note = (f"\n\nThe {attribute} graph has fixed shapes: call the pipeline with{call[1:]}"
                + (" and one prompt at a time." if facts.call.get("batch") == 1 else ".") if facts.call else "")
        return ("```python\nfrom optimum.onnxruntime import ORTDiffusionPipeline\n\n"
                "pipe = ORTDiffusionPipeline.from_pretrained(\".\")  # this folder; needs optimum-onnx[onnxruntime]\n"
                f"image = pipe(\"a photo of a cat\"{call}).images[0]\n```" + note)
    return ("```python\nimport onnxruntime as ort\n\n"
            f"session = ort.InferenceSession(\"{facts.file_name}\", providers=[\"CPUExecutionProvider\"])\n```\n\n"
            "In a pipeline without diffquant: `diffquant export --pipeline` writes the folder Optimum's "
            "`ORTDiffusionPipeline.from_pretrained` loads.")


def _plan_lines(plan: LayerPlan | None) -> list[str]:
    if plan is None:
        return ["The per-layer plan was not recorded (a model saved before diffquant kept it)."]
    counts = plan.counts()
    lines = [f"{counts['quantize']} layers take the recipe's weights, {counts[FALLBACK]} its fallback, "
             f"{counts[FLOAT]} stay float.", ""]
    for action, title in ((FLOAT, "float"), (FALLBACK, "fallback")):
        for reason, names in plan.reasons(action).items():
            shown = ", ".join(f"`{n}`" for n in names[:LISTED]) + (f" and {len(names) - LISTED} more"
                                                                    if len(names) > LISTED else "")
            lines.append(f"- {title}, {reason} ({len(names)}): {shown}")
    return lines


def _fidelity_lines(facts: CardFacts) -> list[str]:
    if not facts.fidelity:
        return ["Not measured by the command that wrote this folder: `diffquant run --recipes "
                f"{facts.recipe.name}` draws the fp32 and quantized images and measures them."]
    settings = facts.settings
    lines = [f"Against the fp32 model's images of the same prompts and seeds (image k uses seed "
             f"{settings.get('seed', '?')} + k; {settings.get('steps', '?')} steps, guidance "
             f"{settings.get('guidance', '?')}):", "",
             "| images | n | PSNR mean | p10 | worst | SSIM |", "|---|---|---|---|---|---|"]

    def db(value) -> str:
        return "-" if value is None else f"{value:.2f} dB"

    lines += [f"| {f.images} | {f.n} | {db(f.psnr_db)} | {db(f.psnr_p10_db)} | {db(f.psnr_worst_db)} | {f.ssim:.4f} |"
              for f in facts.fidelity]
    return lines


def _text(text: str) -> str:
    """User text (a recipe's description) as Markdown text: no raw HTML tags reach the card."""
    return text.replace("<", "&lt;").replace(">", "&gt;")


def render(facts: CardFacts) -> str:
    from huggingface_hub import ModelCardData

    tags = ["diffquant", "quantized", facts.format, facts.recipe.name, facts.denoiser]
    if facts.format == "gguf":
        tags.append({"int4": "gguf-q4_0", "uint4": "gguf-q4_1", "int8": "gguf-q8_0"}.get(facts.recipe.weight.dtype,
                                                                                       "gguf"))
    library = {"gguf": "diffusers", "onnx-pipeline": "optimum"}.get(facts.format, "onnx")
    data = ModelCardData(base_model=facts.base_model if "/" in facts.base_model else None,
                         library_name=library, tags=tags)
    size = f"{facts.file_bytes / 1e6:.2f} MB"
    if facts.fp32_bytes:
        size += f" ({facts.file_bytes / facts.fp32_bytes:.0%} of the fp32 denoiser's {facts.fp32_bytes / 1e6:.2f} MB)"
    bits = "-" if facts.bits_per_weight is None else f"{facts.bits_per_weight:.2f}"
    body = [f"# {facts.denoiser} of {facts.base_model}, quantized by diffquant ({facts.recipe.name})", "",
            f"`{facts.file_name}`: {size}; {bits} bits per weight over the layers the recipe quantizes "
            "(codes and scales).", "",
            "## Recipe", "", f"`{facts.recipe.name}`: {_text(facts.recipe.description)}", "",
            "## Layers", "", *_plan_lines(facts.plan), "",
            "## Fidelity", "", *_fidelity_lines(facts), "",
            "## Load it", "", _snippet(facts), "",
            "## Made with", "", describe(measured()) + "."]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"


def write_model_card(folder: str | Path, facts: CardFacts) -> Path:
    """Write `folder/README.md` (atomically) and return its path."""
    return write_text(Path(folder) / CARD_FILE, render(facts))


def facts_for(module, base_model: str, format: str, file_name: str, file_bytes: int,
              fidelity: tuple[Fidelity, ...] = (), settings: dict | None = None) -> CardFacts:
    """The card's facts of a quantized denoiser module (its record, its backend's storage), for a file just written."""
    record = record_of(module)
    storage = backend_of(module).storage(module)
    fp32 = sum(p.numel() for p in module.parameters()) * 4  # parameters as fp32 (codes count one per weight)
    return CardFacts(base_model=base_model, denoiser=type(module).__name__, recipe=record.recipe, format=format,
                     file_name=file_name, file_bytes=file_bytes, fp32_bytes=fp32,
                     bits_per_weight=storage.bits_per_weight, plan=record.plan, fidelity=fidelity,
                     settings=settings or {})


def base_model_of(pipe_or_module) -> str:
    """The pipeline's Hub id or folder name (what `from_pretrained` was given); "unknown" for a bare module."""
    name = getattr(pipe_or_module, "name_or_path", None)
    return str(name) if name else "unknown"
