"""`diffquant view`: open an ONNX file in Netron on 127.0.0.1."""

from __future__ import annotations

import argparse
import signal

from diffquant.cli.base import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("onnx", help=".onnx file or a folder holding unet.onnx")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--no-browser", action="store_true", help="only print the URL")


def main(args: argparse.Namespace) -> int:
    from diffquant.export.viewer import view, wait

    url = view(args.onnx, args.port, browse=not args.no_browser)
    # Ctrl-C is how the server stops: a process started with SIGINT ignored (a background job, or a parent
    # that ignores it, as one of the test suite's libraries does) would otherwise never stop.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:  # a Ctrl-C right after the message (before wait() listens for it) also stops cleanly
        print(f"Netron serving {args.onnx} at {url} (Ctrl-C to stop)", flush=True)
        wait()
    except KeyboardInterrupt:
        import netron

        netron.stop()
    return 0


# `view` only serves a file: torch threads do not matter.
COMMAND = Command("view", "open an ONNX file in Netron on 127.0.0.1", add_arguments, main, compute=False)
