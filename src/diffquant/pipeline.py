"""Stage 1, load: a diffusers pipeline from the embedded shapes-sd, a Hub id or a local folder."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from .errors import DiffquantError

logger = logging.getLogger(__name__)

SUPPORTED_DENOISERS = ("UNet2DConditionModel",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def shapes_sd_path() -> Path:
    """The folder of the embedded shapes-sd weights shipped inside the package."""
    from .shapes.model import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "model_index.json").is_file():
        raise DiffquantError(f"the embedded shapes-sd weights are missing from {WEIGHTS_DIR}: reinstall diffquant")
    return WEIGHTS_DIR


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


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' -> fp16 on a GPU, fp32 on CPU. fp16 on CPU is refused (missing or very slow kernels)."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        resolved = torch.float16 if device.type == "cuda" else torch.float32
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
        if not index.is_file():
            raise DiffquantError(f"{path} has no model_index.json: pass a diffusers pipeline folder (save_pretrained layout)")
        try:
            data = json.loads(index.read_text())
        except ValueError as error:
            raise DiffquantError(f"{index} is not valid JSON ({error}): re-save the pipeline with save_pretrained") from None
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


def check_supported(index: dict, model: str) -> None:
    """Refuse pipelines whose denoiser is not a UNet2DConditionModel, naming what is supported."""
    pipeline_class = index.get("_class_name", "?")
    if "transformer" in index:
        denoiser = index["transformer"][1] if isinstance(index["transformer"], list) else "a transformer"
        raise DiffquantError(f"{model} is a {pipeline_class} with a {denoiser} (DiT) denoiser: not yet supported; "
                             f"diffquant quantizes {', '.join(SUPPORTED_DENOISERS)} pipelines (SD 1.x/2.x, SDXL)")
    unet = index.get("unet")
    unet_class = unet[1] if isinstance(unet, list) and len(unet) == 2 else None
    if unet_class not in SUPPORTED_DENOISERS:
        raise DiffquantError(f"{model} is a {pipeline_class} whose denoiser is {unet_class or 'missing'}: diffquant "
                             f"supports {', '.join(SUPPORTED_DENOISERS)} (SD 1.x/2.x, SDXL)")
    # The index may name a unet that its pipeline class never takes (a FluxPipeline with a unet entry):
    # diffusers would fail deep inside from_pretrained.
    import inspect

    import diffusers

    cls = getattr(diffusers, pipeline_class, None) if isinstance(pipeline_class, str) else None
    if cls is None:
        raise DiffquantError(f"{model} names the pipeline class {pipeline_class!r}, which is not one of diffusers' "
                             "pipelines: diffquant loads diffusers' own pipelines only (remote code is never run)")
    if "unet" not in inspect.signature(cls.__init__).parameters:
        raise DiffquantError(f"{model} is a {pipeline_class}, which takes no UNet (its model_index.json lists one "
                             f"anyway): diffquant supports pipelines with a {', '.join(SUPPORTED_DENOISERS)} "
                             "(SD 1.x/2.x, SDXL)")


def load_pipeline(model: str | Path | None = None, device: str = "auto", dtype: str | torch.dtype = "auto"):
    """Load a text-to-image pipeline whose denoiser is a UNet2DConditionModel.

    Args:
        model: None for the embedded shapes-sd, a Hugging Face Hub id, or a local diffusers folder.
        device: 'auto' (GPU when available), 'cpu' or 'cuda[:N]'.
        dtype: 'auto' (fp16 on GPU, fp32 on CPU), 'fp32', 'fp16' or 'bf16'.

    Returns:
        The diffusers pipeline on `device`, safety checker off, progress bars off (diffquant shows its own).
    """
    from diffusers import DiffusionPipeline

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    name = str(shapes_sd_path() if model is None else model)
    index, where = _model_index(name)
    check_supported(index, name)
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    try:
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
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s (%s) on %s as %s", name, type(pipe).__name__, torch_device, torch_dtype)
    return pipe.to(torch_device)


def is_shapes_sd(pipe) -> bool:
    """True when the pipeline speaks the shapes grammar (its tokenizer's vocabulary is the grammar's words)."""
    from .shapes.model import grammar_words

    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return False
    vocab = tokenizer.get_vocab()
    return len(vocab) < 200 and all(f"{w}</w>" in vocab for w in grammar_words())
