"""The UNet as an ONNX Runtime session inside a diffusers pipeline: the text encoder and VAE stay in
torch, every denoising step runs the exported (int8 QDQ or fp32) graph, same seeds as torch."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .errors import DiffquantError

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
# On x86 CPUs, ONNX Runtime's int8 MatMul/Conv kernels multiply u8 activations by s8 weights. Without
# VNNI (AVX2-only CPUs such as AMD EPYC before Zen 4, AVX-512 before Cascade Lake) they use vpmaddubsw,
# which adds each pair of products in int16 and saturates once the pair passes 32767; with int8
# weights beyond [-64, 63] that silently changes results (7% of a fused Linear's outputs in the
# tests; 7.3% instead of 0.6% relative error on shapes-sd W8A8). This key makes ORT store such
# weights as u8 (+128, zero point moved with them: the same products) for its exact u8u8 kernels.
# ORT would act on it on VNNI/AMX CPUs too, where the u8s8 kernels are exact and faster: it is set
# only where the CPU lacks VNNI.
EXACT_INT8_PRODUCTS = "session.x64quantprecision"
_EXACT_U8S8_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


@lru_cache(maxsize=1)
def int8_products_saturate() -> bool:
    """True unless the CPU is known to multiply u8 x s8 without int16 saturation (VNNI or AMX).

    Read from /proc/cpuinfo: neither torch nor ONNX Runtime exposes the VNNI flag publicly. Where the
    flags cannot be read (not Linux), the exact kernels are chosen."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return not (flags & _EXACT_U8S8_FLAGS)


def _quantizes_activations_to_fp8(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    fp8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    return any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in fp8 for n in graph.node)


def session_options(options=None, optimize: bool = True):
    """diffquant's ONNX Runtime session options: all graph optimizations (QDQ fusion into integer
    kernels; `optimize=False` runs the graph as written), warnings only, and int8 products computed
    exactly (`EXACT_INT8_PRODUCTS` where the CPU lacks VNNI). Sets them on `options` when given, else on new options."""
    import onnxruntime as ort

    options = options or ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    if int8_products_saturate():
        options.add_session_config_entry(EXACT_INT8_PRODUCTS, "1")
    return options


def session(path: str | Path, providers: list[str] | tuple[str, ...] | None = None, threads: int | None = None,
            options=None):
    """An ONNX Runtime session with `session_options` (QDQ fusion into integer kernels).

    A graph with fp8 activations runs without the QDQ fusion pass: it has no integer kernel to fuse
    into, and ONNX Runtime 1.31's pass moves fp8 tensors through Transpose, which has no fp8 kernel
    (an invalid-graph error at load)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise DiffquantError(f"no ONNX file at {path}: export one with `diffquant export` or `run`")
    available = ort.get_available_providers()
    providers = list(providers or DEFAULT_PROVIDERS)
    missing = [p for p in providers if p not in available]
    if missing:
        raise DiffquantError(f"ONNX Runtime provider(s) {', '.join(missing)} not available here "
                             f"(available: {', '.join(available)}): install onnxruntime-gpu / onnxruntime-rocm")
    options = session_options(options)
    if threads:
        options.intra_op_num_threads = threads
    disabled = ["QDQSelectorActionTransformer"] if _quantizes_activations_to_fp8(path) else None
    return ort.InferenceSession(str(path), options, providers=providers, disabled_optimizers=disabled)


class OrtUNet(torch.nn.Module):
    """A stand-in for `pipe.unet` that runs an exported UNet graph in ONNX Runtime.

    It keeps the torch UNet's config (the pipeline reads channels and sizes from it) and returns
    torch tensors, so the diffusers pipeline runs unchanged around it.
    """

    def __init__(self, onnx_path: str | Path, config, providers=None, threads: int | None = None):
        super().__init__()
        self.session = session(onnx_path, providers, threads)
        self.config = config
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # inputs and outputs cross as CPU numpy arrays

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=False, **_):
        batch = sample.shape[0]
        timestep = torch.as_tensor(timestep).reshape(-1).expand(batch)
        feed = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states,
                **(added_cond_kwargs or {})}
        arrays = {}
        for name, kind in self.input_types.items():
            value = feed[name].detach().cpu()
            arrays[name] = value.numpy().astype(np.int64 if "int64" in kind else np.float32)
        out = torch.from_numpy(self.session.run(None, arrays)[0])
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)


def session_feed(session_, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The numpy feed of `session_`'s inputs, taken by name from torch `inputs`."""
    return {i.name: inputs[i.name].detach().cpu().numpy() for i in session_.get_inputs()}


def profile_operators(path: str | Path, inputs: dict[str, torch.Tensor], out_dir: str | Path,
                      runs: int = 1) -> tuple[dict[str, float], dict[str, int]]:
    """Where ONNX Runtime spends a UNet call: (milliseconds per call by operator type, operator counts
    of the graph after ORT's fusions). A QLinearConv or MatMulIntegerToFloat is an integer kernel;
    a Conv or MatMul left beside DequantizeLinear nodes ran in float."""
    import json
    from collections import Counter, defaultdict

    import onnx
    import onnxruntime as ort

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(path).parent.name
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(out_dir / stem)
    options.optimized_model_filepath = str(out_dir / f"{stem}.optimized.onnx")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     f"{stem}.optimized.onnx.data")
    profiled = session(path, options=options)
    feed = session_feed(profiled, inputs)
    for _ in range(runs + 1):
        profiled.run(None, feed)
    events = json.loads(Path(profiled.end_profiling()).read_text())
    # The first call includes one-time allocations: count only the nodes of the calls after it.
    first_run = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    warm_from = first_run["ts"] + first_run["dur"]
    per_op = defaultdict(float)
    for event in events:
        if (event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")
                and event["ts"] >= warm_from):
            per_op[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    optimized = onnx.load(str(out_dir / f"{stem}.optimized.onnx"), load_external_data=False)
    ops = Counter(node.op_type for node in optimized.graph.node)
    return dict(sorted(per_op.items(), key=lambda item: -item[1])), dict(ops.most_common())


def ort_pipeline(pipe, onnx_path: str | Path, providers=None, threads: int | None = None):
    """A shallow copy of `pipe` whose UNet runs `onnx_path` in ONNX Runtime (CPU by default; pass
    ["CUDAExecutionProvider"] or ["ROCMExecutionProvider"] on a GPU build of onnxruntime)."""
    ort_pipe = copy.copy(pipe)
    unet = OrtUNet(onnx_path, pipe.unet.config, providers, threads)
    if getattr(pipe.unet, "add_embedding", None) is not None:
        # SDXL pipelines read its input width to check the added conditioning they build.
        unet.add_embedding = pipe.unet.add_embedding
    # Bypass DiffusionPipeline.__setattr__, which would record the stand-in in the pipeline's config.
    object.__setattr__(ort_pipe, "unet", unet)
    return ort_pipe
