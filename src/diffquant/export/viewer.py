"""Look at an exported graph in Netron, served on 127.0.0.1 only."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

from diffquant.core.errors import DiffquantError

logger = logging.getLogger(__name__)
HOST = "127.0.0.1"


def view(onnx_path: str | Path, port: int = 8080, browse: bool = True) -> str:
    """Serve `onnx_path` with Netron on 127.0.0.1:`port` and return its URL.

    Args:
        onnx_path: an .onnx file (or a run's onnx/<recipe>/ folder holding unet.onnx or transformer.onnx).
        port: local port.
        browse: open a browser tab.

    Returns:
        The URL; the server runs in the background until `wait()` returns or the process ends.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise DiffquantError(f"port {port!r} is not a TCP port: pass --port between 1 and 65535 (default 8080)")
    path = Path(onnx_path)
    if path.is_dir():
        found = [path / n for n in ("unet.onnx", "transformer.onnx") if (path / n).is_file()]
        path = found[0] if found else path / "unet.onnx"
    if not path.is_file():
        raise DiffquantError(f"no ONNX file at {path}: pass a .onnx file written by `diffquant export` or `run`")
    check_onnx_file(path)
    import netron

    try:
        host, bound_port = netron.start(str(path), address=(HOST, port), browse=browse)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise DiffquantError(f"port {port} on {HOST} is already in use: pass another --port") from None
        raise DiffquantError(f"cannot serve on {HOST}:{port} ({error.strerror or error}): pass another --port") from None
    return f"http://{host}:{bound_port}"


def check_onnx_file(path: Path) -> None:
    """Refuse a file that is not an ONNX model (JSON, empty, truncated), before Netron serves it."""
    import onnx
    from google.protobuf.message import DecodeError

    try:  # the graph only: external weights of a large model are not read
        model = onnx.load_model(str(path), format="protobuf", load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise DiffquantError(f"{path} is not an ONNX model ({type(error).__name__}): pass a .onnx file written "
                             "by `diffquant export` or `run`") from None
    if not model.graph.node or not model.ir_version:
        raise DiffquantError(f"{path} is not an ONNX model (no graph{', empty file' if not path.stat().st_size else ''}):"
                             " pass a .onnx file written by `diffquant export` or `run`")


def wait() -> None:
    """Block until Ctrl-C, then stop the Netron server."""
    import netron

    try:
        netron.wait()
    except KeyboardInterrupt:
        netron.stop()
