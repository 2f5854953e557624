"""What a runtime must do, the registry that finds one by name, and the stand-in that runs an exported
denoiser graph inside a diffusers pipeline whatever the runtime."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from diffquant.models.denoisers import Denoiser, denoiser_of
from diffquant.core.errors import DiffquantError

RUNTIMES: dict[str, type[Runtime]] = {}


def register(cls: type[Runtime]) -> type[Runtime]:
    """Class decorator: make `cls` the runtime called `cls.name`."""
    RUNTIMES[cls.name] = cls
    return cls


def get_runtime(name: str = "onnxruntime") -> Runtime:
    """The runtime registered as `name`.

    Raises:
        DiffquantError: no runtime has that name.
    """
    if name not in RUNTIMES:
        raise DiffquantError(f"unknown runtime {name!r}: use one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]()


class Runtime(ABC):
    """One inference engine for exported denoiser graphs: run a graph, put it in a pipeline, and say which
    operators it really runs (fused integer kernels or dequantize-then-float)."""

    name: ClassVar[str]
    tag: ClassVar[str]  # suffix of a run's image folder made with it ("w8a8-int8-ort")
    short_name: ClassVar[str]  # its name in a grid row or table ("w8a8-int8 ORT")
    title: ClassVar[str]  # its name in prose and timings

    @abstractmethod
    def runner(self, path: str | Path, threads: int | None = None) -> GraphRunner:
        """A loaded graph, ready to be called many times."""

    def prepare_graph(self, model, fuse_attention: bool = True) -> dict:
        """Rewrite an exported quantized graph (an onnx.ModelProto, in place) into the form this runtime
        fuses best, and say what changed. The default leaves the plain QDQ graph as the backend traced it:
        a runtime whose own transformations read QDQ needs nothing more."""
        return {}

    @abstractmethod
    def optimized_ops(self, path: str | Path) -> dict[str, int]:
        """Operator counts of the graph as the runtime runs it, after its own fusions (most common first)."""

    @abstractmethod
    def profile(self, path: str | Path, inputs: dict[str, torch.Tensor], out_dir: str | Path,
                runs: int = 1) -> tuple[dict[str, float], dict[str, int]]:
        """(milliseconds per call by operator type, `optimized_ops`) over `runs` calls after a warm-up call;
        the runtime's trace files go to `out_dir`."""

    def run(self, path: str | Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
        """One call of the graph at `path` on flat torch inputs; its output as float32 numpy."""
        return self.runner(path).run(inputs).astype(np.float32)

    def denoiser(self, path: str | Path, family: Denoiser, threads: int | None = None) -> GraphDenoiser:
        """A stand-in for `family.module` that runs the graph at `path` (see `GraphDenoiser`)."""
        return GraphDenoiser(self.runner(path, threads), family)

    def pipeline(self, pipe, path: str | Path, threads: int | None = None):
        """A shallow copy of `pipe` whose denoiser runs the graph at `path` in this runtime; the text
        encoders and the VAE stay in torch, and the same seeds give the same latents."""
        family = denoiser_of(pipe)
        stand_in = self.denoiser(path, family, threads)
        if getattr(family.module, "add_embedding", None) is not None:
            # SDXL pipelines read its input width to check the added conditioning they build.
            stand_in.add_embedding = family.module.add_embedding
        copied = copy.copy(pipe)
        # Bypass DiffusionPipeline.__setattr__, which would record the stand-in in the pipeline's config.
        object.__setattr__(copied, family.pipeline_attribute, stand_in)
        return copied


class GraphRunner(ABC):
    """A loaded graph: its inputs (name -> numpy dtype and shape, None where an axis is dynamic) and a call."""

    inputs: dict[str, tuple[np.dtype, tuple[int | None, ...]]]

    @abstractmethod
    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Run once on numpy inputs; returns the first output."""

    def feed(self, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The graph's inputs taken by name from torch tensors, in the graph's dtypes."""
        missing = [name for name in self.inputs if name not in inputs]
        if missing:
            raise DiffquantError(f"the graph needs input(s) {', '.join(missing)} that were not given "
                                 f"(given: {', '.join(inputs)}): export it from this pipeline's denoiser again")
        return {name: inputs[name].detach().cpu().numpy().astype(dtype) for name, (dtype, _) in self.inputs.items()}

    def run(self, inputs: dict[str, torch.Tensor]) -> np.ndarray:
        return self(self.feed(inputs))


class GraphDenoiser(torch.nn.Module):
    """A stand-in for a pipeline's denoiser (`pipe.unet` or `pipe.transformer`) that runs its exported graph.

    It looks like the module to the pipeline: the module's `config`, a `dtype` and a `device`, forward
    kwargs by the family's names, `return_dict`, and a no-op `cache_context` (Flux's pipeline enters
    one around each call). A graph with a fixed batch (a family whose `dynamic_batch` is False) is called
    once per chunk of that batch and the outputs concatenated; inputs without a batch axis
    (`family.unbatched_inputs`) go whole to every call.
    """

    def __init__(self, runner: GraphRunner, family: Denoiser):
        super().__init__()
        self.runner = runner
        self.family = family
        self.config = family.config
        first = next(iter(runner.inputs.values()))
        self.graph_batch = None if family.dynamic_batch else first[1][0]
        for name in family.module_attributes:
            setattr(self, name, getattr(family.module, name))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # inputs and outputs cross as CPU numpy arrays

    @property
    def dtype(self) -> torch.dtype:
        """The graph's float input type (the pipeline casts its latents and embeddings to it)."""
        floats = [dtype for dtype, _ in self.runner.inputs.values() if np.issubdtype(dtype, np.floating)]
        return torch.float16 if floats and floats[0] == np.float16 else torch.float32

    def cache_context(self, name: str):
        return nullcontext()

    def forward(self, *args, return_dict: bool = True, **kwargs):
        record = self.family.record(args, kwargs)
        batch = self.family.batch_size(record)
        flat = self.family.graph_inputs(record)
        out = self.family.module_output(torch.from_numpy(self._call(flat, batch)), record)
        if not return_dict:
            return (out,)
        return _output_class(self.family)(sample=out)

    def _call(self, flat: dict[str, torch.Tensor], batch: int) -> np.ndarray:
        if self.graph_batch is None or self.graph_batch == batch:
            return self.runner.run(flat)
        step = self.graph_batch
        if not isinstance(step, int) or batch % step:
            raise DiffquantError(f"the {self.family.name} graph was exported for batch {step} and cannot take a "
                                 f"batch of {batch}: export it with batch 1")
        unbatched = set(self.family.unbatched_inputs)
        outputs = [self.runner.run({name: value if name in unbatched else value[start:start + step]
                                    for name, value in flat.items()})
                   for start in range(0, batch, step)]
        return np.concatenate(outputs)


def _output_class(family: Denoiser) -> Callable:
    if family.pipeline_attribute == "unet":
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput
