"""Atomic artifact writing: write to a temporary name beside the target, then rename.

An interrupted run never leaves a half-written file that looks complete; whatever finished stays valid.
Artifacts get the permissions of any file the user creates (0644 under the usual umask 022), not the
private 0600 of a temporary file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from PIL import Image

from diffquant.core.errors import DiffquantError

logger = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


# The temporary files and folders of the atomic writes in progress: what a forced exit (`remove_in_flight`, the
# SIGTERM watchdog of the CLI) removes, so that nothing half-written stays behind.
_IN_FLIGHT: set[str] = set()


def remove_in_flight() -> None:
    """Remove every temporary file and folder of an atomic write still in progress (best effort)."""
    for path in list(_IN_FLIGHT):
        with contextlib.suppress(OSError):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.unlink(path)


@contextmanager
def atomic_path(target: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or target.suffix, dir=target.parent)
    os.close(fd)
    _IN_FLIGHT.add(tmp)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, target)
    finally:
        _IN_FLIGHT.discard(tmp)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask_modes(folder: Path) -> None:
    """Give `folder` and everything in it the modes the umask gives new files and folders: mkdtemp creates
    0700, and writers that go through a temporary file of their own (safetensors' save_file) leave 0600."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    _IN_FLIGHT.add(str(tmp))
    try:
        yield tmp
        _umask_modes(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        _IN_FLIGHT.discard(str(tmp))
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text(target: Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: Path, data) -> Path:
    return write_text(target, json.dumps(data, indent=2, allow_nan=False) + "\n")


def read_json(path: Path, missing: str, what: str = "valid JSON", fix: str = ""):
    """The JSON at `path`, or one line: `missing` when there is no file; "<path> is not <what> (<error>): <fix>"
    when it does not parse."""
    path = Path(path)
    if not path.is_file():
        raise DiffquantError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError both
        raise DiffquantError(f"{path} is not {what} ({error})" + (f": {fix}" if fix else "")) from None


def save_image(image: Image.Image, target: Path) -> Path:
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG")
    return Path(target)


def new_run_dir(root: Path | None = None, prefix: str = "") -> Path:
    """A fresh `<root>/<prefix><timestamp>/` (suffixed -2, -3... if taken), created by one atomic mkdir,
    so two processes started at once get two folders: nothing is overwritten or shared."""
    root = Path(root) if root is not None else Path("diffquant-out")
    root.mkdir(parents=True, exist_ok=True)
    stamp = prefix + datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = root / stamp, 1
    while True:
        try:
            candidate.mkdir(exist_ok=False)
            return candidate
        except FileExistsError:
            n += 1
            candidate = root / f"{stamp}-{n}"


def resolve_out_dir(out: str | Path | None) -> Path:
    """The folder a command writes to, created and checked writable before any slow work.

    None gives a new `./diffquant-out/<timestamp>/`. A new or empty `out` is used as is; an existing
    non-empty `out` (or a file) is never written into: a new sibling `<out>-<timestamp>` is used.
    A folder that cannot be created or written raises a DiffquantError.
    """
    target = None if out is None else Path(out).expanduser()
    chosen, made = None, False
    try:
        if target is None:
            chosen, made = new_run_dir(), True
        elif target.exists() and (not target.is_dir() or any(target.iterdir())):
            chosen, made = new_run_dir(target.parent, prefix=f"{target.name}-"), True
            logger.warning("%s exists and is not empty: writing to %s instead", target, chosen)
        else:
            made = not target.exists()
            target.mkdir(parents=True, exist_ok=True)
            chosen = target
        with tempfile.TemporaryFile(dir=chosen):  # permissions alone do not tell (root, read-only mounts)
            pass
    except OSError as error:
        if made and chosen is not None:
            with contextlib.suppress(OSError):
                chosen.rmdir()
        where = error.filename or target or "diffquant-out"
        raise DiffquantError(f"cannot write to {where} ({error.strerror}): pass a writable --out") from None
    return chosen


@contextmanager
def output_folder(out: str | Path | None, scratch: tuple[str, ...] = ("config.json",)) -> Iterator[Path]:
    """`resolve_out_dir(out)` for the duration of a command. If the command fails or is interrupted
    before writing anything but the `scratch` files, those are removed, and the folder too when this
    call created it: a failed command leaves nothing that would redirect the next one."""
    existed = out is not None and Path(out).expanduser().exists()
    folder = resolve_out_dir(out)
    created = not existed or folder != Path(out).expanduser()
    try:
        yield folder
    except BaseException:
        if folder.is_dir() and {p.name for p in folder.iterdir()} <= set(scratch):
            for name in scratch:
                (folder / name).unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise
