"""What a denoiser family must say, and the registry that finds a family from a module or a pipeline."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch

from diffquant.core.errors import DiffquantError

DENOISERS: dict[str, type[Denoiser]] = {}


def register(cls: type[Denoiser]) -> type[Denoiser]:
    """Class decorator: make `cls` the family of the diffusers class named `cls.module_class`."""
    DENOISERS[cls.module_class] = cls
    return cls


def supported_classes() -> tuple[str, ...]:
    """The diffusers denoiser classes diffquant knows, in registration order."""
    return tuple(DENOISERS)


class Denoiser(ABC):
    """One denoiser family (a diffusers model class): how it sits in its pipeline, what it is called
    with, how to build inputs for it from its config, and how it goes to ONNX.

    An instance wraps one module; quantizing the module (Quark swaps its Linear/Conv layers in place)
    keeps its class, so the family of a quantized denoiser is the family of the float one."""

    module_class: ClassVar[str]  # the diffusers class name, e.g. "UNet2DConditionModel"
    pipeline_attribute: ClassVar[str]  # where the pipeline holds it: "unet" or "transformer"
    positional: ClassVar[tuple[str, ...]]  # names of forward()'s positional arguments, in order
    capture_keys: ClassVar[tuple[str, ...]]  # the forward kwargs a calibration record keeps
    timestep_key: ClassVar[str] = "timestep"
    output_name: ClassVar[str] = "out_sample"
    # Module-name patterns kept in float by default, where a measurement showed they hurt (see docs/quantization.md).
    default_exclusions: ClassVar[tuple[str, ...]] = ()
    # Attributes of the module its pipeline reads besides config, dtype and device (a runtime's stand-in copies them).
    module_attributes: ClassVar[tuple[str, ...]] = ()

    # The original checkpoint layout (`layout.py`): the key prefix its single-file checkpoints carry, and the
    # architecture name GGUF files and ComfyUI-GGUF give it (None: the family has no original layout here).
    original_prefix: ClassVar[str] = ""
    gguf_arch: ClassVar[str | None] = None

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def original_layout(self, rows: dict[str, int]) -> dict[str, list[tuple[str, int, int]]]:
        """Original checkpoint key -> the row ranges of diffusers tensors it stacks (`layout.Layout`), for a
        state dict whose tensors have `rows` rows; raises ValueError for a key it has no name for."""
        raise ValueError(f"{self.name} has no original checkpoint layout in diffquant")

    @property
    def config(self):
        return self.module.config

    @property
    def name(self) -> str:
        return self.pipeline_attribute

    # --- inputs -------------------------------------------------------------------------------
    @abstractmethod
    def example_inputs(self, batch_size: int = 2, sequence_length: int | None = None,
                       seed: int = 0, latent: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Flat tensors in ONNX input order, shaped from the module's config (nothing hard-coded to a model);
        `latent`: the latent's (height, width) in latent pixels (an image's size over the VAE's scale), else the
        family's default."""

    def latent_patch(self) -> int:
        """Latent pixels per token side: 1 for a UNet (convolutions take any latent size), the patch size of a
        transformer (SD3's patch embedding; FLUX.1 packs 2x2 latents into one token)."""
        return int(getattr(self.config, "patch_size", None) or 1)

    def default_size(self, pipe) -> tuple[int, int] | None:
        """The image (height, width) diffquant draws when none is asked and the profile sets none; None: the
        pipeline's own default (a family overrides it where that default is not the model's trained size)."""
        return None

    def latent_frames(self, pipe, frames: int) -> int:
        """The latent frames of a clip of `frames` frames (a video family's `example_inputs(latent_frames=...)`);
        an image family refuses."""
        raise DiffquantError(f"{self.module_class} generates images, not clips: leave --frames out")

    def size_multiple(self, pipe) -> int:
        """The image sizes the pipeline takes are multiples of this: its VAE's downscale times the latent patch."""
        return int(getattr(pipe, "vae_scale_factor", 8)) * self.latent_patch()

    # A family whose pipeline pads its text to `__call__`'s `max_sequence_length` (the DiTs after FLUX.1): that
    # argument's default, else this many tokens (its profile asks for the same). None: the tokenizer's length.
    text_tokens: ClassVar[int | None] = None

    def sequence_length(self, pipe=None) -> int:
        """The text sequence length the pipeline feeds: its `max_sequence_length` default for a family with
        `text_tokens`, else its tokenizer's length, or the family default."""
        if self.text_tokens is not None:
            return int(call_default(pipe, "max_sequence_length", self.text_tokens))
        tokenizer = getattr(pipe, "tokenizer", None)
        return tokenizer.model_max_length if tokenizer is not None else 77

    def flat_inputs(self, record: dict) -> dict[str, torch.Tensor]:
        """A calibration record (forward kwargs) as the flat tensors the ONNX graph takes."""
        names = self.input_names(record)
        return {k: record[k] for k in names if isinstance(record.get(k), torch.Tensor)}

    def graph_inputs(self, record: dict) -> dict[str, torch.Tensor]:
        """A recorded call (forward kwargs) as the flat tensors the ONNX graph takes, its timestep one per
        sample (UNet pipelines pass one scalar step for the whole batch; the graph has a batch axis)."""
        record = dict(record)
        timestep = torch.as_tensor(record[self.timestep_key])
        if timestep.numel() == 1:
            record[self.timestep_key] = timestep.reshape(1).expand(self.batch_size(record))
        return self.flat_inputs(record)

    def first_sample(self, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Flat inputs as a graph that keeps its traced batch (`dynamic_batch` False, FLUX.1) takes them: the
        first sample of every batched input; unchanged for a family with a dynamic batch."""
        if self.dynamic_batch:
            return flat
        unbatched = set(self.unbatched_inputs)
        return {k: v if k in unbatched else v[:1] for k, v in flat.items()}

    def input_names(self, inputs: dict) -> list[str]:
        """ONNX input names present in `inputs`, in forward order."""
        return [k for k in self.capture_keys if k in inputs and isinstance(inputs[k], torch.Tensor)]

    def forward_kwargs(self, flat: dict[str, torch.Tensor]) -> dict:
        """Flat ONNX-style inputs -> the module's forward kwargs (inverse of `flat_inputs`)."""
        return dict(flat)

    def __call__(self, flat: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the module on flat inputs; returns its one output tensor."""
        return self.module(**self.forward_kwargs(flat), return_dict=False)[0]

    def output_tensor(self, out) -> torch.Tensor:
        """The module's output (`module(**record, return_dict=False)[0]`) as one tensor (Z-Image's is a list)."""
        return out

    def module_output(self, out: torch.Tensor, record: dict):
        """The graph's output tensor as the module returns it to its pipeline for the call `record` (inverse of
        `output_tensor`)."""
        return out

    # --- calibration capture ------------------------------------------------------------------
    def record(self, args: tuple, kwargs: dict) -> dict:
        """The forward kwargs of one call (from a pre-hook's args/kwargs), keeping `capture_keys`."""
        given = dict(zip(self.positional, args)) | {k: v for k, v in kwargs.items() if v is not None}
        return {k: given[k] for k in self.capture_keys if k in given}

    def batch_size(self, record: dict) -> int:
        return record[self.positional[0] if self.positional else "hidden_states"].shape[0]

    # --- ONNX -----------------------------------------------------------------------------------
    def dynamic_axes(self, names: list[str]) -> dict:
        """Batch is dynamic on every input and the output (families override what cannot be)."""
        return {name: {0: "batch"} for name in names} | {self.output_name: {0: "batch"}}

    dynamic_batch: ClassVar[bool] = True  # False: the ONNX graph has the export batch; runtimes loop over it
    unbatched_inputs: ClassVar[tuple[str, ...]] = ()  # flat inputs without a batch axis (Flux's position ids)

    def export_module(self, names: list[str]) -> torch.nn.Module:
        """A module taking the flat inputs `names` positionally and returning one tensor: what tracing needs."""
        return _Positional(self, names)

    @contextmanager
    def exportable(self) -> Iterator[None]:
        """Temporarily make the module traceable by torch.onnx at opset 20 (families override)."""
        yield

    def discarded_layers(self) -> tuple[str, ...]:
        """Module names whose outputs the module computes but never uses (Qwen-Image's last block's text stream):
        the traced graph leaves them out, so an export does not look for their activation quantizers in it."""
        return ()


class _Positional(torch.nn.Module):
    def __init__(self, family: Denoiser, names: list[str]):
        super().__init__()
        self.denoiser = family.module  # registered, so Quark's and torch's exporters see its parameters
        self._family = family
        self._names = list(names)

    def forward(self, *tensors):
        return self._family(dict(zip(self._names, tensors)))


def caption_inputs(config, batch_size: int, tokens: int, latent: tuple[int, int] | None, timestep: torch.Tensor,
                   seed: int) -> dict[str, torch.Tensor]:
    """Example inputs of a DiT that cross-attends to padded caption features (PixArt, Sana): latents, features of
    `config.caption_channels`, a timestep per sample and the padding mask (the second half of the tokens padded)."""
    gen = torch.Generator().manual_seed(seed)
    height, width = latent or (config.sample_size, config.sample_size)
    mask = torch.ones(batch_size, tokens)
    mask[:, tokens // 2:] = 0
    return {
        "hidden_states": torch.randn(batch_size, config.in_channels, height, width, generator=gen),  # (B, C, h, w)
        "encoder_hidden_states": torch.randn(batch_size, tokens, config.caption_channels, generator=gen),  # (B, T, D)
        "timestep": timestep.expand(batch_size).clone(),  # (B,)
        "encoder_attention_mask": mask,  # (B, T): 1 for a token, 0 for padding
    }


def call_default(pipe, name: str, fallback):
    """The default of the pipeline's `__call__` argument `name` (e.g. the text length it pads to), else `fallback`."""
    import inspect

    if pipe is None:
        return fallback
    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    return fallback if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def denoiser_for(module: torch.nn.Module) -> Denoiser:
    """The family of `module`, found by its class (or a base class) name; a runtime's stand-in for a denoiser
    (`runtimes.base.GraphDenoiser`) carries the family of the module it was exported from.

    Raises:
        DiffquantError: the class is not a supported denoiser.
    """
    if isinstance(getattr(module, "family", None), Denoiser):
        return module.family
    for cls in type(module).__mro__:
        if cls.__name__ in DENOISERS:
            return DENOISERS[cls.__name__](module)
    raise DiffquantError(f"{type(module).__name__} is not a supported denoiser: diffquant supports "
                         f"{', '.join(supported_classes())}")


def denoiser_of(pipe) -> Denoiser:
    """The family of the pipeline's denoiser (`pipe.unet` or `pipe.transformer`)."""
    for attribute in ("unet", "transformer"):
        module = getattr(pipe, attribute, None)
        if isinstance(module, torch.nn.Module):
            return denoiser_for(module)
    raise DiffquantError(f"{type(pipe).__name__} has no unet or transformer: diffquant supports pipelines whose "
                         f"denoiser is one of {', '.join(supported_classes())}")
