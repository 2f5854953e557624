"""`diffquant export`: export a quantized denoiser to ONNX and check it in ONNX Runtime."""

from __future__ import annotations

import argparse

from diffquant.cli.base import Command
from diffquant.cli.options import add_int4_compute


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("quantized", help="folder written by `diffquant quantize`")
    p.add_argument("--device", default="auto")
    p.add_argument("--pipeline", action="store_true",
                   help="write the whole pipeline (text encoder, VAE, scheduler, tokenizer, quantized UNet) in the "
                        "folder layout that Optimum's ORTDiffusionPipeline loads")
    add_int4_compute(p)
    p.add_argument("--out", required=True)


def main(args: argparse.Namespace) -> int:
    from diffquant.core.artifacts import output_folder
    from diffquant.export.onnx import export_onnx
    from diffquant.quantization.api import load_quantized

    with output_folder(args.out) as out:
        quantized = load_quantized(args.quantized, args.device, "auto")
        if args.pipeline:
            from diffquant.export.optimum import export_pipeline

            exported = export_pipeline(quantized, out, int4_compute=args.int4_compute)
            print(f"wrote {exported.path} ({exported.size_bytes / 1e6:.1f} MB); run it without diffquant: "
                  f"optimum.onnxruntime.ORTDiffusionPipeline.from_pretrained({str(exported.path)!r})")
            return 0
        result = export_onnx(quantized, out, int4_compute=args.int4_compute)
    print(f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB); ONNX Runtime vs torch: "
          f"max-abs {result.max_abs_error:.2e}, relative {result.relative_error:.2e}")
    return 0


COMMAND = Command("export", "export a quantized denoiser to ONNX and check it in ONNX Runtime", add_arguments, main)
