"""Stopping when asked: SIGTERM (a scheduler's timeout, `kill`, CI) ends a command within seconds, keeping what it
finished and leaving nothing half-written.

Python runs a signal handler only between bytecodes of the main thread, so the handler (which raises `Terminated`,
unwinding like Ctrl-C: atomic writes remove their temporary files) waits while the main thread is inside one long
native call, such as one denoiser step of FLUX.1 at 1024x1024 on two cores, which takes minutes. The C-level
handler still writes the signal's number to the wakeup fd at once (`signal.set_wakeup_fd`); a watchdog thread
reads it and, if the main thread has not unwound `GRACE_S` seconds later, removes the temporary files of the
atomic writes in progress (`core.artifacts.remove_in_flight`) and ends the process with status 143."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from diffquant.core.artifacts import remove_in_flight
from diffquant.core.errors import Terminated

GRACE_S = 5.0  # seconds the main thread gets to unwind by itself


def _terminate(signum, frame):
    raise Terminated


def stopped_message(command: str, out: str | None = None) -> str:
    """The line a terminated command ends with; a run that kept results says how to go on from them."""
    kept = command == "run" and out is not None and (Path(out).expanduser() / "results.json").is_file()
    hint = " (the same command with --resume goes on from there)" if kept else ""
    return f"diffquant: terminated; finished artifacts are complete{hint}, nothing half-written was kept"


@contextlib.contextmanager
def stop_on_sigterm(command: str, out: str | None = None) -> Iterator[None]:
    """While active (in the main thread), SIGTERM raises `Terminated` in the main thread and, when that thread is
    stuck in native code for `GRACE_S`, the watchdog cleans up and exits."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live there only
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    previous = signal.signal(signal.SIGTERM, _terminate)
    finished = threading.Event()

    def watch() -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data or finished.is_set():
                return
            if signal.SIGTERM in data and not finished.wait(GRACE_S):
                remove_in_flight()
                sys.stderr.write(stopped_message(command, out) + " (stopped inside a long native call)\n")
                sys.stderr.flush()
                os._exit(128 + signal.SIGTERM)

    watchdog = threading.Thread(target=watch, name="diffquant-sigterm", daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        finished.set()
        signal.signal(signal.SIGTERM, previous)
        signal.set_wakeup_fd(previous_fd)
        os.close(write_fd)  # the watchdog reads end-of-file and returns
        watchdog.join(timeout=1.0)
        os.close(read_fd)
