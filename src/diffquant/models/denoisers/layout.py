"""A denoiser's original checkpoint layout (LDM for SD 1.x/SDXL UNets, Stability's MMDiT names for SD3,
Black Forest Labs' for FLUX.1): the names single-file checkpoints, GGUF files and ComfyUI use.

Each original tensor is a stack of row ranges of diffusers tensors: a rename is one whole tensor, a fused
qkv the three projections one after the other, a final AdaLayerNorm's modulation its two halves swapped
(diffusers keeps scale then shift, the original shift then scale). Rows are output channels, so a tensor
quantized in blocks along its input stacks the same way, block rows and all.

Hand-written because diffusers ships only the other direction (its `convert_*_to_diffusers` functions);
the tests round-trip every mapping through those functions."""

from __future__ import annotations

import torch

RowRange = tuple[str, int, int]  # (diffusers key, first row, end row)
Layout = dict[str, list[RowRange]]  # original key -> the row ranges it stacks, in order


def whole(key: str, rows: dict[str, int]) -> list[RowRange]:
    return [(key, 0, rows[key])]


def stacked(keys: list[str], rows: dict[str, int]) -> list[RowRange]:
    return [(key, 0, rows[key]) for key in keys]


def swapped(key: str, rows: dict[str, int]) -> list[RowRange]:
    """The two halves of `key` in the other order."""
    half = rows[key] // 2
    return [(key, half, rows[key]), (key, 0, half)]


def rows_of(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """diffusers key -> rows (first dimension; 1 for a scalar) of each tensor of a state dict."""
    return {k: (v.shape[0] if v.dim() else 1) for k, v in state.items()}


def apply(layout: Layout, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original-layout state dict of a diffusers `state` (float tensors)."""
    return {name: torch.cat([state[key][start:end] for key, start, end in parts]) for name, parts in layout.items()}


def check_covers(layout: Layout, rows: dict[str, int], family: str) -> None:
    """Raise ValueError unless every diffusers row is taken exactly once."""
    taken: dict[str, int] = {}
    for parts in layout.values():
        for key, start, end in parts:
            taken[key] = taken.get(key, 0) + end - start
    missing = sorted(k for k in rows if taken.get(k) != rows[k])
    extra = sorted(k for k in taken if k not in rows)
    if missing or extra:
        raise ValueError(f"the {family} original layout does not cover the state dict: "
                         f"{(missing + extra)[:5]}")
