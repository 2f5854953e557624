"""Argument groups that several commands share, and the calibration options they read back."""

from __future__ import annotations

import argparse


def add_generation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                   help="prompt (repeatable); default: shapes captions for shapes-sd, the tutorial's rabbit otherwise")
    p.add_argument("--num-images", type=int, help="images in all; prompts are cycled (image k uses seed + k)")
    p.add_argument("--seed", type=int, default=1024, help="seed of the first image (default 1024)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model profile's, e.g. 25 for shapes-sd, "
                                             "50 for SD 1.5, 28 for SD3)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model profile's, e.g. 3 for shapes-sd; "
                                                  "FLUX.1-dev: the distilled guidance input; FLUX.1-schnell: none)")
    add_size(p)


def add_size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's; a multiple of what its "
                                              "VAE and patches take, e.g. 8 for SD 1.5, 16 for SD3 and FLUX.1)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    p.add_argument("--frames", type=int, help="a video model's frames per clip (default: its profile's, 81 for Wan; "
                                              "1 + a multiple of its VAE's temporal step)")


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="shapes-sd (the default, embedded), shapes-sd3 (embedded), a Hub id or a local "
                                   "diffusers folder (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1/2, PixArt, Sana, "
                                   "Z-Image, Qwen-Image, Wan)")
    p.add_argument("--no-t5", action="store_true",
                   help="SD3: load without the T5 text encoder (less memory; prompts read by CLIP only)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (ROCm GPUs are cuda too)")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16 "
                                                   "(bf16: with --no-export only)")


def add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-prompts", metavar="SOURCE",
                   help="calibration prompts: a .txt/.csv/.jsonl/.parquet file, a dataset folder or a Hugging Face "
                        "dataset id, or 'random' for random inputs (a baseline); default for shapes-sd: captions "
                        "drawn with a seed disjoint from evaluation")
    p.add_argument("--calib-size", type=int, default=64, help="calibration prompts (default 64)")
    p.add_argument("--calib-steps", type=int, help="denoising steps of the capture run (default: --steps)")
    p.add_argument("--calib-timesteps", type=int, default=8,
                   help="timesteps kept per trajectory, spread uniformly (default 8; 0 = all)")
    p.add_argument("--calib-column", help="prompt column (default: caption, TEXT, text or prompt)")
    p.add_argument("--calib-split", default="train", help="dataset split (default train)")


def calibration_options(args: argparse.Namespace) -> dict:
    """The `RunConfig` fields that `add_calibration`'s options set."""
    return {"calib_prompts": args.calib_prompts, "calib_size": args.calib_size, "calib_steps": args.calib_steps,
            "calib_timesteps": args.calib_timesteps or None, "calib_column": args.calib_column,
            "calib_split": args.calib_split}


def add_evaluation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", dest="prompt_source", metavar="SOURCE",
                   help="evaluation prompts, the first --num-images of: a .txt/.csv/.jsonl/.parquet file, a dataset "
                        "folder or a Hugging Face dataset id (streamed), as --calib-prompts")
    p.add_argument("--prompts-column", help="prompt column of --prompts (default: caption, TEXT, text or prompt)")
    p.add_argument("--prompts-split", default="train", help="dataset split of --prompts (default train)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default 8); it does not "
                                                             "change the images")
    p.add_argument("--clip-model", metavar="ID_OR_DIR",
                   help="CLIP model for the CLIP score (and FID's features when InceptionV3's are not on disk), "
                        "e.g. openai/clip-vit-large-patch14 or a local folder")
    p.add_argument("--reference-images", metavar="DIR", help="folder of real images: FID of every image set against "
                                                              "them")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (same options): images already there are not generated again")


# export.INT4_COMPUTE's choices, written out: the CLI imports torch (through export) only when a command runs.
INT4_COMPUTE_CHOICES = ("float", "int8", "auto")
INT4_COMPUTE_HELP = ("how ONNX Runtime multiplies 4-bit Linears: float (dequantized weights, exact to torch), "
                     "int8 (inputs rounded to int8 per block, integer dot products: faster at group 128 and above "
                     "on CPUs with VNNI) or auto (int8 with VNNI/AMX, else float); default $DIFFQUANT_INT4_COMPUTE, "
                     "else float")


def add_int4_compute(p: argparse.ArgumentParser) -> None:
    p.add_argument("--int4-compute", choices=INT4_COMPUTE_CHOICES, help=INT4_COMPUTE_HELP)
