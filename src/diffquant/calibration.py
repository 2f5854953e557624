"""Stage 2, calibrate: run the real pipeline on calibration prompts and record the UNet's inputs at
the timesteps it really sees (both classifier-free-guidance halves), as Quark's calibration data.

A UNet's inputs are noisy latents, timesteps and text embeddings that change along the denoising
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

from .errors import DiffquantError
from .generation import default_settings, generate

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
    guidance: None for the model default; seed: the first prompt's seed.
    """

    size: int = 64
    steps: int | None = None
    timesteps: int | None = 8
    guidance: float | None = None
    seed: int = 10_000
    batch_size: int = 8

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
    """UNet forward kwargs dicts, in memory or spilled to a temporary folder (deleted with the set).

    Quark's `quantize_model` iterates it and calls `unet(**item)` for each item.
    """

    def __init__(self) -> None:
        self._items: list[dict | Path] = []
        self._bytes = 0
        self._spill: Path | None = None
        self.timesteps: list[int] = []
        self.description: dict = {}  # where the data came from, set by `calibrate` (written to results.json)

    def append(self, item: dict) -> None:
        self.timesteps.append(int(item["timestep"].reshape(-1)[0]))
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


def _tensors(item: dict) -> Iterator[torch.Tensor]:
    for value in item.values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            yield from _tensors(value)


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


_UNET_ARGS = ("sample", "timestep", "encoder_hidden_states")
_KEPT_KWARGS = ("added_cond_kwargs", "timestep_cond", "class_labels")


@contextmanager
def recording_unet_inputs(pipe, steps: int, timesteps: int | None = None) -> Iterator[CalibrationSet]:
    """While active, every call of `pipe.unet` at the kept steps (of a `steps`-step generation) is
    recorded whole into the yielded set: with classifier-free guidance a call's batch holds the
    unconditional and the conditional halves."""
    # Keep calls by timestep value (not by call count), so batching and multi-call schedulers agree.
    pipe.scheduler.set_timesteps(steps)
    schedule = [float(t) for t in pipe.scheduler.timesteps]
    keep = {schedule[i] for i in kept_step_indices(len(schedule), timesteps)}
    captured = CalibrationSet()

    def hook(module, args, kwargs):
        given = dict(zip(_UNET_ARGS, args)) | {k: v for k, v in kwargs.items() if v is not None}
        timestep = torch.as_tensor(given["timestep"])
        if float(timestep.reshape(-1)[0]) not in keep:
            return
        item = {k: _detach(given[k]) for k in _UNET_ARGS + _KEPT_KWARGS if k in given}
        if timestep.dim() == 0:  # pipelines pass one scalar timestep for the whole batch
            item["timestep"] = timestep.reshape(1).expand(item["sample"].shape[0]).clone()
        captured.append(item)

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def capture_unet_inputs(pipe, prompts: list[str], config: CalibrationConfig = CalibrationConfig()) -> CalibrationSet:
    """Generate with the calibration prompts and record the UNet's inputs at the kept steps.

    Returns:
        A `CalibrationSet` of kwargs dicts (`sample`, `timestep`, `encoder_hidden_states`, and SDXL's
        `added_cond_kwargs`) that `quantize_unet(..., calibration=...)` hands to Quark.
    """
    if not prompts:
        raise DiffquantError("no calibration prompts: pass --calib-prompts or use the model's default prompts")
    steps = config.steps or default_settings(pipe, config.seed).steps
    with recording_unet_inputs(pipe, steps, config.timesteps) as captured:
        generate(pipe, prompts, seed=config.seed, steps=steps, guidance=config.guidance,
                 batch_size=config.batch_size, desc="calibrate")
    if not len(captured):
        raise DiffquantError("calibration captured no UNet call: check the steps and timesteps settings")
    logger.info("captured %d UNet calls over %d prompts at %d timesteps", len(captured), len(prompts),
                len(set(captured.timesteps)))
    return captured


def random_calibration(unet, n: int, sequence_length: int, seed: int = 0) -> list[dict]:
    """Calibration data of random inputs (Gaussian latents and text embeddings, uniform timesteps):
    the naive baseline that shows what capturing real inputs is worth."""
    from .export import example_inputs

    gen = torch.Generator().manual_seed(seed)
    items = []
    for k in range(n):
        item = example_inputs(unet, batch_size=2, sequence_length=sequence_length, seed=seed + k)
        item["timestep"] = torch.randint(0, 1000, (2,), generator=gen).to(item["timestep"].device)
        items.append(item)
    return items


def calibrate(pipe, prompts: list[str] | str | None = None, size: int = 64, steps: int | None = None,
              timesteps: int | None = 8, guidance: float | None = None, column: str | None = None,
              split: str = "train") -> CalibrationSet:
    """The calibration data of activation (W8A8) recipes: the UNet's inputs captured while the pipeline
    generates from calibration prompts::

        calibration = dq.calibrate(pipe, prompts)
        q = dq.quantize_unet(pipe, "w8a8-int8", calibration=calibration)

    Args:
        pipe: a pipeline from `load_pipeline`.
        prompts: a list of prompts (all of them are used); or a source to read `size` prompts from: a
            .txt/.csv/.jsonl/.parquet file, a dataset folder or a Hugging Face dataset id; or "random"
            for random inputs (the naive baseline); None for the model's own (shapes-sd captions drawn
            with a seed disjoint from evaluation; other models need prompts).
        size: prompts read from a source (or random inputs made).
        steps: denoising steps of the capture run (None: the model's default).
        timesteps: steps kept per trajectory, spread uniformly (None: all).
        guidance: classifier-free guidance of the capture run (None: the model's default).
        column, split: the prompt column and split of a tabular source or dataset.

    Returns:
        A `CalibrationSet`; its `description` says where the data came from.
    """
    from .generation import as_prompt_list, check_settings
    from .profiles import profile_of
    from .prompt_sources import load_prompts

    check_settings(steps, guidance)
    if isinstance(prompts, str) and prompts == RANDOM_CALIBRATION:
        captured = CalibrationSet()
        for item in random_calibration(pipe.unet, n=size, sequence_length=pipe.tokenizer.model_max_length):
            captured.append(item)
        captured.description = {
            "source": "random inputs (Gaussian latents and text embeddings, uniform timesteps)", "prompts": 0,
            "unet_calls": len(captured), "steps": None,
            "timesteps": sorted({int(t) for item in captured for t in item["timestep"]}, reverse=True)}
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
        from .shapes.dataset import sample_captions

        default = (lambda n, seed: sample_captions(n, seed=CALIBRATION_SEED + seed)) if profile_of(pipe).prompt_source == "shapes" else None
        texts = load_prompts(source, size, column=column, split=split, default=default)
    config = CalibrationConfig(size=max(len(texts), 1), steps=steps or default_settings(pipe).steps,
                               timesteps=timesteps, guidance=guidance)
    captured = capture_unet_inputs(pipe, texts, config)
    captured.description = {"source": source or "shapes-sd captions (seed disjoint from evaluation)",
                            "prompts": len(texts), "unet_calls": len(captured),
                            "timesteps": sorted(set(captured.timesteps), reverse=True), "steps": config.steps}
    return captured
