"""What a peer library must do to be compared with diffquant, and the registry that finds one by method name.

A method is `library:kind`, e.g. `modelopt:int8`, `gguf:q4_0`, `torchao:int4-g64`, `diffquant:w8a8-int8`. Each
library is one class registered under its name: it declares the packages it needs and its kinds with their bits,
and quantizes a copy of the pipeline's denoiser as its library documents."""

from __future__ import annotations

import importlib.util
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from diffquant.core.errors import DiffquantError
from diffquant.quantization.backends import Storage  # what a quantized denoiser stores, as backends count it

PEERS: dict[str, type[Peer]] = {}


class PeerUnavailable(DiffquantError):
    """A peer that cannot run here (its reason becomes the row's note instead of a measurement)."""




@dataclass
class Quantized:
    """A peer's quantized pipeline and what it says about itself."""

    pipe: object
    layers: int
    storage: Storage
    notes: list[str]


@dataclass
class PeerRun:
    """What every method of one comparison shares: the fp32 pipeline and its images, the evaluation and
    calibration captions and settings, a scratch folder, and `check(peer_pipe, exact=True)`, which stops the
    run unless a peer's float copy reproduces the fp32 images (exact=False: says how close another runtime is)."""

    pipe: object
    baseline: list
    prompts: list[str]
    calib_prompts: list[str]
    settings: dict
    calib_settings: dict
    calib_timesteps: int
    work_dir: Path
    check: Callable
    cache: dict = field(default_factory=dict)  # what methods share (diffquant's calibration set)


def register(cls: type[Peer]) -> type[Peer]:
    """Class decorator: make `cls` the peer of each library name in `cls.libraries`."""
    for library in cls.libraries:
        PEERS[library] = cls
    return cls


class Peer(ABC):
    """One quantization library compared with diffquant."""

    libraries: ClassVar[tuple[str, ...]]  # the method prefixes it answers to
    kinds: ClassVar[dict[str, int]] = {}  # kind -> bits per weight it aims at (8 or 4)
    required_packages: ClassVar[tuple[str, ...]] = ()  # importable module names
    group_size: ClassVar[int | None] = None  # default group of its kinds, when a kind may set one (-gN)

    def __init__(self, library: str) -> None:
        self.library = library

    def unavailable(self) -> str | None:
        """Why this peer cannot run here (a package missing), or None."""
        missing = [p for p in self.required_packages if importlib.util.find_spec(p.split(".")[0]) is None
                   or importlib.util.find_spec(p) is None]
        return f"{', '.join(missing)} not installed (pip install -e '.[peers]')" if missing else None

    def parse(self, kind: str) -> tuple[str, int | None]:
        """'int4-g64' -> ('int4', 64); one line naming the choices for an unknown kind."""
        match = re.fullmatch(r"(.+?)(?:-g(\d+))?", kind)
        name, group = match.group(1), match.group(2)
        if name not in self.kinds:
            raise DiffquantError(f"unknown method {self.library}:{kind}: use one of {', '.join(methods())}")
        if group is not None and self.group_size is None:
            raise DiffquantError(f"{self.library}:{kind}: {self.library} has no group size to set")
        return name, int(group) if group else self.group_size

    def label(self, kind: str) -> str:
        """The method's row label."""
        return f"{self.library}:{kind}"

    @abstractmethod
    def quantize(self, run: PeerRun, kind: str, group: int | None) -> Quantized:
        """The pipeline with this library's quantized copy of the denoiser (the fp32 pipeline untouched)."""


def peer_for(method: str) -> tuple[Peer, str, int | None]:
    """(peer, kind, group) of a `library:kind` method; one line naming the libraries for an unknown one."""
    library, _, kind = method.partition(":")
    if library not in PEERS:
        raise DiffquantError(f"unknown method {method!r}: use diffquant:RECIPE, diffquant-all:RECIPE or one of "
                             f"{', '.join(methods())}")
    peer = PEERS[library](library)
    kind, group = peer.parse(kind)
    return peer, kind, group


def methods(bits: int | None = None) -> list[str]:
    """Every `library:kind` the registered peers offer (of `bits` bits, when given)."""
    return [f"{library}:{kind}" for library, cls in PEERS.items() for kind, b in cls.kinds.items()
            if bits is None or b == bits]


def shared_calibration(run: PeerRun):
    """diffquant's calibration set of this comparison (the denoiser calls captured while the pipeline draws the
    calibration captions), made once and shared by every method that calibrates: the peers read the same calls."""
    from diffquant.quantization.calibration import calibrate

    if "calibration" not in run.cache:
        run.cache["calibration"] = calibrate(run.pipe, run.calib_prompts, steps=run.settings["steps"],
                                             timesteps=run.calib_timesteps, guidance=run.settings["guidance"])
    return run.cache["calibration"]
