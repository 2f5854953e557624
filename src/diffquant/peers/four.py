"""The 4-bit peers of `python -m diffquant.peers --bits 4`, each run as its library documents, and what
each quantized denoiser really stores (bits per quantized weight, bytes).

- `bnb:nf4`: bitsandbytes NF4 (blocks of 64, fp32 absmax, no double quantization: diffusers'
  `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`) on every Linear. diffusers'
  loader refuses a machine without CUDA/XPU/MPS, so the layers are made as that loader makes them
  (its `replace_with_bnb_linear`, then `Params4bit(...).to(device)`) and run on bitsandbytes' CPU backend.
- `gguf:q4_0`, `gguf:q4_1`, `gguf:q4_k`: the Linear weights whose width the block divides are quantized
  with the `gguf` package's Python quantizer into a GGUF file (the rest F32) that diffusers loads with
  `from_single_file(..., quantization_config=GGUFQuantizationConfig(...))`; its loader runs GGUF only on
  Linear layers. The float copy is that file written all-F32, which must reproduce the baseline.
- `quanto:w4`: optimum-quanto `quantize(weights=qint4)` then `freeze` (its default group size 128;
  layers narrower than a group get one scale per output channel).
- `torchao:int4`: torchao's CPU int4 weight-only layout (`PrototypeInt4WeightOnlyConfig`,
  `Int4OpaqueTensor`, the tinygemm CPU kernel), group 128, on the Linears whose width it divides.
- `nncf:int4`: the fp32 ONNX export read by OpenVINO, `nncf.compress_weights(mode=INT4_SYM,
  group_size=128)` (what `optimum-cli export openvino --weight-format int4 --sym` runs), generated
  through OpenVINO. A different runtime cannot reproduce torch's pixels: the row's notes give the
  OpenVINO fp32 model's own PSNR against the torch baseline instead.

A kind may end in `-gN` to set the group size where the library has one (`torchao:int4-g64`, `nncf:int4-g64`).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from diffquant.core.errors import DiffquantError
from diffquant.peers.base import Peer, PeerRun, PeerUnavailable, Quantized, Storage, register
from diffquant.peers.cpu import fp32_checked, nncf_int8, ov_storage
from diffquant.export.onnx import export_fp32_onnx
from diffquant.models.denoisers import denoiser_of
from diffquant.quantization.calibration import CalibrationConfig, capture_denoiser_inputs
from diffquant.runtimes import get_runtime

logger = logging.getLogger(__name__)


# --- what a module stores ----------------------------------------------------------------------

def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor stores; a wrapper subclass (quanto, torchao) counts the tensors it holds."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _quantized_weight(weight: torch.Tensor) -> tuple[int, int] | None:
    """(weights, stored bytes) of a quantized weight tensor, None for a float one."""
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit: packed codes + what it serializes beside them
        extra = sum(_tensor_bytes(v) for v in quant_state.as_dict(packed=True).values() if isinstance(v, torch.Tensor))
        return math.prod(quant_state.shape), _tensor_bytes(weight) + extra
    quant_type = getattr(weight, "quant_type", None)
    if quant_type is not None and not isinstance(quant_type, str):  # diffusers GGUFParameter: raw GGUF blocks
        import gguf

        if quant_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return None
        block, type_size = gguf.GGML_QUANT_SIZES[quant_type]
        return weight.numel() // type_size * block, weight.numel() * weight.element_size()
    if weight.dtype.is_floating_point and type(weight) in (torch.Tensor, torch.nn.Parameter):
        return None
    return weight.numel(), _tensor_bytes(weight)


def torch_storage(module: torch.nn.Module) -> Storage:
    """What a peer's quantized torch module stores (parameters and buffers, quantized weights packed)."""
    weights = quantized = total = 0
    for _, tensor in [*module.named_parameters(), *module.named_buffers()]:
        found = _quantized_weight(tensor)
        if found is None:
            total += _tensor_bytes(tensor)
            continue
        weights += found[0]
        quantized += found[1]
        total += found[1]
    return Storage(weights, quantized, total)




# --- the peers ------------------------------------------------------------------------------------


def _linears(module: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


def _float_note(module: torch.nn.Module, quantized: int, why: str) -> list[str]:
    """'12 Linear + 40 Conv2d stay float (why)' for the layers a peer leaves alone."""
    linears = len(_linears(module)) - quantized
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())
    kept = " + ".join(f"{n} {kind}" for n, kind in ((linears, "Linear"), (convs, "Conv2d")) if n)
    return [f"{kept} stay float ({why})"] if kept else []


def bnb_nf4(module: torch.nn.Module) -> tuple[int, list[str]]:
    """Every Linear of `module` (in place) as bitsandbytes NF4, made as diffusers' loader makes it."""
    import bitsandbytes as bnb
    from diffusers import BitsAndBytesConfig
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    floats = {name: (m.weight.detach().clone(), m.bias) for name, m in _linears(module)}
    replace_with_bnb_linear(module, modules_to_not_convert=[], quantization_config=config)
    for name, layer in module.named_modules():
        if name in floats and isinstance(layer, bnb.nn.Linear4bit):
            weight, bias = floats[name]
            # diffusers' create_quantized_param: the float weight becomes Params4bit, quantized on .to(device)
            layer._parameters["weight"] = bnb.nn.Params4bit(weight, requires_grad=False,
                                                            **layer.weight.__dict__).to("cpu")
            if bias is not None:
                layer._parameters["bias"] = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
    count = sum(isinstance(m, bnb.nn.Linear4bit) for m in module.modules())
    return count, ["diffusers' bitsandbytes loader refuses CPU-only machines: its layers made directly, "
                   "run on bitsandbytes' CPU backend", *_float_note(module, count, "bitsandbytes: Linear only")]


def quanto_w4(module: torch.nn.Module) -> tuple[int, list[str]]:
    """optimum-quanto int4 weights (float activations) on every Linear and Conv2d of `module`, in place."""
    from optimum.quanto import QModuleMixin, freeze, qint4, quantize

    quantize(module, weights=qint4)
    # diffquant generates under torch.inference_mode, where quanto's int4 weights frozen outside it fail
    # ("Cannot set version_counter for inference tensor"); frozen inside it they run.
    with torch.inference_mode():
        freeze(module)
    count = sum(isinstance(m, QModuleMixin) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                for m in module.modules())
    return count, ["group 128 along the input; narrower layers one scale per output channel"]


def torchao_int4(module: torch.nn.Module, group: int) -> tuple[int, list[str]]:
    """torchao's CPU int4 weight-only layout on the Linears whose width `group` divides, in place."""
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    if group not in (32, 64, 128, 256):
        raise DiffquantError(f"torchao int4 group size {group}: use 32, 64, 128 or 256")
    # Its CPU packing (_convert_weight_to_int4pack_for_cpu) needs the output width to be a multiple of 16.
    quantize_(module, PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False),
              filter_fn=lambda m, _: isinstance(m, torch.nn.Linear) and m.out_features % 16 == 0)
    count = sum(_quantized_weight(m.weight) is not None for _, m in _linears(module))
    return count, [f"group {group}, Int4OpaqueTensor (tinygemm CPU kernel)", *_float_note(
        module, count, f"torchao int4 CPU: Linear only, input width divisible by {group}, output by 16")]


def gguf_file(module: torch.nn.Module, path: Path, kind: str | None) -> int:
    """Write `module`'s state dict as GGUF: the Linear weights whose width the block divides in `kind`
    (None: none), all else F32. Returns the number of quantized Linears."""
    import gguf

    qtype = None if kind is None else gguf_type(kind)
    block = gguf.GGML_QUANT_SIZES[qtype][0] if qtype is not None else None
    linear_weights = {f"{name}.weight" for name, m in _linears(module) if block and m.in_features % block == 0}
    writer = gguf.GGUFWriter(str(path), arch="diffquant")
    for name, tensor in module.state_dict().items():
        data = tensor.detach().float().contiguous().numpy()
        if name in linear_weights:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return len(linear_weights)


def gguf_type(kind: str):
    """The GGML type of `kind` ('q4_0'), or PeerUnavailable when the gguf package cannot quantize to it."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind.upper()]
    try:
        gguf.quants.quantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][0]), np.float32), qtype)
    except NotImplementedError:
        raise PeerUnavailable(f"the gguf package ({_version('gguf')}) has no Python quantizer for {qtype.name} "
                              "(llama.cpp's C quantizer makes it; not installed here)") from None
    return qtype


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def gguf_load(pipe, path: Path) -> torch.nn.Module:
    """The pipeline's denoiser class loaded from a GGUF file by diffusers' single-file loader."""
    from diffusers import GGUFQuantizationConfig

    family = denoiser_of(pipe)
    return type(family.module).from_single_file(
        str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=pipe.name_or_path, subfolder=family.pipeline_attribute, torch_dtype=torch.float32).eval()


def nncf_int4(pipe, group: int, out_dir: Path) -> tuple[object, int, Storage, list[str], Path]:
    """The denoiser exported to ONNX, compressed by NNCF (INT4_SYM, `group`) in OpenVINO, saved under
    `out_dir`. Returns (OpenVINO pipeline, int4 layers, storage, notes, the fp32 ONNX file)."""
    import nncf
    import openvino as ov

    family = denoiser_of(pipe)
    # Traced at the text length the pipeline really feeds its denoiser, read from one captured call (CLIP's
    # for a UNet; CLIP and T5 tokens together for SD3, at the length its call pads T5 to): a graph traced at
    # another length took no other, and OpenVINO answered it with empty outputs.
    fed = capture_denoiser_inputs(pipe, ["a"], CalibrationConfig(size=1, batch_size=1, steps=2, timesteps=1))
    onnx_file = export_fp32_onnx(family.module, out_dir / "fp32",
                                 sequence_length=fed[0]["encoder_hidden_states"].shape[1])
    model = ov.Core().read_model(str(onnx_file))
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    # Layers whose width `group` does not divide are skipped (kept as they are), as for the other peers.
    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=group,
                                       advanced_parameters=AdvancedCompressionParameters(
                                           group_size_fallback_mode=GroupSizeFallbackMode.IGNORE))
    xml = out_dir / "int4" / "denoiser.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(compressed, str(xml), compress_to_fp16=False)
    storage, int4_layers, int8_layers = ov_storage(compressed)
    notes = [f"group {group}; OpenVINO runtime (its seconds are not torch's)"]
    if int8_layers:
        notes.append(f"{int8_layers} more layers int8 per channel (NNCF's backup precision: convolutions and "
                     "the layers it does not count in the int4 ratio); bits/weight counts the int4 layers")
    layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in family.module.modules())
    if layers > int4_layers + int8_layers:
        notes.append(f"{layers - int4_layers - int8_layers} layers stay float (group {group} does not divide "
                     "their width; NNCF's IGNORE fallback)")
    storage = replace(storage, total_bytes=xml.with_suffix(".bin").stat().st_size)
    return get_runtime("openvino").pipeline(pipe, xml, torch.get_num_threads()), int4_layers, storage, notes, onnx_file


@register
class BnbPeer(Peer):
    """bitsandbytes NF4 on every Linear, made as diffusers' loader makes it (see `bnb_nf4`)."""

    libraries = ("bnb",)
    kinds = {"nf4": 4}
    required_packages = ("bitsandbytes",)

    def quantize(self, run: PeerRun, kind: str, group: int | None) -> Quantized:
        peer, module = checked_copy(run)
        layers, notes = bnb_nf4(module)
        return Quantized(peer, layers, torch_storage(module), notes)


@register
class TorchaoPeer(Peer):
    """torchao's CPU int4 weight-only layout (see `torchao_int4`)."""

    libraries = ("torchao",)
    kinds = {"int4": 4}
    required_packages = ("torchao",)
    group_size = 128

    def quantize(self, run: PeerRun, kind: str, group: int | None) -> Quantized:
        peer, module = checked_copy(run)
        layers, notes = torchao_int4(module, group)
        return Quantized(peer, layers, torch_storage(module), notes)


@register
class GgufPeer(Peer):
    """The `gguf` package's Python quantizer into a GGUF file that diffusers' single-file loader reads."""

    libraries = ("gguf",)
    kinds = {"q4_0": 4, "q4_1": 4, "q4_k": 4, "q8_0": 8}
    required_packages = ("gguf",)

    def quantize(self, run: PeerRun, kind: str, group: int | None) -> Quantized:
        from diffquant.quantization.api import with_denoiser

        gguf_type(kind)
        family = denoiser_of(run.pipe)
        path = run.work_dir / f"gguf-{kind}.gguf"
        gguf_file(family.module, path.with_suffix(".f32.gguf"), None)
        run.check(with_denoiser(run.pipe, family.pipeline_attribute, gguf_load(run.pipe, path.with_suffix(".f32.gguf"))))
        layers = gguf_file(family.module, path, kind)
        module = gguf_load(run.pipe, path)
        notes = _float_note(module, layers, "diffusers' GGUF loader: Linear only; width divisible by the block")
        notes.append(f"file {path.stat().st_size} bytes")
        return Quantized(with_denoiser(run.pipe, family.pipeline_attribute, module), layers, torch_storage(module),
                         notes)


@register
class NncfPeer(Peer):
    """NNCF on the fp32 ONNX export, run in OpenVINO: int4 weight compression (`nncf_int4`), and the 8-bit
    quantization a CPU user picks (`int8`, `int8-hybrid`: see `diffquant.peers.cpu`)."""

    libraries = ("nncf",)
    kinds = {"int4": 4, "int8": 8, "int8-hybrid": 8}
    required_packages = ("nncf", "openvino")
    group_size = 128

    def quantize(self, run: PeerRun, kind: str, group: int | None) -> Quantized:
        if kind.startswith("int8"):
            return nncf_int8(run, kind == "int8-hybrid", run.work_dir / f"nncf-{kind}")
        peer, layers, storage, notes, onnx_file = nncf_int4(run.pipe, group, run.work_dir / f"nncf-{kind}-g{group}")
        fidelity = fp32_checked(run, "openvino", onnx_file)
        return Quantized(peer, layers, storage, [f"OpenVINO fp32 vs torch fp32: {fidelity}", *notes])


def checked_copy(run: PeerRun):
    """A pipeline with its own copy of the denoiser, checked to reproduce the fp32 images; (pipeline, module)."""
    from diffquant.quantization.api import with_denoiser

    family = denoiser_of(run.pipe)
    module = copy.deepcopy(family.module)
    peer = with_denoiser(run.pipe, family.pipeline_attribute, module)
    run.check(peer)
    return peer, module
