"""`diffquant env`: versions, devices, the CPU and what diffquant chose from it."""

from __future__ import annotations

import argparse
import os

from diffquant.cli.base import Command, no_arguments
from diffquant.core.cpu import OVERRIDES, decisions


def main(args: argparse.Namespace) -> int:
    # Imported here: importlib.metadata costs ~20 ms (email, zipfile), and only `env` needs it.
    from importlib import metadata

    for name in ("diffquant", "torch", "diffusers", "transformers", "amd-quark", "onnx", "onnxruntime",
                 "openvino", "torchmetrics", "netron"):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{name:<14} {version}")
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    backend = "ROCm " + torch.version.hip if getattr(torch.version, "hip", None) else \
        ("CUDA " + torch.version.cuda if torch.version.cuda else "CPU build")
    print(f"{'torch build':<14} {backend}; GPU: {gpu}; CPU threads: {torch.get_num_threads()} "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")
    compile_setting = os.environ.get("QUARK_DISABLE_COMPILE")
    print(f"{'quark compile':<14} QUARK_DISABLE_COMPILE={compile_setting or 'unset'} "
          f"(diffquant sets 1 on CPU unless you set it)")
    from diffquant.models.pipeline import shapes_sd_path

    print(f"{'shapes-sd':<14} {shapes_sd_path()}")
    decided = decisions()
    print(f"{'CPU':<14} {decided.cpu.describe()}")
    print("decided from the CPU (override with the variable named):")
    for name, decision in decided.items():
        print(f"  {name:<19} {decision.value:<6} {OVERRIDES[name][0]:<29} {decision.reason}")
    return 0


COMMAND = Command("env", "versions, devices, the CPU and what diffquant chose from it", no_arguments, main)
