"""QwenImageTransformer2DModel: Qwen-Image (a double-stream MMDiT on packed 2x2 latent patches, Qwen2.5-VL text
features, a 3-axis RoPE centred on the image, true classifier-free guidance as a second call). Graph inputs: the
packed latents, the text features with their padding mask, the timestep, and the image grid (`img_shapes`, one
(frames, rows, columns) of patches per sample), which the trace turns into constants: the graph keeps the image
size it was traced at, so its RoPE is a constant of that grid and the grid input drops out of it.

The pipeline pads the text only to the longest prompt of a call (a prompt and its blank negative prompt differ),
so the flat inputs pad it to the pipeline's 512 tokens, masked: the image tokens' attention then sees exactly the
real tokens, at the positions they have unpadded."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from diffquant.core.errors import DiffquantError
from diffquant.models.denoisers.base import Denoiser, register
from diffquant.models.denoisers.layout import Layout, whole

TEXT_TOKENS = 512  # QwenImagePipeline's max_sequence_length (its profile asks for the same)


@register
class QwenImageDenoiser(Denoiser):
    module_class = "QwenImageTransformer2DModel"
    pipeline_attribute = "transformer"
    positional = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "img_shapes")
    capture_keys = positional
    text_tokens = TEXT_TOKENS

    gguf_arch = "qwen_image"  # ComfyUI-GGUF's name (its loader's IMG_ARCH_LIST)

    def original_layout(self, rows: dict[str, int]) -> Layout:
        """diffusers' own names, unprefixed: Qwen-Image was released in diffusers' layout, ComfyUI's model uses the
        same names, and diffusers' single-file mapping for this class is the identity (no prefix stripped)."""
        return {key: whole(key, rows) for key in rows}

    def example_inputs(self, batch_size: int = 2, sequence_length: int | None = None,
                       seed: int = 0, latent: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        config = self.config
        gen = torch.Generator().manual_seed(seed)
        tokens = sequence_length or TEXT_TOKENS
        # a 1024x1024 image's 128x128 latent packs into 64x64 patches; 32x32 keeps examples small
        rows, cols = (latent[0] // 2, latent[1] // 2) if latent else (32, 32)
        mask = torch.ones(batch_size, tokens, dtype=torch.int64)
        mask[:, (tokens + 1) // 2:] = 0  # the second half padded
        inputs = {
            "hidden_states": torch.randn(batch_size, rows * cols, config.in_channels, generator=gen),  # (B, N, 4C)
            "encoder_hidden_states": torch.randn(batch_size, tokens, config.joint_attention_dim, generator=gen),
            "encoder_hidden_states_mask": mask,  # (B, T): 1 for a token, 0 for padding
            "timestep": torch.full((batch_size,), 0.5),  # (B,) sigma
            "img_shapes": torch.tensor([[1, rows, cols]]).repeat(batch_size, 1),  # (B, 3) frames, rows, columns
        }
        device, dtype = self.module.device, self.module.dtype
        return {k: v.to(device) if not v.is_floating_point() else v.to(device, dtype) for k, v in inputs.items()}

    def flat_inputs(self, record: dict) -> dict[str, torch.Tensor]:
        batch = record["hidden_states"].shape[0]
        # a single negative prompt for a batch of prompts comes as one sample, which the model broadcasts
        text = record["encoder_hidden_states"].expand(batch, -1, -1)
        tokens = text.shape[1]
        if tokens > TEXT_TOKENS:
            raise DiffquantError(f"Qwen-Image's graph takes up to {TEXT_TOKENS} text tokens, this call has {tokens}: "
                                 f"generate with max_sequence_length {TEXT_TOKENS} or less")
        mask = record.get("encoder_hidden_states_mask")  # None: no padding
        mask = torch.ones(batch, tokens, dtype=torch.int64, device=text.device) if mask is None else mask
        grid = record["img_shapes"]
        if not isinstance(grid, torch.Tensor):  # the pipeline's [[(frames, rows, columns)]] per sample
            grid = torch.tensor([list(shapes[0]) if isinstance(shapes, list) else list(shapes) for shapes in grid],
                                device=text.device)
        return {"hidden_states": record["hidden_states"],
                "encoder_hidden_states": F.pad(text, (0, 0, 0, TEXT_TOKENS - tokens)),
                "encoder_hidden_states_mask": F.pad(mask.expand(batch, -1), (0, TEXT_TOKENS - tokens)),
                "timestep": record["timestep"], "img_shapes": grid.to(torch.int64).reshape(batch, 3)}

    def forward_kwargs(self, flat: dict[str, torch.Tensor]) -> dict:
        with warnings.catch_warnings():  # traced, the grid becomes the graph's constants (its shapes are fixed)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            grid = flat["img_shapes"].tolist()
        return {k: v for k, v in flat.items() if k != "img_shapes"} | {"img_shapes": [[tuple(g)] for g in grid]}

    def discarded_layers(self) -> tuple[str, ...]:
        """The last block's text stream after its attention: the model returns the image tokens only."""
        last = f"transformer_blocks.{len(self.module.transformer_blocks) - 1}"
        return f"{last}.attn.to_add_out", f"{last}.txt_mlp"

    @contextmanager
    def exportable(self) -> Iterator[None]:
        # ONNX has no complex tensors: the RoPE comes as real (cos, sin) pairs and rotates in real arithmetic.
        from diffusers.models.transformers import transformer_qwenimage as qwen

        rope = self.module.pos_embed
        if type(rope) is not qwen.QwenEmbedRope or self.config.zero_cond_t:
            raise DiffquantError("diffquant exports the text-to-image Qwen-Image transformer: this one (layered or "
                                 "edit conditioning) has no ONNX export here")
        rope.forward = _real_rope.__get__(rope)
        original, qwen.apply_rotary_emb_qwen = qwen.apply_rotary_emb_qwen, _rotate
        try:
            yield
        finally:
            qwen.apply_rotary_emb_qwen = original
            del rope.forward


def _real_rope(self, video_fhw, device=None, max_txt_seq_len=None) -> tuple[torch.Tensor, torch.Tensor]:
    """QwenEmbedRope.forward with (cos, sin) as a last axis of 2 instead of complex numbers: (image, text) frequencies,
    (N, D/2, 2) and (T, D/2, 2), gathered from its own tables for the grid of the first sample."""
    frames, rows, cols = (video_fhw[0] if isinstance(video_fhw, list) else video_fhw)[0]
    with warnings.catch_warnings():  # the text length is a constant of the graph, as the grid is
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        tokens = int(max_txt_seq_len)
    table = torch.view_as_real(torch.cat([self.neg_freqs, self.pos_freqs]))  # positions -4096..4095
    zero = self.neg_freqs.shape[0]

    def axis(n: int) -> torch.Tensor:  # centred positions, as the model was trained (scale_rope)
        return torch.arange(-(n - n // 2), n // 2) if self.scale_rope else torch.arange(n)

    positions = torch.stack(torch.meshgrid(torch.arange(frames), axis(rows), axis(cols), indexing="ij"), -1)
    positions = positions.reshape(-1, 3) + zero  # (N, 3)
    columns = torch.arange(table.shape[1]).split([d // 2 for d in self.axes_dim])
    image = torch.cat([table[positions[:, k, None], part] for k, part in enumerate(columns)], dim=1)
    start = max(rows // 2, cols // 2) if self.scale_rope else max(rows, cols)
    text = table[zero + start:zero + start + tokens]
    return image.to(device), text.to(device)


def _rotate(x: torch.Tensor, freqs: torch.Tensor, use_real: bool = False, **_) -> torch.Tensor:
    """apply_rotary_emb_qwen on real (cos, sin) pairs: x (B, S, H, D) holds interleaved (real, imaginary) pairs."""
    h = x if x.dtype == torch.float32 else x.float()  # a float->float Cast pair breaks ORT's CastElimination
    real, imag = h.unflatten(-1, (-1, 2)).unbind(-1)  # a reshape to h.shape would trace the batch into the graph
    cos, sin = freqs[None, :, None, :, 0], freqs[None, :, None, :, 1]
    out = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(3)
    return out if out.dtype == x.dtype else out.to(x.dtype)
