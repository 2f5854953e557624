"""Look at an exported graph in Netron, served on 127.0.0.1 only."""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import DiffquantError

logger = logging.getLogger(__name__)
HOST = "127.0.0.1"


def view(onnx_path: str | Path, port: int = 8080, browse: bool = True) -> str:
    """Serve `onnx_path` with Netron on 127.0.0.1:`port` and return its URL.

    Args:
        onnx_path: an .onnx file (or a run's onnx/<recipe>/ folder holding unet.onnx).
        port: local port.
        browse: open a browser tab.

    Returns:
        The URL; the server runs in the background until `wait()` returns or the process ends.
    """
    import netron

    path = Path(onnx_path)
    if path.is_dir():
        path = path / "unet.onnx"
    if not path.is_file():
        raise DiffquantError(f"no ONNX file at {path}: pass a .onnx file written by `diffquant export` or `run`")
    host, bound_port = netron.start(str(path), address=(HOST, port), browse=browse)
    return f"http://{host}:{bound_port}"


def wait() -> None:
    """Block until Ctrl-C, then stop the Netron server."""
    import netron

    try:
        netron.wait()
    except KeyboardInterrupt:
        netron.stop()
