"""GPTQ on int4 blocks whose scales it chooses itself, for recipes on GGML's Q4_0 grid (`q4_0`), Q8_0's (`q8_0`)
and, with a zero point per block, Q4_1's (`q4_1`).

Hand-written because Quark's GPTQ (`gptq_quantize_residual`) fixes every group's scale to max|w| / 7 of the
weights before the pass and takes no scale from outside, while GGML's own Q4_0 quantizer puts each block's
largest weight on the code -8 when it is negative (one level finer). Here each group's scale is chosen when
GPTQ reaches the group, from the weights as its error feedback has left them, among: max|w| / 7, max|w| / 8
where the largest weight is negative, and max|w| / 7 shrunk by each of `SHRINK`; the one with the least
rounding error weighted by the Hessian's diagonal wins. The column loop is GPTQ's (Frantar et al. 2022,
lazy batch updates, Cholesky of the damped inverse Hessian), as in Quark's.

Measured on shapes-sd (q4_0, 83 Linears, 32 calibration captions x 8 timesteps; denoiser-output SQNR on 48
held-out calls): Quark's GPTQ 35.04 dB, this one with max|w| / 7 only 34.73, with the -8 choice 35.86, with the
-8 choice and the shrink candidates 35.95; damping 0.1 34.80, 0.001 35.65 (0.01 kept, as Quark's).

Q4_1 (`asymmetric`): codes q in 0..15 and each block's scale s and integer zero point z in 0..15 (Quark's uint4
grid, weight s x (q - z), so 0 is on it), chosen the same way when GPTQ reaches the block: the range [min(w, 0),
max(w, 0)] over 15 steps and that range shrunk by each of `SHRINK`, each with z rounded down and up from
-min / s; the pair of least diag(H)-weighted rounding error wins. Probe on shapes-sd (16 calibration captions x 8
timesteps; denoiser-output SQNR on 6 held-out captions x 8 timesteps): q4_0 35.33 dB, q4_1 35.61; shrinking the
low and the high end of the range separately (25 pairs) 34.95, so the one shrink factor is kept.
"""

from __future__ import annotations

import torch

from diffquant.quantization.backends.quark.fourbit import fp16_grid

SHRINK = (0.95, 0.9, 0.85, 0.8)
PERCDAMP = 0.01
BLOCK = 128  # columns per lazy batch update


def _choose_scales(weights: torch.Tensor, h: torch.Tensor, scale_bits: int, bits: int = 4) -> torch.Tensor:
    """Per row of `weights` (rows, group): the candidate scale of least diag(H)-weighted rounding error."""
    top = 2 ** (bits - 1) - 1  # 7 for int4, 127 for int8
    amax = weights.abs().amax(dim=1).clamp(min=1e-10)
    negative = weights.gather(1, weights.abs().argmax(dim=1, keepdim=True)).squeeze(1) < 0
    candidates = [amax / top, torch.where(negative, amax / (top + 1), amax / top), *(a * amax / top for a in SHRINK)]
    best, best_error = None, None
    for candidate in candidates:
        candidate = fp16_grid(candidate, positive=True, bits=scale_bits)
        codes = torch.clamp(torch.round(weights / candidate[:, None]), -top - 1, top)
        error = ((weights - codes * candidate[:, None]) ** 2 * h).sum(dim=1)
        if best is None:
            best, best_error = candidate, error
        else:
            better = error < best_error
            best, best_error = torch.where(better, candidate, best), torch.where(better, error, best_error)
    return best


def _choose_asymmetric(weights: torch.Tensor, h: torch.Tensor, scale_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `weights` (rows, group): the (scale, zero point) of least diag(H)-weighted rounding error on the
    uint4 grid scale x (q - z), q and z in 0..15."""
    low, high = weights.amin(dim=1).clamp(max=0), weights.amax(dim=1).clamp(min=0)
    best, best_error = None, None
    for shrink in (1.0, *SHRINK):
        scale = fp16_grid((shrink * (high - low) / 15).clamp(min=1e-10), positive=True, bits=scale_bits)
        for rounding in (torch.floor, torch.ceil):
            zero = rounding(-shrink * low / scale).clamp(0, 15)
            codes = torch.clamp(torch.round(weights / scale[:, None]) + zero[:, None], 0, 15)
            error = ((weights - (codes - zero[:, None]) * scale[:, None]) ** 2 * h).sum(dim=1)
            if best is None:
                best, best_error = (scale, zero), error
            else:
                better = error < best_error
                best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]))
                best_error = torch.where(better, error, best_error)
    return best


def block_gptq(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, scale_bits: int = 11, bits: int = 4,
               asymmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(the weight rounded to codes -8..7 (`bits` 4; -128..127 for 8) times its scales, the scales (rows,
    columns / group_size), None), scales on the fp16 grid of `scale_bits` significant bits, so that Quark's int4 /
    int8 quantizer given those scales returns the same weight. `asymmetric` (4 bits): the weight rounded to
    scale x (q - z) with codes q in 0..15, and the integer zero points z (rows, columns / group_size) third,
    which Quark's uint4 quantizer given both returns unchanged."""
    top = 2 ** (bits - 1) - 1
    if asymmetric and bits != 4:
        raise ValueError(f"asymmetric block GPTQ is for 4-bit codes (GGUF's Q4_1), not {bits} bits")
    W = weight.float().clone()
    H = hessian.float().clone()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    diagonal = torch.arange(columns, device=W.device)
    H[diagonal, diagonal] += PERCDAMP * torch.mean(torch.diag(H))
    weights_of_error = torch.diag(H).clone()
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    rounded = torch.zeros_like(W)
    scales = torch.zeros(rows, columns // group_size, device=W.device)
    zeros = torch.zeros(rows, columns // group_size, device=W.device) if asymmetric else None
    for i1 in range(0, columns, BLOCK):
        i2 = min(i1 + BLOCK, columns)
        W1, errors = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=W.device)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if column % group_size == 0:  # the group's scale, from the weights as GPTQ has left them
                end = min(i + group_size, i2 - i1)
                group = torch.cat([W1[:, i:end], W[:, i1 + end:column + group_size]], dim=1)
                h = weights_of_error[column:column + group_size]
                if asymmetric:
                    scales[:, column // group_size], zeros[:, column // group_size] = _choose_asymmetric(
                        group, h, scale_bits)
                else:
                    scales[:, column // group_size] = _choose_scales(group, h, scale_bits, bits)
            scale = scales[:, column // group_size]
            if asymmetric:
                zero = zeros[:, column // group_size]
                q = (torch.clamp(torch.round(W1[:, i] / scale) + zero, 0, 15) - zero) * scale
            else:
                q = torch.clamp(torch.round(W1[:, i] / scale), -top - 1, top) * scale
            rounded[:, column] = q
            error = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= error.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            errors[:, i] = error
        W[:, i2:] -= errors @ Hinv[i1:i2, i2:]
    return rounded, scales, zeros
