"""`diffquant bench`: side-by-side latency, memory and size of the runtimes; `diffquant bench-table`: the
Markdown table of bench.json files."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffquant.cli.base import Command
from diffquant.cli.options import add_int4_compute
from diffquant.models.architectures import ARCHITECTURES


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="pipeline to benchmark (default: shapes-sd)")
    source.add_argument("--arch", help="a real architecture with random weights instead: "
                        f"{', '.join(ARCHITECTURES)} (transformers at reduced depth)")
    p.add_argument("--recipe", default="w8a8-int8-ort",
                   help="recipe(s) of the quantized rows, comma-separated, e.g. w8a8-int8-ort,int4-w-gptq "
                        "(default w8a8-int8-ort)")
    p.add_argument("--iterations", type=int, default=10, help="timed denoiser calls per row (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--batch", type=int, default=2, help="denoiser batch (default 2: one image with guidance; Flux: 1)")
    p.add_argument("--images", type=int, default=2, help="images for the time per image (default 2)")
    p.add_argument("--no-compile", action="store_true", help="skip the fake-quant row through torch.compile")
    p.add_argument("--runtime", help="rows to run, comma-separated: torch,onnxruntime,openvino (default: all)")
    add_int4_compute(p)
    p.add_argument("--peers", default="",
                   help="also measure what a CPU user picks instead, comma-separated: nncf:int8, nncf:int8-hybrid "
                        "(OpenVINO), ort:static-int8 (ONNX Runtime), made from the same fp32 export and calibration")
    p.add_argument("--height", type=int, help="image height in pixels the denoiser inputs stand for (with --width; "
                                              "default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels (with --height)")
    p.add_argument("--frames", type=int, help="a video model's frames per clip the inputs stand for (default: its "
                                              "profile's; 9 for --arch wan)")
    p.add_argument("--out", help="folder for bench.json, bench.png and the ONNX files")


def main(args: argparse.Namespace) -> int:
    from diffquant.core.artifacts import output_folder

    with output_folder(args.out) as out:
        return _bench(args, out)


def _bench(args: argparse.Namespace, out: Path) -> int:
    from diffquant.bench.runner import benchmark

    result = benchmark(model=args.model, arch=args.arch, recipe=args.recipe, iterations=args.iterations,
                       warmup=args.warmup, batch=args.batch, images=args.images, out=out,
                       fake_quant_compiled=not args.no_compile, runtimes=args.runtime,
                       int4_compute=args.int4_compute, peers=args.peers, height=args.height, width=args.width,
                       frames=args.frames)
    print(result.table())
    from diffquant.report.html import write_table_report

    write_table_report(out, f"diffquant bench: {result.model} on {result.cpu}, {result.threads_note()}",
                       ["configuration", "ran", "kernels", "call ms median", "p90", "x fp32 speed", "s/image", "peak MB",
                        "MB", "x size"],
                       [[r.name + (" (simulated)" if r.simulated else ""), f"{r.runtime} {r.runtime_precision}",
                         r.kernels, r.call_ms_median, r.call_ms_p90, r.speedup, r.image_s, r.peak_rss_mb, r.artifact_mb,
                         r.size_ratio] for r in result.rows],
                       "bench.png", result.profile_lines() + result.notes)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.png'} and {out / 'report.html'}")
    return 0


def add_table_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bench_json", nargs="+", help="bench.json written by `diffquant bench`")


def table(args: argparse.Namespace) -> int:
    from diffquant.bench.runner import BenchResult

    from diffquant.core.artifacts import read_json

    for name in args.bench_json:
        data = read_json(Path(name), f"no bench.json at {name}: pass the file `diffquant bench --out DIR` wrote",
                         "a bench.json", "pass the file `diffquant bench` wrote")
        print(BenchResult.from_dict(data).markdown() + "\n")
    return 0


BENCH = Command("bench", "side-by-side latency, memory and size: torch, fake-quant, ONNX Runtime, OpenVINO",
                add_arguments, main)
# `bench-table` only reads JSON files: torch threads do not matter.
BENCH_TABLE = Command("bench-table", "the Markdown table of bench.json files (for docs/)", add_table_arguments, table,
                      compute=False)
