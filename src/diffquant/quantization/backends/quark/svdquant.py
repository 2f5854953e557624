"""SVDQuant (Li et al. 2024) through AMD Quark's `quark.torch.algorithm.svdquant`, applied so that a
diffusion denoiser keeps computing the same function.

Each chosen Linear y = x W^T becomes Quark's `ErrorCorrectedModule`: with per-input-channel factors s,
x' = x / s, W s = L2 L1 + R (rank-r SVD), y = Q(x') Q(R)^T + (x' L1^T) L2^T, where Q(R) is Quark's int4
per-group weight quantizer and Q(x') is nothing (w4a16) or Quark's dynamic int4 per-group input
quantizer (w4a4); the low-rank branch stays float.

Why not `SVDQuantProcessor.apply` as it ships (Quark 0.13): on a UNet it leaves a broken float model.
1. It scales the weights of every Linear that its bare-name `exclude_patterns` miss ("time_embedding"
   never matches "time_embedding.linear_1") by s, but folds 1/s back only into the layers it
   decomposes, those with min(out, in) >= `min_layer_size` (256): on shapes-sd no Linear is that wide,
   so all 83 are scaled by s and none is divided back (denoiser SQNR -0.4 dB before any rounding), and
   on any model the layers the QConfig excludes, or the narrow ones, are left scaled.
2. It folds 1/s into R and L1 before R is quantized, so the quantized residual is (W s - L2 L1) / s:
   the activations are quantized unsmoothed (w4a4 gains nothing from s) and the per-layer alpha
   search scores a different weight (and per-channel, not the group size) than the one quantized.
3. It stores a float32 model's residual and branch in bfloat16, and then Linear gets mixed dtypes.
4. Its `ErrorCorrectedModule` computes a float16 input with the residual's raw weight (F.linear in
   float32), skipping the residual's quantizers: a float16 model would run unquantized.
5. With `use_gptq` it runs GPTQ on the Hessian of x / s for a residual already folded to read x, on
   GPTQ's own grid (max|w| / 7, per channel by default) that the int4 quantizer then rounds again.
Here Quark's processor collects the statistics (`internals.svdquant_statistics`) and Quark's pieces (its SVD split,
`ErrorCorrectedModule` with its runtime `smooth_factor`, the quantizers) do the rest, in float32, on
the layers asked for only; s is kept on the activation (a divide that an ONNX export keeps in front of
the quantized MatMul and the low-rank pair) and the alpha search scores the quantization actually applied.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence

import torch

from diffquant.core.errors import DiffquantError
from diffquant.core.progress import progress
from diffquant.quantization.backends.quark import block_gptq, fourbit, internals
from diffquant.core.record import note

logger = logging.getLogger(__name__)
MODES = ("w4a16", "w4a4")
ALPHAS = (None, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # None: no smoothing (s = 1)
SEARCH_RECORDS = 8  # calibration calls whose layer inputs score the alpha candidates
SEARCH_ROWS = 4096  # activation rows kept per layer for the search


def _check(module: torch.nn.Module, layers: Sequence[str], mode: str, rank: int,
           group_size: int) -> dict[str, torch.nn.Linear]:
    if mode not in MODES:
        raise DiffquantError(f"SVDQuant mode {mode!r} is not one of {', '.join(MODES)}")
    if rank < 0:
        raise DiffquantError(f"SVDQuant rank must be at least 0 (0: no low-rank branch), got {rank}")
    if group_size < 1:
        raise DiffquantError(f"SVDQuant group size must be at least 1, got {group_size}")
    if not layers:
        raise DiffquantError("SVDQuant got no layers to quantize: name at least one Linear")
    modules = dict(module.named_modules())
    chosen = {}
    for name in layers:
        layer = modules.get(name)
        if type(layer) is not torch.nn.Linear:
            found = "no module" if layer is None else f"a {type(layer).__name__}"
            raise DiffquantError(f"SVDQuant layer {name!r} is {found} of the {type(module).__name__}, not a "
                                 f"Linear: name Linear layers only")
        if layer.in_features % group_size:
            raise DiffquantError(f"SVDQuant layer {name!r} has {layer.in_features} input channels, not a multiple "
                                 f"of the group size {group_size}: leave it out or pick a group size that divides it")
        chosen[name] = layer
    return chosen


def _specs(mode: str, group_size: int, bits: int = 4, asymmetric: bool = False):
    from quark.torch.quantization.config.config import Int4PerGroupSpec, Int8PerGroupSpec, Uint4PerGroupSpec

    if asymmetric:  # GGUF's Q4_1: uint4 codes, an integer zero point per group
        weight = Uint4PerGroupSpec(ch_axis=-1, group_size=group_size, symmetric=False, is_dynamic=False,
                                   scale_type="float")
    else:
        weight = (Int4PerGroupSpec if bits == 4 else Int8PerGroupSpec)(ch_axis=-1, is_dynamic=False,
                                                                       scale_type="float", group_size=group_size)
    inputs = Int4PerGroupSpec(ch_axis=-1, is_dynamic=True, scale_type="float", group_size=group_size) \
        if mode == "w4a4" else None
    return weight.to_quantization_spec(), None if inputs is None else inputs.to_quantization_spec()


def _fake_quant(spec, tensor: torch.Tensor) -> torch.Tensor:
    """Quark's own quantize-dequantize of `tensor` (a fresh quantizer: it observes, then rounds); a static
    (weight) quantizer rounds on its scale rounded to fp16, as the quantized layer will."""
    quantizer = internals.fresh_quantizer(spec, tensor.device)
    out = quantizer(tensor)
    if spec.is_dynamic:
        return out
    internals.fix_scale(quantizer, fourbit.fp16_grid(quantizer.scale.detach(), positive=True))
    return quantizer(tensor)


def _collect(module: torch.nn.Module, calibration, names: set[str], gptq: bool):
    """Quark's SVDQuant calibration pass, on `names` only: per-channel input maxima of every Linear, the
    inputs of the first `SEARCH_RECORDS` calls of each named one and, for GPTQ, their Hessians X^T X."""
    return internals.svdquant_statistics(module, calibration, names, gptq, SEARCH_RECORDS)


def _gptq(residual: torch.Tensor, hessian: torch.Tensor, s: torch.Tensor | None, group_size: int,
          scale_bits: int = 11):
    """Quark's GPTQ of the residual on the Hessian of the input it really reads (x / s), and the per-group
    scales it rounded to, (out, groups), rounded to fp16 (the codes GPTQ chose, times the stored scales).
    Quark's int4 quantizer takes those scales (its own would be max|w| / 7.5, not GPTQ's max|w| / 7, and
    would round the GPTQ weights a second time). Quark's GPTQ takes no scales from outside, so the fp16
    rounding comes after its choice of codes: a 2**-11 relative change of a scale, where its rounding
    error is up to 1/14 of it."""
    from quark.torch.algorithm.svdquant import gptq_quantize_residual

    if s is not None:  # H of x / s = diag(1/s) H diag(1/s)
        hessian = hessian / s.unsqueeze(0) / s.unsqueeze(1)
    rounded = gptq_quantize_residual(residual, hessian, n_bits=4, symmetric=True, group_size=group_size)
    start = residual.clone()
    start[:, torch.diag(hessian) == 0] = 0  # as GPTQ zeroes dead columns before taking its scales
    scales = start.reshape(start.shape[0], -1, group_size).abs().amax(dim=-1).clamp(min=1e-10) / 7
    codes = torch.round(rounded / scales.repeat_interleave(group_size, dim=1)).clamp(-8, 7)
    scales = fourbit.fp16_grid(scales, positive=True, bits=scale_bits)
    return codes * scales.repeat_interleave(group_size, dim=1), scales


def _decompose(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L1, L2, R) with W = L2 L1 + R: Quark's SVD split, the factors rounded to fp16 (as stored) and R
    the rest of W after them. At rank 0 (int4-w-gptq) the split keeps nothing and R is W, which Quark
    computes through a full SVD of W all the same (minutes per alpha for a 3072 x 15360 Flux Linear);
    the empty factors and W are returned directly, the same tensors."""
    if rank == 0:
        return weight.new_zeros(0, weight.shape[1]), weight.new_zeros(weight.shape[0], 0), weight
    l1, l2 = internals.svd_decompose(weight, rank)
    l1, l2 = fourbit.fp16_grid(l1), fourbit.fp16_grid(l2)
    return l1, l2, weight - l2 @ l1


def _candidate(weight: torch.Tensor, act_max: torch.Tensor | None, alpha: float | None, rank: int):
    """(s or None, L1, L2, R) of one alpha: s as in SmoothQuant, then the SVD split of W s."""
    if alpha is None:
        return (None, *_decompose(weight, rank))
    s = act_max.clamp(min=1e-8).pow(alpha) / weight.abs().amax(dim=0).clamp(min=1e-5).pow(1 - alpha)
    s = fourbit.fp16_grid(s.clamp(min=1e-5, max=1e4), positive=True)  # stored in fp16
    return (s, *_decompose(weight * s, rank))


def _search(weight: torch.Tensor, act_max: torch.Tensor, inputs: torch.Tensor, rank: int, specs,
            alphas: Sequence[float | None]):
    """The candidate whose simulated layer output (Quark's int4 rounding of R and, for w4a4, of x / s)
    is closest to the float output on the cached inputs; returns (alpha, s, L1, L2, R, rel. error)."""
    weight_spec, input_spec = specs
    target = inputs @ weight.t()
    best = None
    for alpha in alphas:
        s, l1, l2, r = _candidate(weight, act_max, alpha, rank)
        x = inputs if s is None else inputs / s
        xq = x if input_spec is None else _fake_quant(input_spec, x)
        out = xq @ _fake_quant(weight_spec, r).t() + (x @ l1.t()) @ l2.t()
        error = float((out - target).pow(2).sum() / target.pow(2).sum().clamp(min=1e-30))
        if best is None or error < best[-1]:
            best = (alpha, s, l1, l2, r, error)
    return best


def _rows(cached: list[torch.Tensor], channels: int) -> torch.Tensor:
    """The cached inputs of one layer as (rows, channels) float32, at most `SEARCH_ROWS` rows evenly spread."""
    rows = torch.cat([x.reshape(-1, channels).float() for x in cached])
    if rows.shape[0] > SEARCH_ROWS:
        rows = rows[torch.linspace(0, rows.shape[0] - 1, SEARCH_ROWS).long()]
    return rows


@functools.cache
def _error_corrected_class() -> type:
    """Quark's `ErrorCorrectedModule` whose forward always runs the residual layer itself (with its
    quantizers), in every dtype."""
    from quark.torch.algorithm.svdquant import ErrorCorrectedModule

    class ErrorCorrected(ErrorCorrectedModule):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.smooth_factor is not None:
                x = x / self.smooth_factor
            out = self.layer(x)
            return out if self.correction is None else out + self.correction(x)

    return ErrorCorrected


def _set_module(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def is_error_corrected(layer: torch.nn.Module) -> bool:
    """True for a Linear that SVDQuant replaced (residual `layer`, low-rank `correction`, `smooth_factor`)."""
    return isinstance(layer, _error_corrected_class())


def _wrap(module: torch.nn.Module, name: str, layer: torch.nn.Linear, rank: int, s: torch.Tensor | None):
    """Put the error-corrected module around the Linear `name` (its weight becomes the residual's): a
    rank-`rank` branch (None for rank 0), the smoothing factor `s` as a buffer. Returns the branch."""
    from quark.torch.algorithm.svdquant import LowRankCorrectionModule

    branch = None
    if rank:
        branch = LowRankCorrectionModule(layer.in_features, layer.out_features, rank)
        branch.to(layer.weight.device, layer.weight.dtype)
    _set_module(module, name, _error_corrected_class()(branch, layer, s))
    return branch


def _qconfig(module: torch.nn.Module, names, specs):
    """Quark's QConfig that quantizes the residuals of the wrapped `names` only."""
    from quark.torch.quantization.config.config import QConfig, QLayerConfig

    residuals = {f"{name}.layer" for name in names}
    keep = [n for n, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n not in residuals]
    return QConfig(global_quant_config=QLayerConfig(weight=specs[0], input_tensors=specs[1]), exclude=keep)


def stored_bits(layer: torch.nn.Module) -> tuple[int, str]:
    """(bits, description) of an SVDQuant layer as stored: the residual's int4 codes and scales, the
    low-rank branch and the smoothing factor in their dtype."""
    extra = [t for t in (layer.smooth_factor, *(() if layer.correction is None else layer.correction.parameters()))
             if t is not None]
    bits = fourbit.weight_bits(layer.layer) + sum(fourbit.stored_bits(t.detach()) for t in extra)
    description = internals.describe(internals.weight_quantizer(layer.layer))
    if internals.input_quantizer(layer.layer) is not None:
        description += f", act {internals.describe(internals.input_quantizer(layer.layer))}"
    rank = 0 if layer.correction is None else layer.correction.l1.out_features
    return bits, description + (f", rank-{rank} branch" if rank else "") + \
        (", smoothed" if layer.smooth_factor is not None else "")


def saved_layers(state: dict[str, torch.Tensor], model: str) -> dict[str, tuple[int, bool]]:
    """name -> (rank, smoothed) of each SVDQuant layer in a saved state (`rebuild`'s `layers`)."""
    marker = ".layer" + internals.WEIGHT_QUANTIZER_KEY
    names = {key.rsplit(".layer.", 1)[0] for key in state if marker + "." in key}
    if not names:
        raise DiffquantError(f"the saved quantized state holds no SVDQuant layers for this {model}: quantize the "
                             "model again")
    return {name: (state[f"{name}.correction.l1.weight"].shape[0] if f"{name}.correction.l1.weight" in state else 0,
                   f"{name}.smooth_factor" in state) for name in sorted(names)}


def rebuild(module: torch.nn.Module, layers: dict[str, tuple[int, bool]], mode: str, group_size: int, bits: int = 4,
            asymmetric: bool = False):
    """The modules `apply_svdquant` leaves, without running anything, for a saved state to be loaded into:
    `layers` maps each SVDQuant Linear to (its branch's rank, whether it was smoothed). The weights,
    branch, smoothing factors and quantizer scales are placeholders until `load_state_dict`.

    Returns:
        (module, Quark's QConfig; pass it to `internals.finish_loading` after loading the state).
    """
    internals.import_quark(next(module.parameters()).device)
    chosen = _check(module, list(layers), mode, max((r for r, _ in layers.values()), default=0), group_size)
    for name, layer in chosen.items():
        rank, smoothed = layers[name]
        s = torch.ones(layer.in_features, device=layer.weight.device, dtype=layer.weight.dtype) if smoothed else None
        _wrap(module, name, layer, rank, s)
    qconfig = _qconfig(module, chosen, _specs(mode, group_size, bits, asymmetric))
    return internals.transform(module, qconfig), qconfig


def apply_svdquant(module: torch.nn.Module, calibration: Sequence[dict], layers: Sequence[str],
                   mode: str = "w4a16", rank: int = 32, group_size: int = 64,
                   alphas: Sequence[float | None] = ALPHAS, gptq: bool = False,
                   scale_bits: int = 11, choose_scales: bool = False, bits: int = 4,
                   asymmetric: bool = False) -> torch.nn.Module:
    """Quantize the Linear `layers` of a bare denoiser (UNet or transformer) with SVDQuant, in place.

    Every other layer stays float. Each named Linear becomes Quark's `ErrorCorrectedModule`: its input
    is divided by a smoothing factor s (per channel, exponent alpha searched per layer, or none), a
    float rank-`rank` branch takes the top singular directions of W s, and the residual is a Quark
    QuantLinear with int4 symmetric per-group weights (and, for w4a4, dynamic int4 per-group inputs).
    SVD, smoothing and the stored factors are float32 whatever the module's dtype is computed in; they
    are stored in the layer's dtype.

    Args:
        module: the float denoiser (pass a copy to keep the original).
        calibration: denoiser forward-kwargs dicts (`calibrate`), read for the smoothing statistics.
        layers: module names of the Linears to quantize; their input width must divide by `group_size`.
        mode: "w4a16" (weights only) or "w4a4" (weights and activations).
        rank: the low-rank branch's rank (clipped to the layer's smaller dimension); 0: no branch (the
            smoothing and the residual's rounding only).
        group_size: input channels per int4 scale.
        alphas: the smoothing exponents tried per layer (None: no smoothing). A layer the calibration
            records never reach is not smoothed (and its residual is rounded to nearest).
        gptq: round the residual with Quark's GPTQ (on the Hessian of x / s) instead of to nearest.
        scale_bits: significant bits of the fp16 scales (11: any fp16 value; a GGUF recipe's fewer, see
            `recipes.gguf_scale_bits`).
        choose_scales: GPTQ chooses each group's scale as it reaches it (`block_gptq`, for GGML's grid) instead
            of Quark's GPTQ with max|w| / 7.
        bits: 4 (int4 codes) or 8 (int8 codes: GGUF's Q8_0 blocks, rank 0 and `choose_scales` only).
        asymmetric: uint4 codes with an integer zero point per group (GGUF's Q4_1 blocks: 4 bits, w4a16, rank 0,
            no smoothing, and GPTQ only with `choose_scales`).

    Returns:
        The quantized module; its record's `algorithm` dict (`record_of(module).algorithm`) holds each layer's alpha and the relative
        squared output error of the search's simulation.
    """
    internals.import_quark(next(module.parameters()).device)
    from quark.torch import ModelQuantizer

    if not calibration:
        raise DiffquantError("SVDQuant needs calibration records (its smoothing reads activations): "
                             "pass calibrate(pipe, prompts)")
    chosen = _check(module, layers, mode, rank, group_size)
    if bits not in (4, 8) or (bits == 8 and (rank or not choose_scales or mode != "w4a16")):
        raise DiffquantError(f"SVDQuant takes int4 codes, or int8 block codes at rank 0 with GPTQ choosing the "
                             f"scales (GGUF's Q8_0), not {bits} bits with rank {rank}")
    if asymmetric and (bits != 4 or rank or mode != "w4a16" or any(a is not None for a in alphas)
                       or (gptq and not choose_scales)):
        raise DiffquantError("asymmetric uint4 blocks (GGUF's Q4_1) take rank 0, w4a16, no smoothing and, with GPTQ, "
                             "GPTQ choosing each block's scale and zero point")
    specs = _specs(mode, group_size, bits, asymmetric)
    started = time.perf_counter()
    module.eval()
    with torch.no_grad():
        act_max, cached, hessians = _collect(module, calibration, set(chosen), gptq)
        report, scales, zeros = {}, {}, {}
        for name, layer in progress(chosen.items(), "GPTQ on int8 blocks" if bits == 8 else
                                    f"SVDQuant {mode} (alpha search{', GPTQ' if gptq else ''})",
                                    total=len(chosen)):
            weight = layer.weight.detach().float()
            if name in cached:
                alpha, s, l1, l2, r, error = _search(weight, act_max[name].float().to(weight.device),
                                                      _rows(cached[name], layer.in_features).to(weight.device),
                                                      rank, specs, alphas)
            else:  # never ran on the calibration records: nothing to smooth by
                logger.warning("SVDQuant: %s never ran on the calibration records; not smoothed", name)
                alpha, error, (s, l1, l2, r) = None, None, _candidate(weight, None, None, rank)
            if gptq and name in hessians:
                hessian = hessians.pop(name).to(r.device)
                if choose_scales:  # H of x / s, as in _gptq
                    hessian = hessian if s is None else hessian / s.unsqueeze(0) / s.unsqueeze(1)
                    r, scales[name], zeros[name] = block_gptq.block_gptq(r, hessian, group_size, scale_bits, bits,
                                                                         asymmetric)
                else:
                    r, scales[name] = _gptq(r, hessian, s, group_size, scale_bits)
            dtype = layer.weight.dtype
            layer.weight = torch.nn.Parameter(r.to(dtype), requires_grad=False)
            branch = _wrap(module, name, layer, l1.shape[0], None if s is None else s.to(dtype))
            if branch is not None:  # contiguous as a reload stores them: U[:, :r] is strided, and matmul over
                # a strided weight sums in another order (a saved model would not compute bit-identically)
                branch.l1.weight.data, branch.l2.weight.data = l1.to(dtype).contiguous(), l2.to(dtype).contiguous()
            report[name] = {"alpha": alpha, "error": error}
        cached.clear()
        qconfig = _qconfig(module, chosen, specs)
        # Weight scales come from the weights and input scales per call: nothing to calibrate.
        module = ModelQuantizer(qconfig).quantize_model(module, None)
        for name, scale in scales.items():
            internals.set_weight_scale(module.get_submodule(f"{name}.layer"), scale)
            if zeros.get(name) is not None:
                internals.set_weight_zero_point(module.get_submodule(f"{name}.layer"), zeros[name])
        fourbit.round_scales_fp16(module, scale_bits)  # the residuals rounded to nearest (GPTQ's are on the grid)
    note(module, algorithm={"mode": mode, "rank": rank, "group_size": group_size, "gptq": gptq, "layers": report})
    smoothed = sum(v["alpha"] is not None for v in report.values())
    logger.info("SVDQuant %s rank %d: %d layers (%d smoothed) in %.1f s", mode, rank, len(report), smoothed,
                time.perf_counter() - started)
    return module
