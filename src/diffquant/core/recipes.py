"""Quantization recipes: small frozen dataclasses and a name table for the CLI. Backend-free: each
backend maps a recipe to its own configuration (Quark's in `backends/quark/config.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from diffquant.core.errors import DiffquantError

RECIPE_VERSION = 10
# version 1 had no conv_output, 2 no smoothing, 3 no 4-bit dtypes nor fallback, 4 no algorithm,
# 5 no SVDQuant "smooth" (it always smoothed), 6 no "format", 7 no int8 PerGroup (GGUF Q8_0) weights,
# 8 no "attention" (int8 inputs of attention's two matmuls), 9 no uint4 (GGUF Q4_1) weights
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
# uint4: asymmetric 4-bit codes q in 0..15 with one scale s and one integer zero point z in 0..15 per group, each
# weight s x (q - z) (Quark's Uint4PerGroupSpec): GGUF's Q4_1 blocks, whose d = s and m = -s x z.
INT8, FP8, INT4, UINT4, MXFP4 = "int8", "fp8_e4m3", "int4", "uint4", "mxfp4"
DTYPES = (INT8, FP8, INT4, UINT4, MXFP4)
FOUR_BIT = (INT4, UINT4, MXFP4)  # per-group weights of Linear layers only
GROUP_SIZES = (16, 32, 64, 128, 256)  # powers of two that ONNX Runtime's MatMulNBits takes as block_size
MX_GROUP = 32  # OCP MX: one shared power-of-two scale per 32 elements
GGUF_BLOCK = 32  # GGML's Q4_0 / Q4_1 / Q8_0 block: 32 weights share one fp16 scale (and Q4_1 one fp16 minimum)
# Where a recipe's quantized denoiser is meant to run: "onnx" (ONNX Runtime / OpenVINO) or "gguf" (a GGUF file for
# diffusers' and ComfyUI's GGUF loaders). A "gguf" recipe's block scales are fp16 values whose products with every
# code are exact in fp16, the arithmetic those loaders dequantize in (`gguf_scale_bits`).
FORMATS = ("onnx", "gguf")
OBSERVERS = ("min_max", "percentile", "MSE")
SVDQUANT_MODES = ("w4a16", "w4a4")


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel (axis 0 of Linear and Conv2d weights)."""

    axis: int = 0


@dataclass(frozen=True)
class PerGroup:
    """One scale per `size` consecutive input elements of each output row (4-bit weights of Linear layers;
    a Linear whose input width `size` does not divide is left to the recipe's `fallback`)."""

    size: int

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or self.size not in GROUP_SIZES:
            raise DiffquantError(f"group size {self.size!r} is not supported: use one of "
                                 f"{', '.join(map(str, GROUP_SIZES))}")


Granularity = PerTensor | PerChannel | PerGroup


@dataclass(frozen=True)
class Smoothing:
    """SmoothQuant-style activation smoothing before quantization (see `diffquant.quantization.smoothing`): per input
    channel, s = max|X|^a / max|W|^(1-a), folded into the op before the layer; for each group of layers
    the exponent a is chosen among `alphas` (or no smoothing) by the simulated W8A8 error of its
    outputs on calibration inputs."""

    alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)

    def __post_init__(self) -> None:
        if not isinstance(self.alphas, tuple) or not self.alphas \
                or not all(isinstance(a, (int, float)) and 0 < a <= 1 for a in self.alphas):
            raise DiffquantError(f"smoothing alphas must be a non-empty tuple of numbers in (0, 1], got {self.alphas!r}")


@dataclass(frozen=True)
class SVDQuant:
    """SVDQuant (Li et al. 2024, through Quark; see `backends/quark/svdquant.py`) on the Linears a 4-bit
    int4 weight takes: the input is divided by a per-channel smoothing factor (exponent searched per
    layer on calibration inputs), a float rank-`rank` branch carries the top singular directions of the
    smoothed weight and the int4 per-group residual is rounded by GPTQ (`gptq`) or to nearest. Rank 0
    keeps the smoothing and the GPTQ residual without a branch. `mode` "w4a4" also quantizes the
    residual's inputs to int4 per group, dynamically (one scale per group of each row, per call).
    `smooth` False leaves the inputs undivided: no smoothing divisor is stored (16 bits per input
    channel of each layer, 16 / out_features bits per weight)."""

    rank: int = 16
    mode: str = "w4a16"
    gptq: bool = True
    smooth: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise DiffquantError(f"SVDQuant rank must be a whole number >= 0 (0: no low-rank branch), got {self.rank!r}")
        if self.mode not in SVDQUANT_MODES:
            raise DiffquantError(f"SVDQuant mode {self.mode!r} is not one of {', '.join(SVDQUANT_MODES)}")
        if not isinstance(self.gptq, bool):
            raise DiffquantError(f"SVDQuant gptq must be true or false, got {self.gptq!r}")
        if not isinstance(self.smooth, bool):
            raise DiffquantError(f"SVDQuant smooth must be true or false, got {self.smooth!r}")


@dataclass(frozen=True)
class TensorQuant:
    """How one kind of tensor (weights or input activations) is quantized: static scales, symmetric (uint4:
    asymmetric, an integer zero point per group)."""

    dtype: str
    granularity: Granularity = field(default_factory=PerTensor)
    observer: str = "min_max"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise DiffquantError(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.observer not in OBSERVERS:
            raise DiffquantError(f"unknown observer {self.observer!r}: use one of {', '.join(OBSERVERS)}")
        if not isinstance(self.granularity, (PerTensor, PerChannel, PerGroup)):
            raise DiffquantError(f"granularity must be PerTensor(), PerChannel() or PerGroup(size), "
                                 f"not {self.granularity!r}")
        if self.dtype in FOUR_BIT and not isinstance(self.granularity, PerGroup):
            raise DiffquantError(f"dtype {self.dtype} with {type(self.granularity).__name__}(): 4-bit dtypes "
                                 f"({', '.join(FOUR_BIT)}) take PerGroup(size)")
        if isinstance(self.granularity, PerGroup) and self.dtype not in (*FOUR_BIT, INT8):
            raise DiffquantError(f"dtype {self.dtype} with PerGroup(): groups are for 4-bit dtypes and int8 "
                                 "(GGUF's Q8_0 blocks)")
        if self.dtype == MXFP4 and self.granularity.size != MX_GROUP:
            raise DiffquantError(f"mxfp4 shares one scale per {MX_GROUP} elements (OCP MX), got "
                                 f"PerGroup({self.granularity.size}): use PerGroup({MX_GROUP})")


@dataclass(frozen=True)
class Recipe:
    """A named quantization scheme for the Linear and Conv2d layers of a denoiser (UNet or transformer).

    `activation` None means weight-only (no calibration data needed). `conv_output` also quantizes
    the outputs of Conv2d layers: ONNX Runtime runs a Conv as an integer QLinearConv only when its
    output is quantized, otherwise it dequantizes and runs the float Conv. `exclude` holds fnmatch
    patterns over module names (e.g. "conv_in", "*time_emb*") that stay in float. A 4-bit `weight`
    (PerGroup) applies to the Linear layers whose input width the group size divides; the other
    Linears and every Conv2d take `fallback` (8-bit) or stay float without one, and the layer report
    says why. `algorithm` (SVDQuant) replaces round-to-nearest on the Linears an int4 weight takes; it
    reads calibration data. `attention` quantizes the inputs of each attention's two matmuls (Q.K^T and P.V:
    query, key and value int8, softmax probabilities uint8; static per-tensor ranges, calibrated; see
    `diffquant.quantization.attention`), as NNCF's transformer mode does.
    """

    name: str
    weight: TensorQuant
    activation: TensorQuant | None = None
    exclude: tuple[str, ...] = ()
    description: str = ""
    conv_output: TensorQuant | None = None
    smoothing: Smoothing | None = None
    fallback: TensorQuant | None = None
    algorithm: SVDQuant | None = None
    format: str = "onnx"
    attention: TensorQuant | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or any(c in self.name for c in "/\\") \
                or self.name in (".", ".."):
            raise DiffquantError(f"recipe name {self.name!r} cannot name a folder: use letters, digits and dashes")
        if isinstance(self.exclude, (list, str)):
            raise DiffquantError(f"Recipe.exclude must be a tuple of patterns, not {type(self.exclude).__name__}")
        if self.conv_output is not None and self.activation is None:
            raise DiffquantError(f"recipe {self.name}: conv_output needs activation quantization as well")
        if self.attention is not None and (self.activation is None or self.attention.dtype != INT8
                                           or not isinstance(self.attention.granularity, PerTensor)):
            raise DiffquantError(f"recipe {self.name}: attention quantization is int8 PerTensor() on a recipe that "
                                 "quantizes activations (W8A8)")
        if self.smoothing is not None and self.activation is None:
            raise DiffquantError(f"recipe {self.name}: smoothing moves activation outliers into the weights and "
                                 "needs activation quantization as well")
        if self.per_group and not self.four_bit and (self.activation is not None or self.format != "gguf"):
            raise DiffquantError(f"recipe {self.name}: int8 PerGroup weights are GGUF's Q8_0 blocks: weight-only, "
                                 "format gguf")
        if self.weight.dtype == UINT4 and self.format != "gguf":
            raise DiffquantError(f"recipe {self.name}: uint4 weights (asymmetric, a zero point per group) are GGUF's "
                                 "Q4_1 blocks: format gguf")
        if self.fallback is not None and (not self.four_bit or self.fallback.dtype in FOUR_BIT):
            raise DiffquantError(f"recipe {self.name}: fallback is the 8-bit weight of the layers a 4-bit weight "
                                 "cannot take; it needs a 4-bit (PerGroup) weight and an 8-bit fallback")
        if self.four_bit and self.activation is not None:
            raise DiffquantError(f"recipe {self.name}: 4-bit weights are weight-only here; drop the activation")
        if self.format not in FORMATS:
            raise DiffquantError(f"recipe {self.name}: format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.format == "gguf" and gguf_type(self) is None:
            raise DiffquantError(f"recipe {self.name}: format gguf needs weights on a GGML block grid (int4, "
                                 f"uint4 or int8 PerGroup({GGUF_BLOCK}), weight-only, no smoothing, branch or "
                                 "fallback)")
        if self.algorithm is not None:
            if not isinstance(self.algorithm, SVDQuant):
                raise DiffquantError(f"recipe {self.name}: algorithm must be SVDQuant(rank, mode, gptq) or None, "
                                     f"not {self.algorithm!r}")
            if not self.per_group or self.weight.dtype not in (INT4, UINT4, INT8) or self.fallback is not None:
                raise DiffquantError(f"recipe {self.name}: SVDQuant takes an int4 PerGroup weight and no fallback, "
                                     f"got {self.weight.dtype}{' with a fallback' if self.fallback else ''}")

    @property
    def four_bit(self) -> bool:
        """True when the Linear weights are 4-bit per group (int4 or mxfp4)."""
        return self.weight.dtype in FOUR_BIT

    @property
    def per_group(self) -> bool:
        """True when the Linear weights have one scale per group of inputs (4-bit, or int8 GGUF Q8_0 blocks):
        Conv2d and the Linears the group does not divide take the fallback or stay float."""
        return isinstance(self.weight.granularity, PerGroup)

    @property
    def has_onnx_form(self) -> bool:
        """False for a recipe whose weights diffquant writes as GGUF only (int8 blocks, GGUF's Q8_0; uint4, Q4_1)."""
        return not (self.per_group and self.weight.dtype in (INT8, UINT4))

    @property
    def needs_calibration(self) -> bool:
        """True when quantizing runs calibration inputs (static activation scales, SVDQuant's statistics)."""
        return self.activation is not None or self.algorithm is not None

    def to_dict(self) -> dict:
        """A JSON-able description with a type and a version, written next to every run's outputs."""
        def quant(q: TensorQuant | None):
            if q is None:
                return None
            return {"dtype": q.dtype, "granularity": type(q.granularity).__name__, "observer": q.observer,
                    **({"axis": q.granularity.axis} if isinstance(q.granularity, PerChannel) else {}),
                    **({"group_size": q.granularity.size} if isinstance(q.granularity, PerGroup) else {})}

        return {"type": "Recipe", "version": RECIPE_VERSION, "name": self.name, "weight": quant(self.weight),
                "activation": quant(self.activation), "conv_output": quant(self.conv_output),
                "exclude": list(self.exclude), "description": self.description,
                "smoothing": None if self.smoothing is None else {"alphas": list(self.smoothing.alphas)},
                "fallback": quant(self.fallback),
                "algorithm": None if self.algorithm is None else {
                    "type": "SVDQuant", "rank": self.algorithm.rank, "mode": self.algorithm.mode,
                    "gptq": self.algorithm.gptq, "smooth": self.algorithm.smooth},
                "format": self.format, "attention": quant(self.attention)}

    def with_exclude(self, patterns: tuple[str, ...] | list[str]) -> Recipe:
        """A copy that also keeps the modules matching `patterns` in float."""
        return replace(self, exclude=tuple(dict.fromkeys(self.exclude + tuple(patterns))))


def gguf_type(recipe: Recipe) -> str | None:
    """The GGML block type whose grid is exactly this recipe's weights ("Q4_0", "Q4_1", "Q8_0"), or None: int4 /
    uint4 / int8 codes in blocks of `GGUF_BLOCK` along the input with one scale each (stored in fp16; uint4 also
    an integer zero point), weight-only, without a smoothing divisor, a low-rank branch or an 8-bit fallback (none
    of which GGUF's blocks can hold)."""
    weight = recipe.weight
    plain = recipe.activation is None and recipe.fallback is None and (
        recipe.algorithm is None or (recipe.algorithm.rank == 0 and not recipe.algorithm.smooth
                                     and recipe.algorithm.mode == "w4a16"))
    if plain and isinstance(weight.granularity, PerGroup) and weight.granularity.size == GGUF_BLOCK:
        return {INT4: "Q4_0", UINT4: "Q4_1", INT8: "Q8_0"}.get(weight.dtype)
    return None


# The largest |code| of each GGML type diffquant writes: Q4_0 stores q - 8 in -8..7, Q4_1 q in 0..15 (and its
# zero point z in 0..15, q - z in -15..15), Q8_0 int8 (-128..127).
GGUF_MAX_CODE = {"Q4_0": 8, "Q4_1": 15, "Q8_0": 128}
# The types whose scales are trimmed so that the loaders' fp16 products are exact (`gguf_scale_bits`). Q8_0's
# would keep 4 bits (x127 takes 7 more), a step of up to 2**-5 of a scale, coarser than the rounding it saves:
# its scales are any fp16 value and the loaded weight is within half an fp16 step of the fake-quantized one.
GGUF_EXACT = ("Q4_0", "Q4_1")


def gguf_scale_bits(recipe: Recipe) -> int:
    """Significant bits of the recipe's stored scales: 11 (any fp16 value) for every recipe but a "gguf" one,
    whose scales keep 11 - (bits of its largest code less one) so that scale x code is exact in fp16: Q4_0's
    scales take 8 (x7 needs 3 more bits), and the loaders' fp16 dequantization equals the fp32 fake
    quantization bit for bit. A scale rounded to 8 bits moves by at most 2**-9 of itself.

    Q4_1's take 7: the loaders compute d x q + m in fp16 with d = s, q in 0..15 and m = -s x z, z in 0..15. A
    7-bit s times any integer of at most 4 bits (q, z, and q - z in -15..15) has at most 11 significant bits, so
    d x q, m and their sum s x (q - z) are each an fp16 value (no rounding at any of the three steps; an fp16
    scale is at least 2**-24 and every product a multiple of its last bit, so subnormals round nothing either),
    and the sum is the fp32 fake quantization (q - z) x s. A scale rounded to 7 bits moves by at most 2**-8."""
    if recipe.format != "gguf" or gguf_type(recipe) not in GGUF_EXACT:
        return 11
    return 11 - (GGUF_MAX_CODE[gguf_type(recipe)] - 1).bit_length()


# int4 group size, measured on shapes-sd (16 held-out captions, 25 steps, image PSNR vs fp32 mean / worst;
# denoiser-output SQNR on 40 captured calls). On the same 40 Linears (those 128 divides): group 32
# 45.6 / 37.6 dB (SQNR 35.9), 64: 43.3 / 33.7 (35.4), 128: 43.3 / 29.6 (35.3). As recipes: int4-w with
# group 32 quantizes all 83 Linears, 37.1 / 29.8 dB; 64 leaves 22 32-wide Linears float, 38.7 / 24.1;
# 128 leaves 43 float, 43.3 / 29.6. 32 is the most accurate per layer and the only size that takes every
# Linear here; its cost is 5 bits per Linear weight with fp32 scales (64: 4.5, 128: 4.25).
INT4_GROUP = 32
# SVDQuant on shapes-sd. Probe (16 captions, image PSNR vs fp32 mean / worst, 49 of the Linears 64 divides;
# RTN int4 g64 on them 43.39 / 27.43): GPTQ w4a16 rank 8 47.10 / 38.42, 16 47.59 / 38.46, 32 52.64 / 42.66;
# w4a4 rank 32 51.74 / 42.50. As recipes (`python -m diffquant.cli.shapes_eval --steps 25 --guidance 3 --n 64
# --no-export`, all 61 Linears 64 divides, the rest float; before fp16 scales, with int4-w-gptq smoothed):
# int4-w 37.71 / 22.75 dB, int4-w-gptq 43.91 / 24.87,
# svdquant-w4a16 46.79 / 28.29, svdquant-w4a4 43.37 / 27.52; w4a16 rank 8 45.42 / 28.44, rank 32 50.41 / 34.25.
# Bits per weight of those 61 Linears: int4-w-gptq 4.74; w4a16 rank 8 9.4, 16 14.1, 32 23.5 with the branch in
# fp32 as stored (7.1, 9.5, 14.1 were it fp16). Rank 16: rank 32 is more accurate, but at shapes-sd's widths
# (32 to 256) its branch costs more than int8 weights; at SD/Flux widths (>= 1280) a rank-16 fp16 branch
# costs under half a bit per weight.
SVDQUANT_GROUP = 64
SVDQUANT_RANK = 16
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("int8-w", TensorQuant(INT8, PerTensor()),
           description="int8 weights, per-tensor, symmetric, min-max (the tutorial's recipe)"),
    Recipe("int8-w-pc", TensorQuant(INT8, PerChannel()),
           description="int8 weights, per-output-channel, symmetric, min-max"),
    Recipe("fp8-w", TensorQuant(FP8, PerTensor()),
           description="fp8 e4m3 weights, per-tensor (the tutorial's fp8 recipe)"),
    Recipe("fp8-w-pc", TensorQuant(FP8, PerChannel()),
           description="fp8 e4m3 weights, per-output-channel"),
    Recipe("w8a8-int8", TensorQuant(INT8, PerChannel()), TensorQuant(INT8, PerTensor()),
           description="int8 weights per channel, int8 static per-tensor input activations (calibrated)"),
    Recipe("w8a8-int8-ort", TensorQuant(INT8, PerChannel()), TensorQuant(INT8, PerTensor()),
           conv_output=TensorQuant(INT8, PerTensor()),
           description="w8a8-int8 plus int8 Conv2d outputs, so that ONNX Runtime runs every Conv as an "
                       "integer QLinearConv (its fast CPU path)"),
    Recipe("w8a8-fp8", TensorQuant(FP8, PerTensor()), TensorQuant(FP8, PerTensor()),
           description="fp8 e4m3 weights and static per-tensor input activations (calibrated)"),
    # Activation ranges are min-max: nothing else measured better on shapes-sd. Quark's percentile observer
    # (a histogram cut at 99.99999999%), 64 captions vs fp32 with the profile's float layers: w8a8-int8
    # 54.44 dB vs 54.71 min-max, -sq 54.62 vs 54.14, -ort-sq 54.34 vs 54.82 (noise-sized, both ways).
    # Per-timestep ranges (each layer input's max per calibration timestep, reduced across the 8 timesteps
    # as ModelOpt's diffusers example does), -sq with every layer quantized, 16 captions: mean of the steps
    # 48.94 dB, median 47.97, 75th percentile 49.61 vs min-max 49.37. Quark's MSE observer took 30 s per
    # calibration batch on one core (32 min for 64) and was not measured further.
    Recipe("w8a8-int8-sq", TensorQuant(INT8, PerChannel()), TensorQuant(INT8, PerTensor()), smoothing=Smoothing(),
           description="w8a8-int8 after activation smoothing (SmoothQuant factors folded into the norms, value "
                       "and GEGLU projections in front of each layer, exponent searched per layer group)"),
    Recipe("w8a8-int8-ort-sq", TensorQuant(INT8, PerChannel()), TensorQuant(INT8, PerTensor()),
           conv_output=TensorQuant(INT8, PerTensor()), smoothing=Smoothing(),
           description="w8a8-int8-ort after activation smoothing (integer Convs in ONNX Runtime)"),
    Recipe("w8a8-int8-sq-attn", TensorQuant(INT8, PerChannel()), TensorQuant(INT8, PerTensor()),
           smoothing=Smoothing(), attention=TensorQuant(INT8, PerTensor()),
           description="w8a8-int8-sq plus int8 attention: the inputs of Q.K^T and P.V quantized (calibrated), "
                       "so that both matmuls run on integer kernels; the attention is no longer one fused kernel"),
    Recipe("w8a8-int8-ort-sq-attn", TensorQuant(INT8, PerChannel()), TensorQuant(INT8, PerTensor()),
           conv_output=TensorQuant(INT8, PerTensor()), smoothing=Smoothing(), attention=TensorQuant(INT8, PerTensor()),
           description="w8a8-int8-ort-sq plus int8 attention (Q.K^T and P.V on integer kernels)"),
    # INT4_GROUP: chosen by measurement, see its comment.
    Recipe("int4-w", TensorQuant(INT4, PerGroup(INT4_GROUP)),
           description=f"int4 Linear weights, symmetric, one scale per {INT4_GROUP} inputs (round to nearest); "
                       "Conv2d and Linears the group does not divide stay float"),
    Recipe("int4-w-conv8", TensorQuant(INT4, PerGroup(INT4_GROUP)), fallback=TensorQuant(INT8, PerChannel()),
           description="int4-w, but Conv2d (half of a UNet) and Linears the group does not divide take int8 "
                       "per-channel weights"),
    Recipe("mxfp4-w", TensorQuant(MXFP4, PerGroup(MX_GROUP)),
           description="OCP MX FP4 (e2m1) Linear weights, one power-of-two scale per 32 inputs (Quark's "
                       "OCP_MXFP4Spec); Conv2d stay float"),
    # SVDQUANT_GROUP, SVDQUANT_RANK: see their comment. int4-w-gptq is GPTQ alone: smoothing before it (the
    # alpha search at rank 0) measured no better on either shipped model and stores a divisor per input
    # channel (`python -m diffquant.peers --bits 4 --n 200`, PSNR mean / p10 / worst, bits per weight of the
    # 4-bit Linears, fp16 scales): shapes-sd 46.99 / 38.81 / 30.58 dB at 4.37 smoothed, 46.86 / 40.04 / 29.66
    # at 4.25 without; shapes-sd3 36.81 / 28.24 / 20.39 at 4.30, 36.89 / 29.21 / 19.22 at 4.25. Group 128
    # (4.125 bits, NNCF's and torchao's group): shapes-sd 49.75 / 44.11 / 20.01 on the 40 Linears 128
    # divides, shapes-sd3 36.61 / 28.38 / 19.00 on all 88.
    Recipe("int4-w-gptq", TensorQuant(INT4, PerGroup(SVDQUANT_GROUP)), algorithm=SVDQuant(rank=0, smooth=False),
           description=f"int4 Linear weights, one fp16 scale per {SVDQUANT_GROUP} inputs (4.25 bits per weight), "
                       "rounded by GPTQ on the calibration inputs' Hessians (calibrated); Conv2d and Linears the "
                       "group does not divide stay float"),
    Recipe("int4-w-gptq-g128", TensorQuant(INT4, PerGroup(128)), algorithm=SVDQuant(rank=0, smooth=False),
           description="int4-w-gptq with one fp16 scale per 128 inputs (4.125 bits per weight); Conv2d and "
                       "Linears 128 does not divide stay float"),
    # GGUF's Q4_0 grid exactly (int4 codes -8..7 in blocks of 32 weights, one fp16 scale each: 4.5 bits), the
    # codes chosen by GPTQ instead of the round-to-nearest of the `gguf` package and llama.cpp; written as a GGUF
    # file that diffusers and ComfyUI-GGUF load (`diffquant export --format gguf`, `diffquant.export.gguf`).
    Recipe("q4_0", TensorQuant(INT4, PerGroup(GGUF_BLOCK)), algorithm=SVDQuant(rank=0, smooth=False), format="gguf",
           description=f"GGUF Q4_0: int4 Linear weights in blocks of {GGUF_BLOCK} with one fp16 scale (4.5 bits per "
                       "weight), rounded by GPTQ on the calibration inputs' Hessians (calibrated); Conv2d and "
                       "Linears the block does not divide stay float; export --format gguf"),
    # GGUF's Q4_1 grid (uint4 codes 0..15 in blocks of 32 weights, an fp16 scale d and an fp16 minimum m each: 5
    # bits), m = -d x z with Quark's integer zero point z in 0..15 (so the grid holds 0); codes and each block's
    # scale and zero point chosen by GPTQ (`block_gptq`). GGUF only: Q5_1 is not offered, as Quark 0.13 has no
    # 5-bit integer dtype (int2, int3, int4, uint4, int8, uint8, ... only) for its quantizers to hold.
    Recipe("q4_1", TensorQuant(UINT4, PerGroup(GGUF_BLOCK)), algorithm=SVDQuant(rank=0, smooth=False), format="gguf",
           description=f"GGUF Q4_1: asymmetric 4-bit Linear weights in blocks of {GGUF_BLOCK} with an fp16 scale and "
                       "an fp16 minimum (5 bits per weight), rounded by GPTQ on the calibration inputs' Hessians "
                       "(calibrated); Conv2d and Linears the block does not divide stay float; export --format gguf "
                       "(no ONNX form)"),
    # GGUF's Q8_0 grid (int8 codes in blocks of 32 weights, one fp16 scale each: 8.5 bits), codes by GPTQ.
    Recipe("q8_0", TensorQuant(INT8, PerGroup(GGUF_BLOCK)), algorithm=SVDQuant(rank=0, smooth=False), format="gguf",
           description=f"GGUF Q8_0: int8 Linear weights in blocks of {GGUF_BLOCK} with one fp16 scale (8.5 bits per "
                       "weight), rounded by GPTQ on the calibration inputs' Hessians (calibrated); Conv2d and "
                       "Linears the block does not divide stay float; export --format gguf (no ONNX form)"),
    Recipe("svdquant-w4a16", TensorQuant(INT4, PerGroup(SVDQUANT_GROUP)), algorithm=SVDQuant(SVDQUANT_RANK),
           description=f"SVDQuant: smoothed int4 Linear weights (GPTQ, one scale per {SVDQUANT_GROUP} inputs) "
                       f"plus a float rank-{SVDQUANT_RANK} branch (calibrated); Conv2d and Linears the group "
                       "does not divide stay float"),
    Recipe("svdquant-w4a4", TensorQuant(INT4, PerGroup(SVDQUANT_GROUP)),
           algorithm=SVDQuant(SVDQUANT_RANK, mode="w4a4"),
           description=f"svdquant-w4a16 with the residual's inputs quantized to int4 per {SVDQUANT_GROUP} "
                       "too (dynamic scales); the low-rank branch stays float"),
)}
DEFAULT_RECIPES = ("int8-w", "fp8-w")


RECIPE_FIELDS = ("type", "version", "name", "weight", "activation", "conv_output", "exclude", "description",
                 "smoothing", "fallback", "algorithm", "format", "attention")
SVDQUANT_FIELDS = ("type", "rank", "mode", "gptq", "smooth")
QUANT_FIELDS = ("dtype", "granularity", "observer", "axis", "group_size")


def _check_fields(data: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise DiffquantError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in "
                             f"{where}: the fields are {', '.join(allowed)}")


def recipe_from_dict(data: dict) -> Recipe:
    """Inverse of `Recipe.to_dict` (checks the type, the version and that every field is known)."""
    if not isinstance(data, dict):
        raise DiffquantError(f"a recipe is a JSON object (as written by Recipe.to_dict), not a {type(data).__name__}")
    if data.get("type") != "Recipe" or data.get("version") not in READABLE_VERSIONS:
        versions = " or ".join(map(str, READABLE_VERSIONS))
        raise DiffquantError(f"not a diffquant recipe of version {versions}: {data.get('type')} "
                             f"v{data.get('version')}; re-create it with this diffquant version")
    _check_fields(data, RECIPE_FIELDS, "the recipe")

    def quant(key: str) -> TensorQuant | None:
        q = data.get(key)
        if q is None:
            return None
        if not isinstance(q, dict):
            raise DiffquantError(f"recipe field {key!r} must be an object with {', '.join(QUANT_FIELDS)} or null")
        _check_fields(q, QUANT_FIELDS, f"the recipe's {key!r}")
        granularity = q.get("granularity", "PerTensor")
        if granularity not in ("PerTensor", "PerChannel", "PerGroup"):
            raise DiffquantError(f"unknown granularity {granularity!r} in the recipe's {key!r}: use PerTensor, "
                                 "PerChannel or PerGroup")
        made = {"PerTensor": PerTensor, "PerChannel": lambda: PerChannel(q.get("axis", 0)),
                "PerGroup": lambda: PerGroup(q.get("group_size"))}[granularity]()
        return TensorQuant(q["dtype"], made, q.get("observer", "min_max"))

    if "weight" not in data or data["weight"] is None:
        raise DiffquantError("the recipe has no 'weight' quantization: every recipe quantizes weights")
    exclude = data.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise DiffquantError("recipe field 'exclude' must be a list of fnmatch patterns (strings)")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise DiffquantError("the recipe has no 'name': give it one (it labels results and images)")
    smoothing = data.get("smoothing")
    if smoothing is not None:
        if not isinstance(smoothing, dict) or set(smoothing) != {"alphas"} or not isinstance(smoothing["alphas"], list):
            raise DiffquantError("recipe field 'smoothing' must be null or {\"alphas\": [numbers in (0, 1]]}")
        smoothing = Smoothing(tuple(smoothing["alphas"]))
    algorithm = data.get("algorithm")
    if algorithm is not None:
        if not isinstance(algorithm, dict) or algorithm.get("type") != "SVDQuant":
            raise DiffquantError('recipe field \'algorithm\' must be null or {"type": "SVDQuant", "rank": ..., '
                                 '"mode": ..., "gptq": ..., "smooth": ...}')
        _check_fields(algorithm, SVDQUANT_FIELDS, "the recipe's 'algorithm'")
        algorithm = SVDQuant(**{k: v for k, v in algorithm.items() if k != "type"})
    return Recipe(name, quant("weight"), quant("activation"), tuple(exclude), data.get("description", ""),
                  quant("conv_output"), smoothing, quant("fallback"), algorithm, data.get("format", "onnx"),
                  quant("attention"))


def get_recipe(name: str | Recipe) -> Recipe:
    """Look a recipe up by its CLI name, or read a recipe .json file (e.g. one written by
    `diffquant sensitivity`); a Recipe passes through."""
    if isinstance(name, Recipe):
        return name
    if name.endswith(".json"):
        import json
        from pathlib import Path

        path = Path(name).expanduser()
        if not path.is_file():
            raise DiffquantError(f"recipe file {path} does not exist: pass a name ({', '.join(RECIPES)}) or a .json file")
        try:
            data = json.loads(path.read_text())
        except (ValueError, OSError) as error:
            raise DiffquantError(f"recipe file {path} is not JSON ({error})") from None
        try:
            return recipe_from_dict(data)
        except DiffquantError as error:
            raise DiffquantError(f"recipe file {path}: {error}") from None
        except (KeyError, TypeError) as error:
            raise DiffquantError(f"recipe file {path} is not a diffquant recipe ({type(error).__name__}: {error})") from None
    try:
        return RECIPES[name]
    except KeyError:
        raise DiffquantError(f"unknown recipe {name!r}: choose from {', '.join(RECIPES)}") from None


def parse_recipes(names: str | list[str]) -> list[Recipe]:
    """'int8-w,fp8-w' (or a list) -> recipes; duplicates and blanks are refused."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    if not items or any(not n for n in items):
        raise DiffquantError(f"empty recipe name in {names!r}: pass comma-separated names like int8-w,fp8-w")
    if len(set(items)) != len(items):
        raise DiffquantError(f"recipe listed twice in {names!r}: name each recipe once")
    recipes = [get_recipe(n) for n in items]
    seen: dict[str, str] = {}
    for item, recipe in zip(items, recipes):
        if recipe.name in seen:  # results, images and exports are keyed by the recipe's name
            label = item if isinstance(item, str) else f"Recipe {recipe.name!r}"
            raise DiffquantError(f"{seen[recipe.name]} and {label} are both named {recipe.name!r}: give each recipe "
                                 "its own name (the \"name\" field of a recipe file)")
        seen[recipe.name] = item if isinstance(item, str) else f"Recipe {recipe.name!r}"
    return recipes
