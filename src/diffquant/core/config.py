"""The run configuration: frozen, versioned, written to config.json and replayable from it.

    config = RunConfig(recipes=("int8-w",))
    RunConfig.from_dict(json.loads(Path("out/config.json").read_text())) == config
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from diffquant.core.errors import DiffquantError
from diffquant.core.recipes import DEFAULT_RECIPES

CONFIG_VERSION = 6  # 6: frames; 5: height, width; 4: quantize_all; 3: evaluation at scale (prompt source, batch size, CLIP/FID, resume), runtime; 2: frozen, tuples,
# no_t5; version 1 to 5 files still load (the new fields take their defaults)
RESUME_IGNORED = ("out", "resume")  # fields a resumed run may change; every other one must match the folder's


def check_settings(steps: int | None = None, guidance: float | None = None, num_images: int | None = None) -> None:
    """Refuse settings no pipeline can honour (None means the model default), before any slow work."""
    for name, value in (("steps", steps), ("number of images", num_images)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise DiffquantError(f"{name} must be a whole number of at least 1, got {value!r}")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, numbers.Real)
                                 or not math.isfinite(guidance) or guidance < 0):
        raise DiffquantError(f"guidance must be a number of at least 0 (0 or 1 turns classifier-free guidance off), "
                             f"got {guidance!r}")


def as_prompt_list(prompts: str | list[str]) -> list[str]:
    """A list of prompts; one string is one prompt, as in diffusers' own `pipe(prompt=...)`."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise DiffquantError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}"
                             + ("" if not isinstance(prompts, (list, tuple)) else
                                f" holding {', '.join(sorted({type(p).__name__ for p in prompts}))}"))
    return list(prompts)


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run (None: the model profile's default)."""

    model: str | None = None
    prompts: tuple[str, ...] | None = None
    num_images: int | None = None
    seed: int = 1024
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None  # image size in pixels (calibration, generation and a fixed-shape export alike)
    width: int | None = None
    frames: int | None = None  # a video model's frames per clip (None: its profile's; refused for an image model)
    recipes: tuple[str, ...] = tuple(DEFAULT_RECIPES)
    device: str = "auto"
    dtype: str = "auto"
    no_t5: bool = False
    export: bool = True
    export_pipeline: bool = False
    runtime: str = "onnxruntime"  # where the exported denoiser generates its images: onnxruntime or openvino
    out: str | None = None
    exclude: tuple[str, ...] = ()
    quantize_all: bool = False  # ignore the model profile's measured float layers (profiles.KeepFloat)
    calib_prompts: str | None = None
    calib_size: int = 64
    calib_steps: int | None = None
    calib_timesteps: int | None = 8
    calib_column: str | None = None
    calib_split: str = "train"
    prompt_source: str | None = None  # evaluation prompts: a file, dataset folder or Hub id (the first num_images)
    prompt_column: str | None = None
    prompt_split: str = "train"
    batch_size: int = 8  # images per pipeline call; the unit of work of processes and of --resume
    clip_model: str | None = None  # CLIP score (and FID's features when Inception's are not on disk)
    reference_images: str | None = None  # a folder of real images: FID of every image set against them
    resume: bool = False  # reuse `out` when it holds this config's run: images on disk are not generated again

    def __post_init__(self) -> None:
        # Normalise containers to tuples so the config is hashable and cannot be mutated through an alias.
        if self.prompts is not None:
            object.__setattr__(self, "prompts", tuple(as_prompt_list(self.prompts)))
        for name in ("model", "prompt_source", "clip_model", "reference_images", "out"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(value))
        for name in ("recipes", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        self.validate()

    def validate(self) -> None:
        """Refuse settings that cannot run, before any slow work (one DiffquantError naming the fix)."""
        check_settings(self.steps, self.guidance, self.num_images)
        if self.prompts is not None and (not self.prompts or not all(p.strip() for p in self.prompts)):
            raise DiffquantError("empty prompt: pass non-empty --prompt texts, or none for the model's defaults")
        if self.prompts is not None and self.prompt_source is not None:
            raise DiffquantError("pass prompts (--prompt) or a prompt source (--prompts), not both")
        if self.resume and self.out is None:
            raise DiffquantError("--resume continues the run in --out: pass the --out of the run to resume")
        for name in ("calib_size", "calib_steps", "calib_timesteps", "batch_size", "height", "width", "frames"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                flag = "--" + name.replace("_", "-")
                raise DiffquantError(f"{flag} must be a whole number of at least 1, got {value!r}")
        if str(self.dtype).lower() in ("bf16", "bfloat16") and self.export:
            # Measured: the int8/fp8 weight codes of a bf16 denoiser do not match Quark's fake-quantized
            # weights, so the ONNX export fails after all the generation work.
            raise DiffquantError("--dtype bf16 cannot be exported to ONNX: pass --no-export with bf16, or --dtype "
                                 "fp32 (CPU) / fp16 (GPU)")
        if self.runtime not in ("onnxruntime", "openvino"):
            raise DiffquantError(f"unknown --runtime {self.runtime!r}: use onnxruntime or openvino")
        if self.export_pipeline and not self.export:
            raise DiffquantError("--export-pipeline writes the exported denoiser into the pipeline folder: drop "
                                 "--no-export")

    def replace(self, **changes) -> RunConfig:
        """A copy with `changes` applied (validated); unknown names are refused in one line."""
        unknown = [key for key in changes if key not in self.__dataclass_fields__]
        if unknown:
            raise DiffquantError(f"unknown run option {unknown[0]!r}: the options are "
                                 f"{', '.join(self.__dataclass_fields__)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return {"type": "RunConfig", "version": CONFIG_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """The config a `to_dict` (config.json) describes.

        Raises:
            DiffquantError: not a RunConfig, a newer version, or an unknown field.
        """
        if not isinstance(data, dict) or data.get("type") != "RunConfig":
            raise DiffquantError("not a diffquant run config (no \"type\": \"RunConfig\"): pass the config.json a "
                                 "run wrote")
        version = data.get("version")
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise DiffquantError(f"run config version {version!r} is newer than this diffquant reads "
                                 f"({CONFIG_VERSION}): upgrade diffquant")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k not in ("type", "version")}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DiffquantError(f"unknown field {unknown[0]!r} in the run config: the fields are {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """Read a config.json written by a run."""
        import json

        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DiffquantError(f"{path} does not exist: pass the config.json of an earlier run") from None
        except ValueError as error:
            raise DiffquantError(f"{path} is not valid JSON ({error})") from None
        return cls.from_dict(data)

    def same_run(self, other: RunConfig) -> bool:
        """True when `other` makes the same images and metrics (it may differ in `RESUME_IGNORED` only)."""
        ignored = dict.fromkeys(RESUME_IGNORED)
        return dataclasses.replace(self, **ignored) == dataclasses.replace(other, **ignored)
