"""The options of `diffquant peers` (and `python -m diffquant.peers`), kept free of heavy imports so that
`diffquant --help` stays instant."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_METHODS = ("diffquant:w8a8-int8-sq", "diffquant:w8a8-int8-ort-sq", "diffquant:w8a8-int8",
                   "diffquant:w8a8-int8-ort", "diffquant-all:w8a8-int8-sq", "diffquant:w8a8-fp8", "modelopt:int8",
                   "modelopt:int8-sq", "modelopt:fp8", "quanto:w8a8", "diffquant-gguf:q8_0", "gguf:q8_0")

DEFAULT_4BIT_METHODS = ("bnb:nf4", "diffquant-gguf:q4_0", "gguf:q4_0", "gguf:q4_1", "gguf:q4_k", "quanto:w4", "torchao:int4",
                        "nncf:int4")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `diffquant peers` / `python -m diffquant.peers`."""
    parser.add_argument("--model", default=None, help="shapes-sd (default), shapes-sd3, a Hub id or a folder")
    parser.add_argument("--bits", type=int, choices=(8, 4), default=8,
                        help="the default method list: 8-bit recipes and peers, or the 4-bit peers")
    parser.add_argument("--methods", default=None,
                        help="comma-separated library:kind: diffquant:RECIPE, diffquant-all:RECIPE, diffquant-gguf:q4_0|q4_1|int4-w (a "
                             "GGUF file loaded by diffusers), modelopt:int8|"
                             "int8-sq|fp8, quanto:w8a8|w4, bnb:nf4, gguf:q4_0|q4_1|q4_k, torchao:int4[-gN], "
                             "nncf:int4[-gN] (default: those of --bits)")
    parser.add_argument("--n", type=int, default=64, help="evaluation captions (images)")
    parser.add_argument("--calib-size", type=int, default=64, help="calibration captions, the same for every method")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--out", type=Path, required=True, help="folder for peers.json and peers.md")
