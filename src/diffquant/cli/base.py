"""What every command module of the `diffquant` command line exposes: one `Command` per subcommand."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


def no_arguments(parser: argparse.ArgumentParser) -> None:
    """`add_arguments` of a command that takes none."""


@dataclass(frozen=True)
class Command:
    """A subcommand: `add_arguments` fills its parser, `run` executes the parsed arguments and returns the
    exit status. `compute`: torch or ONNX Runtime threads matter, so `--threads` is applied before `run`."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    compute: bool = True
