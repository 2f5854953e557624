"""Stage 6, export: the quantized UNet to ONNX through Quark's exporter, checked by onnx.checker and
run in ONNX Runtime against the torch quantized UNet."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .artifacts import atomic_dir
from .errors import DiffquantError

logger = logging.getLogger(__name__)
ONNX_NAME = "unet.onnx"
# ORT and Quark's torch fake-quant disagree by about one int8 step on a few values: Quark's symmetric
# scale is amax/127.5, so a tensor's extreme lands on a rounding boundary that the two round
# differently (weights), and W8A8 re-rounds activations that sit near a boundary. Measured here: 0.2%
# relative L2 error weight-only, 0.6% with W8A8 on shapes-sd; 5% catches a wrong graph (fp32 weights,
# missing Q/DQ, wrong scales all give > 10%) without failing on these rounding ties.
MAX_RELATIVE_ERROR = 0.05
# Quantizing Conv outputs as well (recipes with conv_output) re-rounds every Conv result, and ONNX
# Runtime's fused QLinearConv requantizes its int32 accumulator directly: measured 7.4% on shapes-sd
# (2.8% with ORT's graph optimizations off), while its images stay within the PSNR bound of the tests.
MAX_RELATIVE_ERROR_WITH_OUTPUTS = 0.10


def relative_error_bound(unet: torch.nn.Module) -> float:
    """The ORT-vs-torch bound for this quantized UNet: looser when layer outputs are quantized too."""
    outputs = any(getattr(m, "_output_quantizer", None) is not None for m in unet.modules())
    return MAX_RELATIVE_ERROR_WITH_OUTPUTS if outputs else MAX_RELATIVE_ERROR


class _UNetForExport(torch.nn.Module):
    """Positional tensors in, one tensor out: what ONNX tracing needs (SDXL's added conditioning as inputs)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.sdxl = unet.config.addition_embed_type == "text_time"

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


def example_inputs(unet: torch.nn.Module, batch_size: int = 2, sequence_length: int = 77,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """UNet inputs shaped from the UNet's own config (latent channels and size, cross-attention width,
    SDXL's added text/time conditioning): nothing hard-coded to SD 1.5."""
    config = unet.config
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    cross = config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    gen = torch.Generator().manual_seed(seed)
    device, dtype = unet.device, unet.dtype
    inputs = {
        "sample": torch.randn(batch_size, config.in_channels, height, width, generator=gen),  # (B, C, h, w)
        "timestep": torch.full((batch_size,), 500, dtype=torch.int64),  # (B,)
        "encoder_hidden_states": torch.randn(batch_size, sequence_length, cross, generator=gen),  # (B, T, D)
    }
    if config.addition_embed_type == "text_time":  # SDXL: pooled text embeds + 6 size/crop ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["text_embeds"] = torch.randn(batch_size, pooled, generator=gen)
        inputs["time_ids"] = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(batch_size, 1)
    return {k: v.to(device) if v.dtype == torch.int64 else v.to(device, dtype) for k, v in inputs.items()}


@contextlib.contextmanager
def _dynamic_batch(dynamic_axes: dict):
    """Quark's export_onnx has no dynamic_axes argument; pass them through to the torch.onnx.export it calls."""
    original = torch.onnx.export

    def export(*args, **kwargs):
        kwargs.setdefault("dynamic_axes", dynamic_axes)
        return original(*args, **kwargs)

    torch.onnx.export = export
    try:
        yield
    finally:
        torch.onnx.export = original


@dataclass
class OnnxExport:
    """What was exported and how closely ONNX Runtime reproduces the torch quantized UNet."""

    path: Path
    size_bytes: int
    inputs: dict[str, list]
    op_counts: dict[str, int]
    max_abs_error: float
    relative_error: float
    export_seconds: float
    relative_error_bound: float = MAX_RELATIVE_ERROR
    weight_dtypes: dict[str, int] = field(default_factory=dict)
    compression: dict = field(default_factory=dict)
    fusion: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "size_bytes": self.size_bytes, "inputs": self.inputs,
                "op_counts": self.op_counts, "weight_dtypes": self.weight_dtypes, "compression": self.compression,
                "fusion": self.fusion,
                "max_abs_error": self.max_abs_error, "relative_error": self.relative_error,
                "relative_error_bound": self.relative_error_bound, "export_seconds": self.export_seconds}


def _sequence_length(pipe_or_unet) -> tuple[torch.nn.Module, int]:
    tokenizer = getattr(pipe_or_unet, "tokenizer", None)
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    return unet, (tokenizer.model_max_length if tokenizer is not None else 77)


# Protobuf cannot serialize a model of 2 GB or more (an SD 1.5 UNet is 3.4 GB in fp32), and Quark's
# export passes re-save the whole model with plain onnx.save. Above this size every save writes
# the tensors to one external data file beside the graph instead.
EXTERNAL_DATA_ABOVE_BYTES = 1_800_000_000
_EXTERNAL_DATA = {"save_as_external_data": True, "all_tensors_to_one_file": True, "size_threshold": 1024}


def _dynamic_axes(names: list[str]) -> dict:
    return {name: {0: "batch"} for name in names} | {"out_sample": {0: "batch"}}


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@contextlib.contextmanager
def _external_data_saves(model_bytes: int):
    """While active, onnx.save/save_model write external data (replacing a previous data file) when the
    model exported is large; small models keep the single self-contained file."""
    import onnx

    if model_bytes < EXTERNAL_DATA_ABOVE_BYTES:
        yield
        return
    original = onnx.save_model

    def save_model(proto, f, *args, **kwargs):
        path = Path(f)
        data = path.with_name(path.name + ".data")
        if isinstance(proto, onnx.ModelProto):
            if data.exists():
                data.unlink()  # onnx appends to an existing data file
            kwargs.update(_EXTERNAL_DATA, location=data.name)
        return original(proto, f, *args, **kwargs)

    onnx.save_model = onnx.save = save_model
    try:
        yield
    finally:
        onnx.save_model = onnx.save = original


def _save(model, path: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(model, str(path), location=path.name + ".data", **_EXTERNAL_DATA)
    else:
        onnx.save_model(model, str(path))


def export_fp32_onnx(unet: torch.nn.Module, out_dir: str | Path, sequence_length: int = 77,
                     batch_size: int = 2) -> Path:
    """Export the float UNet (the reference for ONNX Runtime speed) to `out_dir/unet.onnx`, with the
    same named inputs and dynamic batch as the quantized export."""
    inputs = example_inputs(unet, batch_size, sequence_length)
    names = list(inputs)
    wrapper = _UNetForExport(unet).eval()
    model_bytes = _param_bytes(unet)
    with atomic_dir(Path(out_dir)) as tmp, torch.no_grad():
        torch.onnx.export(wrapper, tuple(inputs.values()), str(tmp / ONNX_NAME), input_names=names,
                          output_names=["out_sample"], dynamo=False, opset_version=20,
                          dynamic_axes=_dynamic_axes(names),
                          external_data=model_bytes >= EXTERNAL_DATA_ABOVE_BYTES)
    return Path(out_dir) / ONNX_NAME


def export_onnx(pipe_or_unet, out_dir: str | Path, batch_size: int = 2, sequence_length: int | None = None,
                check: bool = True) -> OnnxExport:
    """Export a quantized UNet to `out_dir/unet.onnx` with Quark, then check it.

    The un-frozen model is exported (a frozen one would write fake-quantized float weights, as big
    as fp32), then `compress_weights` stores every quantized weight as INT8 or FLOAT8E4M3FN codes
    feeding DequantizeLinear, bit-exact with Quark's fake-quantized weights, and
    `prepare_for_ort_fusion` puts the graph in the form ONNX Runtime fuses into integer kernels.

    Args:
        pipe_or_unet: a pipeline from `quantize` (its tokenizer gives the text length) or a UNet.
        out_dir: folder to write to (replaced atomically: an interrupted export leaves nothing behind).
        batch_size: batch of the example inputs; the batch axis is dynamic in the graph.
        sequence_length: text tokens of the example inputs (default: the pipeline tokenizer's, or 77).
        check: raise when ONNX Runtime's output differs from torch's by more than
            `relative_error_bound(unet)` (False: only report it, for random-weight UNets whose
            activations sit on rounding ties far more often than a trained UNet's).

    Returns:
        An `OnnxExport` with the measured ORT-vs-torch error.
    """
    import onnx

    from .compress import compress_weights
    from .ort_fusion import prepare_for_ort_fusion
    from .backends.quark import import_quark

    unet, default_length = _sequence_length(pipe_or_unet)
    sequence_length = sequence_length or default_length
    quark_torch = import_quark(unet.device)
    inputs = example_inputs(unet, batch_size, sequence_length)
    names = list(inputs)
    wrapper = _UNetForExport(unet).eval()
    with torch.no_grad():
        reference = wrapper(**inputs).float().cpu().numpy()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        model_bytes = _param_bytes(unet)
        with _dynamic_batch(_dynamic_axes(names)), _external_data_saves(model_bytes), torch.no_grad():
            quark_torch.export_onnx(wrapper, tmp, tuple(inputs.values()), input_names=names,
                                    output_names=["out_sample"])
        model = onnx.load(str(tmp / "quark_model.onnx"))
        compression = compress_weights(model, unet)
        fusion = prepare_for_ort_fusion(model)
        for leftover in tmp.iterdir():
            leftover.unlink()
        _save(model, tmp / ONNX_NAME, external=model_bytes >= EXTERNAL_DATA_ABOVE_BYTES)
        onnx.checker.check_model(str(tmp / ONNX_NAME))
    seconds = time.perf_counter() - started
    path = out_dir / ONNX_NAME
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    weight_dtypes = Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer)
    output = run_onnx(path, inputs)
    max_abs = float(np.abs(output - reference).max())
    relative = float(np.linalg.norm(output - reference) / max(np.linalg.norm(reference), 1e-12))
    result = OnnxExport(
        path=path, size_bytes=sum(f.stat().st_size for f in out_dir.iterdir()),
        inputs={k: list(v.shape) for k, v in inputs.items()}, op_counts=dict(ops.most_common()),
        max_abs_error=max_abs, relative_error=relative, export_seconds=seconds, weight_dtypes=dict(weight_dtypes),
        compression=compression.to_dict(), fusion=fusion.to_dict(), relative_error_bound=relative_error_bound(unet),
    )
    if check and not (math.isfinite(relative) and relative <= result.relative_error_bound):
        raise DiffquantError(f"ONNX Runtime output of {path} differs from the torch quantized UNet by "
                             f"{relative:.1%} (bound {result.relative_error_bound:.0%}, max-abs {max_abs:.3g}): "
                             "the export is wrong")
    logger.info("exported %s (%.1f MB), ORT vs torch: max-abs %.2e, relative %.2e",
                path, result.size_bytes / 1e6, max_abs, relative)
    return result


def run_onnx(path: str | Path, inputs: dict[str, torch.Tensor], providers: list[str] | None = None) -> np.ndarray:
    """Run an exported UNet in ONNX Runtime on torch inputs; returns the output as float32 numpy."""
    from .runtime import session, session_feed

    runner = session(path, providers)
    return runner.run(None, session_feed(runner, inputs))[0].astype(np.float32)
