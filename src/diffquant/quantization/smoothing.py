"""Activation smoothing for W8A8 (SmoothQuant, Xiao et al. 2023) on diffusion denoisers, applied to the
float denoiser before the backend calibrates and quantizes it.

A Linear (or 1x1 Conv) y = X W^T reads an activation X whose few outlier channels set its per-tensor
scale. With per-input-channel factors s_j = max|X_j|^a / max|W_:j|^(1-a), y = (X / s)(W s)^T: the
weight takes part of the outliers (per-output-channel weight scales absorb it), the activation
gets flatter. The 1/s is folded into the operation that produces X, so the smoothed float model
computes the same function and the exported graph gains no operator:

- a LayerNorm or GroupNorm affine in front of the layers (attention q/k/v after `norm1`, the
  cross-attention query after `norm2`, the feed-forward's first projection after `norm3`, `proj_in`
  after the Transformer2DModel's GroupNorm): its weight and bias are divided by s;
- attention's value projection in front of `to_out.0` (softmax(QK^T) V mixes tokens, not channels):
  the rows of `to_v` are divided by s;
- GEGLU in front of the feed-forward's second projection (h * gelu(g) is linear in h): the rows of
  the first half of `ff.net.0.proj` are divided by s.

Layers behind a SiLU/GELU (the ResNet convs, the time embedding) or reading the text encoder's output
(cross-attention k/v) have no linear producer inside the denoiser and are not smoothed (an explicit
Mul would cost an operator and is not needed where the numbers below are measured). The exponent a is
searched per group on calibration inputs: the candidate (or no smoothing) whose simulated W8A8
output of the group's layers is closest to float wins.

Quark ships two smoothers and neither serves here: `quark.torch.algorithm.awq.smooth` (SmoothQuant)
finds its fold points from LLM decoder-layer structure, and svdquant's `ActivationSmoother` only
collects Linear statistics and scales weights, leaving 1/s to its own error-corrected module (which
also stores residual weights in bfloat16). This module is plain torch and backend-free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from diffquant.core.recipes import FP8, PerChannel, Recipe, TensorQuant

logger = logging.getLogger(__name__)
SAMPLE_RECORDS = 8  # calibration records whose activations score the candidate exponents
SAMPLE_ROWS = 512  # activation rows (tokens or pixels) kept per record and group


@dataclass(frozen=True)
class FoldGroup:
    """Layers reading one activation, and the op producing it that absorbs 1/s.

    kind: "norm" (LayerNorm/GroupNorm affine), "rows" (a Linear's output rows: to_v before to_out.0)
    or "geglu" (the first half of a GEGLU projection's rows)."""

    producer: str
    kind: str
    consumers: tuple[str, ...]


@dataclass
class SmoothingReport:
    """Per group (named by its first consumer): the exponent chosen (None: left unsmoothed) and the
    relative squared error of the group's simulated quantized outputs before and after."""

    alphas: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def smoothed(self) -> int:
        return sum(a is not None for a in self.alphas.values())

    def to_dict(self) -> dict:
        return {"groups": len(self.alphas), "smoothed": self.smoothed,
                "alphas": self.alphas, "errors": {k: list(v) for k, v in self.errors.items()}}


def _affine(norm) -> bool:
    return isinstance(norm, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and getattr(norm, "weight", None) is not None \
        and norm.bias is not None


def fold_groups(module: torch.nn.Module) -> list[FoldGroup]:
    """The smoothable groups of a denoiser, found from the diffusers blocks it is built of
    (BasicTransformerBlock, Transformer2DModel, Attention, GEGLU); empty for others (e.g. MMDiT blocks)."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import BasicTransformerBlock, FeedForward
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    groups = []
    for name, block in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(block, Transformer2DModel) and block.is_input_continuous and _affine(block.norm):
            groups.append(FoldGroup(f"{prefix}norm", "norm", (f"{prefix}proj_in",)))
        if isinstance(block, BasicTransformerBlock) and block.norm_type == "layer_norm" and block.pos_embed is None:
            attn1 = block.attn1
            if _affine(block.norm1) and not block.only_cross_attention and not attn1.is_cross_attention:
                groups.append(FoldGroup(f"{prefix}norm1", "norm",
                                        tuple(f"{prefix}attn1.{p}" for p in ("to_q", "to_k", "to_v"))))
            if block.attn2 is not None and _affine(block.norm2):
                groups.append(FoldGroup(f"{prefix}norm2", "norm", (f"{prefix}attn2.to_q",)))
            if isinstance(block.ff, FeedForward) and _affine(block.norm3):
                groups.append(FoldGroup(f"{prefix}norm3", "norm", (f"{prefix}ff.net.0.proj",)))
            if isinstance(block.ff, FeedForward) and isinstance(block.ff.net[0], GEGLU):
                groups.append(FoldGroup(f"{prefix}ff.net.0.proj", "geglu", (f"{prefix}ff.net.2",)))
        if isinstance(block, Attention) and isinstance(block.processor, (AttnProcessor, AttnProcessor2_0)) \
                and getattr(block, "add_v_proj", None) is None and block.group_norm is None \
                and block.spatial_norm is None and isinstance(block.to_out[0], torch.nn.Linear):
            groups.append(FoldGroup(f"{prefix}to_v", "rows", (f"{prefix}to_out.0",)))
    return groups


def _rows(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """A layer's input as (rows, input channels): tokens of a Linear, pixels of a 1x1 Conv."""
    if isinstance(layer, torch.nn.Conv2d):
        return x.transpose(1, -1).reshape(-1, x.shape[1])  # (B, C, H, W) -> (B*H*W, C)
    return x.reshape(-1, x.shape[-1])


def _matrix(layer: torch.nn.Module) -> torch.Tensor:
    """A Linear's or 1x1 Conv's weight as (out, in)."""
    return layer.weight.detach().reshape(layer.weight.shape[0], -1).float()


def _fake_quant(t: torch.Tensor, q: TensorQuant, amax: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric quantize-dequantize of a plain tensor, per tensor or per row (axis 0). Hand-written:
    scoring a handful of exponents per group needs a cheap simulation on bare tensors, while the
    backend's quantizers are modules bound to layers and their calibration."""
    if amax is None:
        amax = t.abs().amax(dim=1, keepdim=True) if isinstance(q.granularity, PerChannel) else t.abs().amax()
    amax = amax.clamp(min=1e-12)
    if q.dtype == FP8:
        scale = amax / 448.0
        return (t / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    scale = amax / 127.0
    return torch.round(t / scale).clamp(-128, 127) * scale


def _factors(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    weight_max = torch.cat(weights).abs().amax(dim=0).clamp(min=1e-5)
    s = act_max.clamp(min=1e-5).pow(alpha) / weight_max.pow(1 - alpha)
    return torch.where(act_max > 0, s.clamp(1e-4, 1e4), torch.ones_like(s))  # dead channels stay as they are


def _error(x: torch.Tensor, act_max: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor,
           recipe: Recipe) -> float:
    """Relative squared error of the layers' simulated W8A8 outputs on rows `x` with factors `s`; the
    activation range is the calibration-wide maximum (a min-max observer's)."""
    xq = _fake_quant(x / s, recipe.activation, (act_max / s).max())
    num = den = 0.0
    for w in weights:
        reference = x @ w.T
        num += float((reference - xq @ _fake_quant(w * s, recipe.weight).T).pow(2).sum())
        den += float(reference.pow(2).sum())
    return num / max(den, 1e-30)


@torch.no_grad()
def _statistics(module, groups: list[FoldGroup], calibration) -> tuple[dict, dict]:
    """Per group: the per-input-channel max |X| over all calibration records, and sampled rows of X."""
    modules = dict(module.named_modules())
    act_max: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {g.consumers[0]: [] for g in groups}
    n = len(calibration)
    sampled = {round(i * (n - 1) / max(SAMPLE_RECORDS - 1, 1)) for i in range(min(SAMPLE_RECORDS, n))}
    current = [0]
    gen = torch.Generator().manual_seed(0)

    def hook(name):
        def record(layer, args):
            rows = _rows(args[0].detach().float(), layer)
            channel_max = rows.abs().amax(dim=0)
            act_max[name] = channel_max if name not in act_max else torch.maximum(act_max[name], channel_max)
            if current[0] in sampled:
                pick = torch.randperm(rows.shape[0], generator=gen)[:SAMPLE_ROWS]
                samples[name].append(rows[pick.to(rows.device)].clone())
        return record

    handles = [modules[g.consumers[0]].register_forward_pre_hook(hook(g.consumers[0])) for g in groups]
    try:
        for index, item in enumerate(calibration):
            current[0] = index
            module(**item, return_dict=False)
    finally:
        for handle in handles:
            handle.remove()
    return act_max, {k: torch.cat(v) for k, v in samples.items() if v}


@torch.no_grad()
def _apply(modules: dict, group: FoldGroup, s: torch.Tensor) -> None:
    producer = modules[group.producer]
    s = s.to(producer.weight.dtype)
    if group.kind == "norm":
        producer.weight.div_(s)
        producer.bias.div_(s)
    else:
        rows = slice(0, s.numel())  # GEGLU: the first half of the rows is the linear branch
        producer.weight[rows].div_(s.reshape(-1, *([1] * (producer.weight.dim() - 1))))
        if producer.bias is not None:
            producer.bias[rows].div_(s)
    for name in group.consumers:
        weight = modules[name].weight
        weight.mul_(s.reshape(1, -1, *([1] * (weight.dim() - 2))).to(weight.dtype))


def smooth(module: torch.nn.Module, recipe: Recipe, calibration, excluded: list[str] | tuple[str, ...] = ()
           ) -> SmoothingReport:
    """Smooth `module` in place for `recipe` (which must quantize activations and carry a `Smoothing`):
    the float function is unchanged; the quantized one loses less to activation outliers.

    Args:
        module: the float denoiser (a copy: it is changed in place).
        recipe: the recipe; its weight/activation specs drive the simulation that picks each exponent.
        calibration: denoiser forward-kwargs dicts (the same data the backend calibrates on).
        excluded: layers kept in float; a group whose layers are all excluded is left alone.

    Returns:
        A `SmoothingReport`.
    """
    groups = [g for g in fold_groups(module) if not set(g.consumers) <= set(excluded)]
    report = SmoothingReport()
    if not groups:
        logger.info("%s: no smoothable layer in this %s", recipe.name, type(module).__name__)
        return report
    act_max, samples = _statistics(module, groups, calibration)
    modules = dict(module.named_modules())
    for group in groups:
        key = group.consumers[0]
        if key not in act_max:  # a branch the calibration inputs never reach
            continue
        quantized = [c for c in group.consumers if c not in excluded]
        x, amax = samples[key], act_max[key].to(samples[key].device)
        weights = [_matrix(modules[c]) for c in quantized]
        ones = torch.ones_like(amax)
        best_alpha, best_s, before = None, ones, _error(x, amax, weights, ones, recipe)
        best = before
        for alpha in recipe.smoothing.alphas:
            s = _factors(amax, weights, alpha)
            error = _error(x, amax, weights, s, recipe)
            if error < best:
                best_alpha, best_s, best = alpha, s, error
        report.alphas[key], report.errors[key] = best_alpha, (before, best)
        if best_alpha is not None:
            _apply(modules, group, best_s)
    logger.info("%s: smoothed %d of %d layer groups", recipe.name, report.smoothed, len(groups))
    return report
