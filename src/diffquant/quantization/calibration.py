"""Stage 2, calibrate: run the real pipeline on calibration prompts and record its denoiser's inputs (a
UNet's, an SD3 MMDiT's or a FLUX.1 transformer's) at the timesteps it really sees, as Quark's calibration data:
with classifier-free guidance each record's batch holds both halves, and FLUX.1-dev's records carry its
distilled `guidance` input.

A denoiser's inputs are noisy latents, timesteps and text embeddings that change along the denoising
trajectory, so calibration captures them from real generation (as Quark's diffusers example,
ModelOpt and Q-Diffusion do) instead of feeding raw captions or images to the quantizer.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffquant.models.denoisers import Denoiser, denoiser_for, denoiser_of
from diffquant.core.errors import DiffquantError
from diffquant.models.generation import default_settings, generate
from diffquant.core.config import as_prompt_list, check_settings
from diffquant.models.profiles import profile_of

logger = logging.getLogger(__name__)
MEMORY_LIMIT_BYTES = 2 * 2**30  # captures beyond this are spilled to a temporary folder
RANDOM_CALIBRATION = "random"
CALIBRATION_SEED = 31_337  # shapes-sd calibration captions; evaluation captions use other seeds


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration data is captured.

    size: calibration prompts (the peers use 32-128; 64 is the default as a middle ground that fits a
        CPU budget); steps: denoising steps of the capture run (None: the generation default);
    timesteps: how many of those steps are kept, spread uniformly over the trajectory (None: all);
    guidance: None for the model default; seed: the first prompt's seed; height, width: image size
    (None: the model's default), which sets the number of image tokens a DiT sees; frames: a video model's
    frames per clip (None: its profile's).
    """

    size: int = 64
    steps: int | None = None
    timesteps: int | None = 8
    guidance: float | None = None
    seed: int = 10_000
    batch_size: int = 8
    height: int | None = None
    width: int | None = None
    frames: int | None = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise DiffquantError(f"calibration size must be at least 1, got {self.size}")
        if self.timesteps is not None and self.timesteps < 1:
            raise DiffquantError(f"calibration timesteps must be at least 1 (or None for all), got {self.timesteps}")


def kept_step_indices(steps: int, keep: int | None) -> list[int]:
    """Indices of the denoising steps kept: all, or `keep` spread uniformly from first to last."""
    if keep is None or keep >= steps:
        return list(range(steps))
    return sorted({int(round(i)) for i in np.linspace(0, steps - 1, keep)})


class CalibrationSet(Sequence):
    """Denoiser forward kwargs dicts, in memory or spilled to a temporary folder (deleted with the set).

    Quark's `quantize_model` iterates it and calls `denoiser(**item)` for each item.
    """

    def __init__(self, timestep_key: str = "timestep") -> None:
        self._items: list[dict | Path] = []
        self._bytes = 0
        self._spill: Path | None = None
        self.timestep_key = timestep_key
        self.timesteps: list[float] = []  # each record's timestep (UNet: an integer; FLUX.1: a sigma in [0, 1])
        self.description: dict = {}  # where the data came from, set by `calibrate` (written to results.json)
        self.prompts: list[str] = []  # the calibration prompts, set by `calibrate` (none for random inputs)

    def append(self, item: dict) -> None:
        self.timesteps.append(_number(item[self.timestep_key]))
        size = sum(t.numel() * t.element_size() for t in _tensors(item))
        if self._spill is None and self._bytes + size > MEMORY_LIMIT_BYTES:
            self._spill = Path(tempfile.mkdtemp(prefix="diffquant-calib-"))
            logger.info("calibration data beyond %.1f GB: spilling to %s", MEMORY_LIMIT_BYTES / 2**30, self._spill)
        if self._spill is not None:
            path = self._spill / f"{len(self._items):06d}.pt"
            torch.save(item, path)
            self._items.append(path)
        else:
            self._items.append(item)
        self._bytes += size

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        item = self._items[index]
        return torch.load(item, weights_only=True) if isinstance(item, Path) else item

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def __del__(self) -> None:
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)


def _number(timestep) -> float | int:
    """A record's timestep as a number: an int when it is whole (UNet schedules), else a float."""
    value = float(torch.as_tensor(timestep).reshape(-1)[0])
    return int(value) if value.is_integer() else value


def _tensors(item: dict) -> Iterator[torch.Tensor]:
    for value in item.values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            yield from _tensors(value)
        elif isinstance(value, (list, tuple)):  # Z-Image's per-sample caption features
            yield from _tensors(dict(enumerate(value)))


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


@contextmanager
def recording_denoiser_inputs(pipe, steps: int, timesteps: int | None = None) -> Iterator[CalibrationSet]:
    """While active, every call of the pipeline's denoiser at the kept steps (of `steps`-step generations) is
    recorded whole into the yielded set, as the forward kwargs its family keeps (`Denoiser.capture_keys`):
    with classifier-free guidance a call's batch holds the unconditional and the conditional halves."""
    family = denoiser_of(pipe)
    key = family.timestep_key
    kept = set(kept_step_indices(steps, timesteps))
    captured = CalibrationSet(key)
    # Calls are kept by timestep value, not by call count, so batching and pipelines that call the denoiser
    # twice per step agree. The n-th distinct value seen is step n: no need to recompute each pipeline's
    # schedule (SD3/FLUX.1 shift their sigmas, FLUX.1 by the image size). Schedules only decrease, so a value
    # seen before (after another one) means a new generation started.
    seen: dict[float, int] = {}
    last: list[float | None] = [None]

    def hook(module, args, kwargs):
        record = family.record(args, kwargs)
        timestep = torch.as_tensor(record[key])
        value = float(timestep.reshape(-1)[0])
        if value != last[0] and value in seen:
            seen.clear()
        last[0] = value
        if seen.setdefault(value, len(seen)) not in kept:
            return
        item = {k: _detach(v) for k, v in record.items()}
        if timestep.dim() == 0:  # UNet pipelines pass one scalar timestep for the whole batch
            item[key] = timestep.reshape(1).expand(family.batch_size(item)).clone()
        captured.append(item)

    handle = family.module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def capture_denoiser_inputs(pipe, prompts: list[str],
                            config: CalibrationConfig = CalibrationConfig()) -> CalibrationSet:
    """Generate with the calibration prompts and record the denoiser's inputs at the kept steps.

    Returns:
        A `CalibrationSet` of forward kwargs dicts (UNet: `sample`, `timestep`, `encoder_hidden_states`, SDXL's
        `added_cond_kwargs`; SD3: `hidden_states`, `encoder_hidden_states`, `pooled_projections`, `timestep`;
        FLUX.1: those plus `img_ids`, `txt_ids` and FLUX.1-dev's `guidance`) that `quantize(...,
        calibration=...)` hands to Quark.
    """
    if not prompts:
        raise DiffquantError("no calibration prompts: pass --calib-prompts or use the model's default prompts")
    steps = config.steps or default_settings(pipe, config.seed).steps
    with recording_denoiser_inputs(pipe, steps, config.timesteps) as captured:
        generate(pipe, prompts, seed=config.seed, steps=steps, guidance=config.guidance,
                 batch_size=config.batch_size, desc="calibrate", height=config.height, width=config.width,
                 frames=config.frames)
    if not len(captured):
        raise DiffquantError("calibration captured no denoiser call: check the steps and timesteps settings")
    logger.info("captured %d %s calls over %d prompts at %d timesteps", len(captured), denoiser_of(pipe).name,
                len(prompts), len(set(captured.timesteps)))
    return captured


def random_calibration(denoiser: torch.nn.Module | Denoiser, n: int, sequence_length: int,
                       seed: int = 0, latent: tuple[int, int] | None = None, **clip) -> list[dict]:
    """Calibration data of random inputs (Gaussian latents and text embeddings, uniform timesteps):
    the naive baseline that shows what capturing real inputs is worth.

    Args:
        denoiser: the denoiser module (a UNet, SD3 or FLUX.1 transformer) or its family.
        n: how many records; sequence_length: text tokens per record; seed: the first record's seed;
        latent: the latent (height, width), else the family's example size; `clip`: a video family's
            `latent_frames`.
    """
    family = denoiser if isinstance(denoiser, Denoiser) else denoiser_for(denoiser)
    gen = torch.Generator().manual_seed(seed)
    items = []
    for k in range(n):
        flat = family.example_inputs(sequence_length=sequence_length, seed=seed + k, latent=latent, **clip)
        # A family's example timestep sits mid-trajectory (UNet 500, SD3 500.0, FLUX.1 sigma 0.5), so twice it
        # spans the timesteps that family takes.
        middle = flat[family.timestep_key]
        uniform = torch.rand(middle.shape, generator=gen).to(middle.device) * 2 * middle.float()
        flat[family.timestep_key] = uniform.to(middle.dtype)
        items.append(family.forward_kwargs(flat))
    return items


def calibrate(pipe, prompts: list[str] | str | None = None, size: int = 64, steps: int | None = None,
              timesteps: int | None = 8, guidance: float | None = None, column: str | None = None,
              split: str = "train", height: int | None = None, width: int | None = None,
              frames: int | None = None) -> CalibrationSet:
    """The calibration data of activation (W8A8) recipes: the denoiser's inputs captured while the pipeline
    generates from calibration prompts::

        calibration = dq.calibrate(pipe, prompts)
        q = dq.quantize(pipe, "w8a8-int8", calibration=calibration)

    Args:
        pipe: a pipeline from `load_pipeline`.
        prompts: a list of prompts (all of them are used); or a source to read `size` prompts from: a
            .txt/.csv/.jsonl/.parquet file, a dataset folder or a Hugging Face dataset id; or "random"
            for random inputs (the naive baseline); None for the model's own (the shapes models' captions
            drawn with a seed disjoint from evaluation; other models need prompts).
        size: prompts read from a source (or random inputs made).
        steps: denoising steps of the capture run (None: the model's default).
        timesteps: steps kept per trajectory, spread uniformly (None: all).
        guidance: guidance of the capture run (None: the model's default).
        column, split: the prompt column and split of a tabular source or dataset.
        height, width: image size of the capture run (None: the model's default).
        frames: a video model's frames per clip in the capture run (None: its profile's).

    Returns:
        A `CalibrationSet`; its `description` says where the data came from.
    """
    from diffquant.quantization.prompt_sources import load_prompts

    check_settings(steps, guidance)
    profile = profile_of(pipe)
    profile.check_guidance(guidance)
    family = denoiser_of(pipe)
    if isinstance(prompts, str) and prompts == RANDOM_CALIBRATION:
        captured = CalibrationSet(family.timestep_key)
        for item in random_calibration(family, n=size, sequence_length=family.sequence_length(pipe)):
            captured.append(item)
        captured.description = {
            "source": "random inputs (Gaussian latents and text embeddings, uniform timesteps)", "prompts": 0,
            "denoiser_calls": len(captured), "steps": None,
            "timesteps": sorted({_number(t) for item in captured for t in item[family.timestep_key]}, reverse=True)}
        return captured
    if isinstance(prompts, str):
        if " " in prompts.strip() and not Path(prompts).expanduser().exists():
            raise DiffquantError(f"{prompts!r} is neither a prompt file nor a dataset id: pass prompts as a list, "
                                 f"e.g. calibrate(pipe, [{prompts!r}])")
        source, texts = prompts, None
    elif prompts is None:
        source, texts = None, None
    else:
        source, texts = "given prompts", as_prompt_list(prompts)
    if texts is None:
        from diffquant.models.shapes.dataset import sample_captions

        shapes = profile.prompt_source == "shapes"
        default = (lambda n, seed: sample_captions(n, seed=CALIBRATION_SEED + seed)) if shapes else None
        texts = load_prompts(source, size, column=column, split=split, default=default)
    config = CalibrationConfig(size=max(len(texts), 1), steps=steps or profile.steps, timesteps=timesteps,
                               guidance=guidance, height=height, width=width, frames=frames)
    captured = capture_denoiser_inputs(pipe, texts, config)
    captured.prompts = list(texts)  # for the run's check that evaluation prompts are not calibration prompts
    captured.description = {"source": source or f"{profile.title} captions (seed disjoint from evaluation)",
                            "prompts": len(texts), "denoiser_calls": len(captured),
                            "timesteps": sorted(set(captured.timesteps), reverse=True), "steps": config.steps}
    return captured


def calibrate_for_run(pipe, config, steps: int, guidance: float):
    """`calibrate` with a `RunConfig`'s calibration options and the run's generation settings.

    Returns (calibration set, a JSON-able description of it)."""
    captured = calibrate(pipe, config.calib_prompts, size=config.calib_size, steps=config.calib_steps or steps,
                         timesteps=config.calib_timesteps, guidance=guidance, column=config.calib_column,
                         split=config.calib_split, height=config.height, width=config.width,
                         frames=config.frames)
    return captured, captured.description
