"""The one progress helper: tqdm bars that `set_quiet(True)` (the CLI's --quiet) turns off."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar of diffquant off (True) or on (False)."""
    global _quiet
    _quiet = quiet


def progress(iterable: Iterable[T], desc: str, total: int | None = None, disable: bool = False) -> Iterator[T]:
    """Iterate with a progress bar unless progress is turned off."""
    return iter(tqdm(iterable, desc=desc, total=total, disable=disable or _quiet, leave=False, dynamic_ncols=True))


def is_quiet() -> bool:
    """True when progress bars are turned off (libraries' own bars too: see `pipeline.load_pipeline`)."""
    return _quiet
