"""Stage 1, load: a diffusers pipeline (UNet, SD3 or FLUX.1) from an embedded shapes model, a Hub id or a local
folder, with the checks that turn what diffusers would fail on deep inside (or do silently wrong) into one line."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from diffquant.core.artifacts import read_json
from diffquant.core.errors import DiffquantError
from diffquant.core.progress import is_quiet

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def shapes_sd_path() -> Path:
    """The folder of the embedded shapes-sd weights shipped inside the package."""
    return _embedded(None)


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA/ROCm (both appear as torch.cuda) when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DiffquantError(f"device {device!r} asked but no CUDA/ROCm GPU is visible to torch: use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DiffquantError(f"unknown device {device!r}: use auto, cpu or cuda[:N]") from None


def resolve_dtype(dtype: str | torch.dtype, device: torch.device,
                  gpu_default: torch.dtype = torch.float16) -> torch.dtype:
    """'auto' -> `gpu_default` on a GPU (the model card's dtype), fp32 on CPU. fp16 on CPU is refused (missing
    or very slow kernels)."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        resolved = gpu_default if device.type == "cuda" else torch.float32
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise DiffquantError(f"unknown dtype {dtype!r}: use one of auto, fp32, fp16, bf16")
    if resolved == torch.float16 and device.type == "cpu":
        raise DiffquantError("fp16 is not supported on CPU (missing or very slow kernels): use --dtype fp32, or a GPU")
    return resolved


def _model_index(model: str) -> tuple[dict, str]:
    """Read model_index.json of a local folder or a Hub repo; returns (config, 'local'|'hub')."""
    path = Path(model).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        data = read_json(index, f"{path} has no model_index.json: pass a diffusers pipeline folder (save_pretrained "
                         "layout)", fix="re-save the pipeline with save_pretrained")
        if not isinstance(data, dict):
            raise DiffquantError(f"{index} holds a {type(data).__name__}, not a pipeline description: re-save the "
                                 "pipeline with save_pretrained")
        return data, "local"
    if path.exists():
        raise DiffquantError(f"{path} is a file: pass a diffusers pipeline folder or a Hugging Face Hub id")
    if not _HUB_ID.match(model):
        raise DiffquantError(f"model path {model} does not exist: pass an existing diffusers folder or a Hub id like "
                             "stable-diffusion-v1-5/stable-diffusion-v1-5")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(model, "model_index.json")).read_text()), "hub"
    except GatedRepoError:
        raise DiffquantError(f"{model} is gated on the Hugging Face Hub: accept its license on its page and set "
                             "HF_TOKEN (or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise DiffquantError(f"{model} was not found on the Hugging Face Hub and is not a local folder: check the id "
                             "or the path") from None
    except (OSError, ValueError) as error:  # offline, DNS failure, HF_HUB_OFFLINE without a cached copy
        raise DiffquantError(
            f"could not reach the Hugging Face Hub for {model} ({type(error).__name__}): download it where there is "
            f"network (`hf download {model} --local-dir DIR`) and pass --model DIR") from None


def _entry(index: dict, name: str) -> str | None:
    """The class a model_index.json entry names (["library", "Class"]), or None when absent or null."""
    value = index.get(name)
    return value[1] if isinstance(value, list) and len(value) == 2 and isinstance(value[1], str) else None


def check_supported(index: dict, model: str) -> str:
    """Refuse pipelines whose denoiser is not one of `denoisers.supported_classes()`, naming what is supported.

    Returns:
        The pipeline attribute that holds the denoiser ("unet" or "transformer").
    """
    import inspect

    import diffusers

    from diffquant.models.denoisers import supported_classes
    from diffquant.models.profiles import supported_models

    pipeline_class = index.get("_class_name", "?")
    attribute = next((name for name in ("transformer", "unet") if name in index), None)
    denoiser = _entry(index, attribute) if attribute else None
    if denoiser not in supported_classes():
        kind = " (DiT)" if attribute == "transformer" else ""
        raise DiffquantError(f"{model} is a {pipeline_class} whose denoiser is {denoiser or 'missing'}{kind}: not "
                             f"supported; diffquant supports {supported_models()}")
    # The index may name a denoiser that its pipeline class never takes (a FluxPipeline with a unet entry):
    # diffusers would fail deep inside from_pretrained.
    cls = getattr(diffusers, pipeline_class, None) if isinstance(pipeline_class, str) else None
    if cls is None:
        raise DiffquantError(f"{model} names the pipeline class {pipeline_class!r}, which is not one of diffusers' "
                             "pipelines: diffquant loads diffusers' own pipelines only (remote code is never run)")
    if attribute not in inspect.signature(cls.__init__).parameters:
        what = "UNet" if attribute == "unet" else "transformer"
        raise DiffquantError(f"{model} is a {pipeline_class}, which takes no {what} (its model_index.json lists one "
                             f"anyway): diffquant supports {supported_models()}")
    return attribute


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def check_components(index: dict, model: str, path: Path | None, no_t5: bool) -> None:
    """Refuse, before loading, what diffusers would fail on deep inside or load silently wrong: a FLUX.1
    without its T5, no_t5 on a pipeline without SD3's T5, and (in a local folder) a component folder that is
    missing or holds pickle weights only (.bin/.pt/.ckpt: loading pickle can run code)."""
    pipeline_class = index.get("_class_name", "?")
    if no_t5 and "text_encoder_3" not in index:
        raise DiffquantError(f"no_t5 drops the T5 text encoder of SD3/SD3.5 (text_encoder_3), which {model} (a "
                             f"{pipeline_class}) does not have: leave no_t5 off")
    if _entry(index, "transformer") == "FluxTransformer2DModel" and _entry(index, "text_encoder_2") is None:
        raise DiffquantError(f"{model} is a FLUX.1 pipeline without its T5 text encoder (text_encoder_2 is missing "
                             "from model_index.json): FLUX.1 cannot run without it; use the complete model folder")
    if path is None:
        return
    for name in index:
        if name.startswith("_") or _entry(index, name) is None or (no_t5 and name in ("text_encoder_3", "tokenizer_3")):
            continue
        folder = path / name
        if not folder.is_dir():
            hint = ""
            if name == "text_encoder_2" and _entry(index, "transformer") == "FluxTransformer2DModel":
                hint = "FLUX.1 cannot run without its T5 text encoder; "
            elif name in ("text_encoder_3", "tokenizer_3"):
                hint = "load SD3 without its T5 with no_t5 (--no-t5), or "
            raise DiffquantError(f"{model} lists {name} in model_index.json but has no {name} folder: {hint}"
                                 "re-download or re-save the whole pipeline")
        weights = [f.suffix for f in folder.iterdir() if f.suffix in _WEIGHT_SUFFIXES]
        if weights and ".safetensors" not in weights:
            raise DiffquantError(f"{folder} holds pickle weights only ({', '.join(sorted(set(weights)))}): diffquant "
                                 "loads safetensors only (pickle can run code); convert it with diffusers' "
                                 "save_pretrained(..., safe_serialization=True) where you trust the file")


def check_text_widths(pipe, model: str) -> None:
    """SD3: the pipeline pads the two CLIP encoders' concatenated features up to the joint width with F.pad,
    which silently crops them when the widths sum past it; and its T5 features must have that width."""
    from diffquant.models.denoisers import denoiser_of

    family = denoiser_of(pipe)
    if family.module_class != "SD3Transformer2DModel":
        return
    joint = family.config.joint_attention_dim
    clip = [getattr(pipe, name).config.hidden_size for name in ("text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None]
    if sum(clip) > joint:
        raise DiffquantError(f"{model}: its CLIP text encoders' widths {' + '.join(map(str, clip))} = {sum(clip)} "
                             f"exceed the transformer's joint_attention_dim {joint}, so the pipeline would silently "
                             "crop the text features: use text encoders that match the transformer")
    t5 = getattr(pipe, "text_encoder_3", None)
    if t5 is not None and t5.config.d_model != joint:
        raise DiffquantError(f"{model}: its T5 width {t5.config.d_model} is not the transformer's joint_attention_dim "
                             f"{joint}: use the T5 that belongs to this transformer (or drop it with no_t5)")


@contextmanager
def _library_bars_off(off: bool) -> Iterator[None]:
    """diffusers' and transformers' loading bars off while `off` (diffquant's quiet mode), restored after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [lib for lib in (diffusers_logging, transformers_logging) if off and lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()


def _embedded(model: str | Path | None) -> str | Path | None:
    """An embedded model's folder for None (shapes-sd) or its name, else `model` unchanged."""
    from diffquant.models.profiles import embedded_models

    if model is None or str(model) in embedded_models():
        name = "shapes-sd" if model is None else str(model)
        folder = embedded_models()[name]
        if not (folder / "model_index.json").is_file():
            raise DiffquantError(f"the embedded {name} weights are missing from {folder}: reinstall diffquant")
        return folder
    return model


def load_pipeline(model: str | Path | None = None, device: str = "auto", dtype: str | torch.dtype = "auto",
                  no_t5: bool = False):
    """Load a text-to-image pipeline whose denoiser diffquant supports (see `denoisers.supported_classes`):
    SD 1.x/2.x and SDXL (UNet), SD3/SD3.5 (MMDiT) and FLUX.1 (Flux transformer).

    Args:
        model: None for the embedded shapes-sd; an embedded model's name ("shapes-sd", "shapes-sd3"; these
            names win over a folder of the same name); a Hugging Face Hub id; or a local diffusers folder.
        device: 'auto' (GPU when available), 'cpu' or 'cuda[:N]'.
        dtype: 'auto' (on a GPU what the model card uses: bf16 for SD3/FLUX.1, fp16 for UNet models; fp32
            on CPU), 'fp32', 'fp16' or 'bf16'.
        no_t5: SD3/SD3.5 only: load without the T5 text encoder (`text_encoder_3=None, tokenizer_3=None`, as
            diffusers documents), saving its memory (4.7B parameters, about 9.5 GB in bf16) at some cost in
            prompt adherence.

    Returns:
        The diffusers pipeline on `device`, safety checker off, progress bars off (diffquant shows its own).
    """
    from diffusers import DiffusionPipeline

    from diffquant.models.profiles import class_profile, embedded_profile

    torch_device = resolve_device(device)
    name = str(_embedded(model))
    index, where = _model_index(name)
    attribute = check_supported(index, name)
    check_components(index, name, Path(name).expanduser() if where == "local" else None, no_t5)
    profile = embedded_profile(name) or class_profile(index["_class_name"], {"_class_name": _entry(index, attribute)})
    torch_dtype = resolve_dtype(dtype, torch_device, gpu_default=_DTYPES[profile.gpu_dtype])
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    if no_t5:
        extra |= {"text_encoder_3": None, "tokenizer_3": None}
    try:
        with _library_bars_off(is_quiet()):
            pipe = DiffusionPipeline.from_pretrained(
                name, torch_dtype=torch_dtype, use_safetensors=True, trust_remote_code=False, **extra)
    except OSError as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "safetensors" in message.lower() and where == "hub":
            raise DiffquantError(f"{name} has no safetensors weights: diffquant loads safetensors only") from None
        raise DiffquantError(f"could not load {name}: {message}") from None
    except Exception as error:
        if type(error).__name__ == "SafetensorError":
            raise DiffquantError(f"corrupt weights in {name} ({error}): re-download or re-save the model") from None
        raise
    check_text_widths(pipe, name)
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s (%s) on %s as %s", name, type(pipe).__name__, torch_device, torch_dtype)
    return pipe.to(torch_device)
