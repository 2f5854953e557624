"""`diffquant peers`: diffquant's recipes beside other quantization libraries on the same model, captions and
fp32 images. The options live in `diffquant.peers.options` (shared with `python -m diffquant.peers`)."""

from __future__ import annotations

import argparse

from diffquant.cli.base import Command
from diffquant.peers.options import add_arguments


def main(args: argparse.Namespace) -> int:
    from diffquant.peers.eight import run_from_args

    run_from_args(args)
    return 0


COMMAND = Command("peers", "diffquant's recipes beside ModelOpt, optimum-quanto, NNCF, torchao, bitsandbytes "
                           "and GGUF on the same model, captions and fp32 images (8 or 4 bits)", add_arguments, main)
