"""GGUF export: a quantized denoiser as a GGUF file that unmodified diffusers (`from_single_file` with
`GGUFQuantizationConfig`) and ComfyUI-GGUF load, in the model's original checkpoint names
(`models/denoisers/layout.py`), its int4 Linears in GGML Q4_0 blocks (uint4 ones in Q4_1 blocks, int8 ones in
Q8_0 blocks) holding diffquant's codes (GPTQ's for the `q4_0` / `q4_1` / `q8_0` recipes) instead of the
round-to-nearest ones of the `gguf` package and llama.cpp.

Q4_0 is exactly diffquant's int4 grid at group 32: a block of 32 weights is one fp16 scale d and 32 codes q in
0..15, each weight d x (q - 8). The loaders dequantize in fp16; a `q4_0` recipe's scales keep 8 significant
bits (`recipes.gguf_scale_bits`), so every d x (q - 8) is exact in fp16 and the file's weights are the fake-
quantized ones bit for bit. Q4_1 is diffquant's uint4 grid at group 32: fp16 d and m and 32 codes q in 0..15, each
weight d x q + m; Quark's integer zero point z makes m = -d x z, and a `q4_1` recipe's scales keep 7 significant
bits, so that d x q, m and their sum d x (q - z) are all exact in fp16 (bit for bit again). Q8_0 is int8 codes
in blocks of 32 with one fp16 scale; its scales keep all 11 bits, and the loaders' fp16 product d x q is within
half an fp16 step of the fake-quantized weight (`FP16_PRODUCT_BOUND`). Every other tensor (Conv2d, norms, biases, Linears a block does not divide, the
layers the plan keeps float) is F32, as diffusers' GGUF loader replaces Linears only.

Hand-packed: the `gguf` package writes the file (`GGUFWriter`) but quantizes only from float weights with
its own rounding; the block layout is GGML's (byte j of a block's 16 code bytes holds code j in its low
nibble and code j + 16 in its high nibble)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffquant.core.artifacts import atomic_dir
from diffquant.core.errors import DiffquantError
from diffquant.core.recipes import GGUF_BLOCK, GGUF_EXACT, gguf_type
from diffquant.core.record import record_of
from diffquant.export.model_card import base_model_of, facts_for, write_model_card
from diffquant.models.denoisers import Denoiser, denoiser_for, denoiser_of
from diffquant.models.denoisers.layout import check_covers
from diffquant.passes.codes import WeightCodes
from diffquant.quantization.backends import backend_of

logger = logging.getLogger(__name__)
GGUF_VERSION = 1


@dataclass
class GgufExport:
    """What was written: the file, its GGML type, how many tensors are blocks and how many float, the Linear
    and Conv2d weights left float (by name), and the check of the file in diffusers' loader."""

    path: Path
    size_bytes: int
    gguf_type: str
    arch: str
    block_tensors: int
    float_tensors: int
    float_weights: list[str] = field(default_factory=list)
    loaded_layers: int = 0  # Linears diffusers loaded as GGUF blocks, or dequantized at load (`dequantized_layers`)
    exact_layers: int = 0  # of those, dequantized to the fake-quantized weight bit for bit
    dequantized_layers: list[str] = field(default_factory=list)  # block layers the loader keeps float (Wan's time
    # embedder: diffusers' GGUF quantizer dequantizes them at load; they are checked as the float weights it made)
    max_abs_difference: float | None = None  # over every loaded block weight vs the fake-quantized one
    export_seconds: float = 0.0
    version: int = GGUF_VERSION

    def to_dict(self) -> dict:
        return asdict(self) | {"path": str(self.path), "type": "GgufExport"}


def file_name(family: Denoiser) -> str:
    return f"{family.pipeline_attribute}.gguf"


def pack_q4_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """GGML Q4_0 blocks of (N, K) nibbles (int4 code + 8) and their (N, K / 32) fp16-valued scales: an
    (N, K / 32 * 18) uint8 array, each block its scale's two bytes then 16 bytes of codes."""
    n, k = codes.shape
    if k % GGUF_BLOCK or scale.shape != (n, k // GGUF_BLOCK):
        raise ValueError(f"Q4_0 takes blocks of {GGUF_BLOCK} along the input: codes {tuple(codes.shape)}, "
                         f"scales {tuple(scale.shape)}")
    half = scale.to(torch.float16)
    if not torch.equal(half.float(), scale.float()):
        raise ValueError("Q4_0 stores fp16 scales: these are not fp16 values")
    blocks = codes.to(torch.uint8).reshape(n, k // GGUF_BLOCK, GGUF_BLOCK).numpy()
    packed = blocks[..., :16] | (blocks[..., 16:] << 4)
    d = half.numpy().view(np.uint8).reshape(n, k // GGUF_BLOCK, 2)
    return np.concatenate([d, packed], axis=-1).reshape(n, -1)


def pack_q4_1(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> np.ndarray:
    """GGML Q4_1 blocks of (N, K) codes 0..15 and their (N, K / 32) fp16-valued scales d and minima m (each weight
    d x q + m): an (N, K / 32 * 20) uint8 array, each block d's two bytes, m's two bytes, then 16 bytes of codes
    (byte j: code j in the low nibble, code j + 16 in the high one, as Q4_0)."""
    n, k = codes.shape
    if k % GGUF_BLOCK or scale.shape != (n, k // GGUF_BLOCK) or minimum.shape != scale.shape:
        raise ValueError(f"Q4_1 takes blocks of {GGUF_BLOCK} along the input: codes {tuple(codes.shape)}, "
                         f"scales {tuple(scale.shape)}, minima {tuple(minimum.shape)}")
    if int(codes.min()) < 0 or int(codes.max()) > 15:
        raise ValueError("Q4_1 codes are 0..15")
    half, low = scale.to(torch.float16), minimum.to(torch.float16)
    if not (torch.equal(half.float(), scale.float()) and torch.equal(low.float(), minimum.float())):
        raise ValueError("Q4_1 stores fp16 scales and minima: these are not fp16 values")
    blocks = codes.to(torch.uint8).reshape(n, k // GGUF_BLOCK, GGUF_BLOCK).numpy()
    packed = blocks[..., :16] | (blocks[..., 16:] << 4)
    d = half.numpy().view(np.uint8).reshape(n, k // GGUF_BLOCK, 2)
    m = low.numpy().view(np.uint8).reshape(n, k // GGUF_BLOCK, 2)
    return np.concatenate([d, m, packed], axis=-1).reshape(n, -1)


def pack_q8_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """GGML Q8_0 blocks of (N, K) int8 codes and their (N, K / 32) fp16-valued scales: an (N, K / 32 * 34) uint8
    array, each block its scale's two bytes then its 32 codes."""
    n, k = codes.shape
    if codes.dtype != torch.int8 or k % GGUF_BLOCK or scale.shape != (n, k // GGUF_BLOCK):
        raise ValueError(f"Q8_0 takes int8 codes in blocks of {GGUF_BLOCK} along the input: codes "
                         f"{tuple(codes.shape)} {codes.dtype}, scales {tuple(scale.shape)}")
    half = scale.to(torch.float16)
    if not torch.equal(half.float(), scale.float()):
        raise ValueError("Q8_0 stores fp16 scales: these are not fp16 values")
    d = half.numpy().view(np.uint8).reshape(n, k // GGUF_BLOCK, 2)
    q = codes.numpy().view(np.uint8).reshape(n, k // GGUF_BLOCK, GGUF_BLOCK)
    return np.concatenate([d, q], axis=-1).reshape(n, -1)


PACKERS = {"Q4_0": pack_q4_0, "Q4_1": pack_q4_1, "Q8_0": pack_q8_0}


def pack_blocks(qtype: str, value: WeightCodes) -> np.ndarray:
    """One layer's codes as GGML blocks of `qtype`; Q4_1's minimum is m = -scale x zero point (exact in fp16 for a
    `q4_1` recipe's 7-bit scales, `recipes.gguf_scale_bits`)."""
    if qtype == "Q4_1":
        return pack_q4_1(value.codes, value.scale, -value.scale.float() * value.zero.float())
    return PACKERS[qtype](value.codes, value.scale)


def _rows(value) -> int:
    tensor = value.codes if isinstance(value, WeightCodes) else value
    return tensor.shape[0] if tensor.dim() else 1


def original_state(family: Denoiser, state: dict) -> dict[str, torch.Tensor | WeightCodes]:
    """The quantized denoiser's plain state (`QuantBackend.plain_state`) under its original checkpoint names (with
    the family's prefix): float tensors, and `WeightCodes` for the block weights (fused qkv stacked row-wise,
    halves swapped)."""
    rows = {k: _rows(v) for k, v in state.items()}
    try:
        layout = family.original_layout(rows)
        check_covers(layout, rows, family.name)
    except (ValueError, KeyError) as error:
        raise DiffquantError(f"this {family.name} has no original checkpoint layout diffquant can write: {error}") \
            from None
    out = {}
    for name, parts in layout.items():
        values = [state[key] for key, _, _ in parts]
        blocks = [isinstance(v, WeightCodes) for v in values]
        if any(blocks) and not all(blocks):
            raise DiffquantError(f"{name} stacks quantized and float tensors ({', '.join(k for k, _, _ in parts)}): "
                                 "quantize all of them or none (exclude the others with the same pattern)")
        if all(blocks):
            out[family.original_prefix + name] = WeightCodes(
                torch.cat([v.codes[s:e] for v, (_, s, e) in zip(values, parts)]),
                torch.cat([v.scale[s:e] for v, (_, s, e) in zip(values, parts)]), values[0].kind,
                all(v.exact for v in values), values[0].float_dtype,
                None if values[0].zero is None else torch.cat([v.zero[s:e] for v, (_, s, e) in zip(values, parts)]))
        else:
            out[family.original_prefix + name] = torch.cat([v.detach()[s:e] for v, (_, s, e) in zip(values, parts)])
    return out


def export_gguf(pipe_or_module, out_dir: str | Path, check: bool = True) -> GgufExport:
    """Write the quantized denoiser of a pipeline (or a bare quantized denoiser) to `out_dir/<unet|transformer>.gguf`
    (the folder replaced atomically) and, given a pipeline whose folder holds the model's config and `check`,
    load it back with diffusers' GGUF loader and compare every block weight with the fake-quantized one.

    Raises:
        DiffquantError: the recipe's grid is no GGML type (use `q4_0`, `q4_1` or `int4-w`), the family has no original
            layout, or (`check`) the loaded weights differ from the fake-quantized ones.
    """
    try:
        import gguf
    except ImportError:
        raise DiffquantError("GGUF export needs the gguf package: pip install 'diffquant[gguf]'") from None

    module = pipe_or_module if isinstance(pipe_or_module, torch.nn.Module) else denoiser_of(pipe_or_module).module
    record = record_of(module)
    if record.recipe is None:
        raise DiffquantError("this denoiser was not quantized by diffquant.quantize: nothing to export as GGUF")
    qtype = gguf_type(record.recipe)
    if qtype is None:
        raise DiffquantError(f"recipe {record.recipe.name}: its weights are on no GGML block grid, so GGUF cannot hold "
                             "them exactly: quantize with q4_0, q4_1 or q8_0 (GPTQ) or int4-w (round to nearest)")
    started = time.perf_counter()
    family = denoiser_for(module)
    if family.gguf_arch is None:
        from diffquant.models.denoisers.base import DENOISERS

        covered = ", ".join(name for name, cls in DENOISERS.items() if cls.gguf_arch is not None)
        raise DiffquantError(f"{family.module_class} has no GGUF layout in diffquant: GGUF export covers {covered}")
    plain = backend_of(module).plain_state(module)  # each layer's codes, checked against the fake quant once
    state = original_state(family, plain)
    out_dir = Path(out_dir)
    path = out_dir / file_name(family)
    float_weights = sorted(k for k, v in state.items() if not isinstance(v, WeightCodes) and k.endswith(".weight")
                           and v.dim() >= 2)
    with atomic_dir(out_dir) as tmp:
        writer = gguf.GGUFWriter(str(tmp / path.name), arch=family.gguf_arch)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type({"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                              "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
        writer.add_string("general.name", f"{family.module_class} {record.recipe.name} (diffquant)")
        writer.add_string("diffquant.recipe", json.dumps(record.recipe.to_dict()))
        if record.plan is not None:
            writer.add_string("diffquant.plan", record.plan.summary())
        blocks = 0
        for name, value in state.items():
            if isinstance(value, WeightCodes):
                writer.add_tensor(name, pack_blocks(qtype, value), raw_dtype=gguf.GGMLQuantizationType[qtype])
                blocks += 1
            else:
                writer.add_tensor(name, value.float().contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        result = GgufExport(path=path, size_bytes=(tmp / path.name).stat().st_size, gguf_type=qtype,
                            arch=family.gguf_arch, block_tensors=blocks, float_tensors=len(state) - blocks,
                            float_weights=float_weights)
        if check and not isinstance(pipe_or_module, torch.nn.Module):
            _check_loaded(result, load_gguf(pipe_or_module, tmp / path.name), plain,
                          record.recipe.format == "gguf" and qtype in GGUF_EXACT)
        write_model_card(tmp, facts_for(module, base_model_of(pipe_or_module), "gguf", path.name, result.size_bytes))
        result.export_seconds = time.perf_counter() - started
    logger.info("GGUF %s: %s (%.2f MB), %d %s tensors, %d float; diffusers loaded %d block Linears, %d bit-exact",
                qtype, path, result.size_bytes / 1e6, blocks, qtype, result.float_tensors, result.loaded_layers,
                result.exact_layers)
    return result


def load_gguf(pipe, path: str | Path) -> torch.nn.Module:
    """The pipeline's denoiser class loaded from a GGUF file by diffusers' own single-file loader (its config
    from the pipeline's folder or Hub id, float32 compute), as a user of the file would load it."""
    from diffusers import GGUFQuantizationConfig

    family = denoiser_of(pipe)
    local = Path(str(pipe.name_or_path)).is_dir()
    return type(family.module).from_single_file(
        str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(pipe.name_or_path), subfolder=family.pipeline_attribute, torch_dtype=torch.float32,
        local_files_only=local).eval()


# The loaders multiply scale x code in fp16: with any fp16 scale (a recipe not made for GGUF, such as int4-w) the
# product is rounded to fp16, at most half an fp16 step of the weight away from the fake-quantized one.
FP16_PRODUCT_BOUND = 2.0 ** -11


def _check_loaded(result: GgufExport, loaded: torch.nn.Module, plain: dict, bit_exact: bool) -> None:
    """Every Linear diffusers loaded as blocks dequantizes to the plain state's codes x scales (the fake-
    quantized weight): bit for bit when `bit_exact` (a "gguf" recipe), within `FP16_PRODUCT_BOUND` of each weight
    for any other; counted into `result`, raised when one is off or the loaded Linears are not the quantized ones."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    worst, exact, count, first = 0.0, 0, 0, None
    dequantized = []
    for name, layer in loaded.named_modules():
        weight = getattr(layer, "weight", None)
        if weight is None:
            continue
        blocks = hasattr(weight, "quant_type")
        stored = plain.get(f"{name}.weight")
        if not blocks:
            if not isinstance(stored, WeightCodes):
                continue  # a float layer of the file
            dequantized.append(name)  # the loader's own choice to keep it float: its float weight is checked
        elif not isinstance(stored, WeightCodes):
            raise DiffquantError(f"diffusers loaded {name} from the GGUF file as blocks, but it is not quantized")
        count += 1
        expected = stored.dequantized()
        got = dequantize_gguf_tensor(weight).float() if blocks else weight.detach().float()
        worst = max(worst, float((got - expected).abs().max()))
        same = torch.equal(got, expected) and stored.exact
        exact += same
        close = bool(((got - expected).abs() <= expected.abs() * FP16_PRODUCT_BOUND).all()) and stored.exact
        first = first or (None if (same or (close and not bit_exact)) else name)
    result.dequantized_layers = dequantized
    result.loaded_layers, result.exact_layers, result.max_abs_difference = count, exact, worst
    quantized = sum(isinstance(v, WeightCodes) for v in plain.values())
    if count != quantized or first is not None:
        raise DiffquantError(f"diffusers' GGUF loader gave {count} block Linears ({exact} equal to the fake-quantized "
                             f"weights, max difference {worst:.3g}; first that differs: {first}) for {quantized} "
                             "quantized Linears: the file is wrong")
