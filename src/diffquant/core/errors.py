"""The one error type diffquant raises for bad input: its message names the problem and the fix."""

from __future__ import annotations

import errno


class DiffquantError(Exception):
    """A user-facing error; the CLI prints it as one line, without a traceback."""


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so that a terminated run unwinds like Ctrl-C: temporary
    files are removed and finished artifacts stay complete."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def os_error_cause(error: BaseException) -> OSError | None:
    """The OSError behind `error`, following `raise ... from` and implicit chaining: libraries wrap
    them (Quark turns a full disk during ONNX export into a RuntimeError suggesting `dynamo=True`)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno is not None:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def describe_write_error(error: BaseException, where: str | None = None) -> str | None:
    """One line for a full disk or a folder that cannot be written, or None for any other error.

    safetensors and torch's C++ writers report a full disk only in their message, so that is read too."""
    cause = os_error_cause(error)
    place = f" {where}" if where else ""
    text = str(error)
    if (cause is not None and cause.errno in _DISK_FULL) or "No space left on device" in text \
            or "os error 28" in text:
        return f"disk full while writing{place} (No space left on device): free space or pass --out on another disk"
    if cause is not None and cause.errno in _NOT_WRITABLE:
        name = f"{cause.filename}" if cause.filename else (where or "the output folder")
        return f"{cause.strerror.lower()}: {name}: check its permissions or pass a writable --out"
    return None
