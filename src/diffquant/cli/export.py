"""`diffquant export`: export a quantized denoiser to ONNX (checked in ONNX Runtime) or to GGUF (checked in
diffusers' GGUF loader)."""

from __future__ import annotations

import argparse

from diffquant.cli.base import Command
from diffquant.cli.options import add_int4_compute
from diffquant.core.errors import DiffquantError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("quantized", help="folder written by `diffquant quantize`")
    p.add_argument("--device", default="auto")
    p.add_argument("--pipeline", action="store_true",
                   help="write the whole pipeline (text encoders, VAE, scheduler, tokenizers, quantized UNet or "
                        "transformer) in the folder layout that Optimum's ORTDiffusionPipeline loads")
    p.add_argument("--height", type=int, default=None,
                   help="with --pipeline: the image height a FLUX.1 graph (fixed shapes) is exported for "
                        "(default: the model profile's)")
    p.add_argument("--width", type=int, default=None, help="with --pipeline: the image width, as --height")
    p.add_argument("--format", choices=("onnx", "gguf"), default="onnx",
                   help="onnx (default): ONNX Runtime / OpenVINO; gguf: one GGUF file in the model's original "
                        "checkpoint names, for diffusers' and ComfyUI's GGUF loaders (recipes on a GGML block grid: "
                        "q4_0, int4-w (Q4_0), q4_1 (Q4_1), q8_0 (Q8_0))")
    add_int4_compute(p)
    p.add_argument("--out", required=True)


def main(args: argparse.Namespace) -> int:
    from diffquant.core.artifacts import output_folder
    from diffquant.export.onnx import export_onnx
    from diffquant.quantization.api import load_quantized

    if (args.height is not None or args.width is not None) and not args.pipeline:
        raise DiffquantError("--height/--width size the graph of --pipeline's FLUX.1 export: add --pipeline or "
                             "leave them out")
    with output_folder(args.out) as out:
        quantized = load_quantized(args.quantized, args.device, "auto")
        if args.format == "gguf":
            from diffquant.export.gguf import export_gguf

            if args.pipeline:
                raise DiffquantError("--pipeline writes Optimum's ONNX folder: leave it out with --format gguf")
            written = export_gguf(quantized, out)
            print(f"wrote {written.path} ({written.size_bytes / 1e6:.1f} MB, {written.gguf_type}, "
                  f"{written.block_tensors} block tensors, {written.float_tensors} float); diffusers' GGUF loader "
                  f"read {written.loaded_layers} Linears, {written.exact_layers} equal to the fake-quantized weights "
                  "bit for bit")
            return 0
        if args.pipeline:
            from diffquant.export.optimum import export_pipeline

            exported = export_pipeline(quantized, out, int4_compute=args.int4_compute, height=args.height,
                                       width=args.width)
            print(f"wrote {exported.path} ({exported.size_bytes / 1e6:.1f} MB); run it without diffquant: "
                  f"optimum.onnxruntime.ORTDiffusionPipeline.from_pretrained({str(exported.path)!r})")
            if exported.fixed_shape:
                fixed = exported.fixed_shape
                call = ", ".join(f"{k}={fixed[k]}" for k in ("height", "width", "max_sequence_length") if k in fixed)
                print(f"its transformer graph has fixed shapes: call the pipeline with {call}"
                      + (", one prompt at a time" if fixed.get("batch") == 1 else ""))
            return 0
        result = export_onnx(quantized, out, int4_compute=args.int4_compute)
    print(f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB); ONNX Runtime vs torch: "
          f"max-abs {result.max_abs_error:.2e}, relative {result.relative_error:.2e}")
    return 0


COMMAND = Command("export", "export a quantized denoiser to ONNX (checked in ONNX Runtime) or GGUF (checked in "
                  "diffusers)", add_arguments, main)
