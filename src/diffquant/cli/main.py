"""`diffquant`: a thin command line over the Python API. It parses arguments and calls the API.

One module per command (`run.py`, `bench.py`, ...), each exposing `Command`s (`base.py`); this module builds
the parser from them and wraps the call: logging, threads, SIGTERM, and one-line errors with exit status 2.

Heavy imports (torch, diffusers, Quark, and PIL through `diffquant.core.artifacts`) happen inside the
commands, so `--help`, `view` and `env` answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from diffquant.cli import (bench, compare, docs_tables, env, export, generate, peers, quantize, run, sensitivity,
                           speed_fidelity, view)
from diffquant.cli.base import Command
from diffquant.cli.termination import stop_on_sigterm, stopped_message
from diffquant.core.errors import DiffquantError, Terminated, describe_write_error

# In the order of `diffquant --help`.
COMMANDS: tuple[Command, ...] = (run.COMMAND, sensitivity.COMMAND, generate.COMMAND, quantize.COMMAND,
                                 compare.COMMAND, export.COMMAND, view.COMMAND, bench.BENCH, peers.COMMAND,
                                 bench.BENCH_TABLE, speed_fidelity.COMMAND, docs_tables.COMMAND, env.COMMAND)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffquant", description="Quantize the denoiser of diffusion pipelines "
                                     "(UNet or DiT) with AMD Quark, measure what it costs, export to ONNX.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="debug logs")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads of torch and ONNX Runtime (default: $DIFFQUANT_THREADS, else "
                             "$OMP_NUM_THREADS if set, else the CPUs this process may use)")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_arguments(sub.add_parser(command.name, help=command.help))
    return parser


def configure_threads(requested: int | None = None) -> int | None:
    """Set torch's CPU threads (ONNX Runtime sessions of a run take the same count); returns the count
    set, or None when the user's OMP_NUM_THREADS decides.

    Order: `requested` (--threads), $DIFFQUANT_THREADS, a user-set $OMP_NUM_THREADS (left to torch),
    else the CPUs this process may run on (its affinity mask, which torch's default ignores).
    """
    # Idle OpenMP workers sleep instead of spinning (read when torch first loads). Measured on 2 cores
    # with a 2-thread training beside it: `generate` of 4 shapes-sd images took 274 s with spinning
    # workers, 11.9 s with passive ones, 10.7 s with one thread.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    source = "--threads"
    if requested is None and os.environ.get("DIFFQUANT_THREADS"):
        source, requested = "DIFFQUANT_THREADS", os.environ["DIFFQUANT_THREADS"]
    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        return None
    if requested is None:
        requested = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        threads = int(requested)
    except ValueError:
        threads = 0
    if threads < 1:
        raise DiffquantError(f"{source} must be a whole number of at least 1, got {requested!r}")
    import torch

    torch.set_num_threads(threads)
    return threads


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `diffquant` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    command = next(c for c in COMMANDS if c.name == args.command)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s")
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # Quark's own bars too
        # Imported here: tqdm costs ~50 ms of imports, which only --quiet needs.
        from diffquant.core.progress import set_quiet

        set_quiet(True)
    if not args.verbose:
        import warnings

        warnings.filterwarnings("ignore")  # torch tracer / diffusers deprecation chatter; --verbose shows it
        # diffusers sets its own log level when first imported, so only this reaches its import-time warnings
        # (with optimum-onnx installed: "Multiple distributions found for package optimum").
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        for noisy in ("diffusers", "transformers", "torch.onnx"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    # SIGTERM (kill, a scheduler's timeout) unwinds like Ctrl-C: temporary files are removed; a main thread stuck
    # in one long native call is ended by the watchdog of `termination` after a grace period.
    with stop_on_sigterm(args.command, getattr(args, "out", None)):
        try:
            if command.compute:
                configure_threads(args.threads)
            return command.run(args)
        except DiffquantError as error:
            print(f"diffquant: error: {error}", file=sys.stderr)
            return 2
        except Terminated:
            print(stopped_message(args.command, getattr(args, "out", None)), file=sys.stderr)
            return 128 + signal.SIGTERM
        except KeyboardInterrupt:
            print("diffquant: interrupted; finished artifacts are complete, nothing half-written was kept",
                  file=sys.stderr)
            return 130
        except Exception as error:
            line = describe_write_error(error, getattr(args, "out", None))
            if line is None:
                raise
            print(f"diffquant: error: {line}", file=sys.stderr)
            return 2

if __name__ == "__main__":
    sys.exit(main())
