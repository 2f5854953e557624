"""ZImageTransformer2DModel: Z-Image (a single-stream DiT: 2x2 latent patches and Qwen3 caption features each pass
refiner blocks, then attend jointly as one sequence; AdaLN from the timestep alone, 3-axis RoPE).

Its forward takes lists, one entry per sample: latents (C, 1, h, w) and caption features of each prompt's own length
(the pipeline strips the padding), and returns a list. The model pads each part to a multiple of 32 tokens with a
learned pad token, and the image's RoPE positions start after its padded caption. The graph takes the call batched:
`hidden_states` (B, C, h, w), `t` (B,), `encoder_hidden_states` (B, T, D) zero-padded to T = 512 tokens (the
pipeline's longest caption) and `encoder_attention_mask` (B, T), from which it rebuilds each sample's lengths, pad
tokens and positions; its output (B, C, h, w) goes back to the pipeline as a list. Records keep the module's own
kwargs (`x` stacked, which its forward iterates as it does the list; `cap_feats` a list of tensors)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from diffquant.core.errors import DiffquantError
from diffquant.models.denoisers.base import Denoiser, register
from diffquant.models.denoisers.layout import Layout, stacked, whole

GRAPH_INPUTS = ("hidden_states", "t", "encoder_hidden_states", "encoder_attention_mask")
SEQ_MULTIPLE = 32  # diffusers' SEQ_MULTI_OF: image and caption tokens are padded to multiples of it


@register
class ZImageDenoiser(Denoiser):
    module_class = "ZImageTransformer2DModel"
    pipeline_attribute = "transformer"
    positional = ("x", "t", "cap_feats")
    capture_keys = positional
    text_tokens = 512  # Qwen3 tokens a caption has at most
    timestep_key = "t"
    module_attributes = ("in_channels",)  # ZImagePipeline reads `transformer.in_channels`

    # ComfyUI runs Z-Image as a Lumina 2 NextDiT (its model detection gives image_model "lumina2"), and ComfyUI-GGUF
    # has no Z-Image name of its own: its loader's IMG_ARCH_LIST has "lumina2", and its convert.py writes Z-Image
    # checkpoints (detected by cap_embedder.1.weight + context_refiner.0.attention.qkv.weight) as "lumina2".
    gguf_arch = "lumina2"

    def original_layout(self, rows: dict[str, int]) -> Layout:
        """Tongyi-MAI's own names (ComfyUI's NextDiT's): each block's q, k and v one fused `attention.qkv`, the
        rest renamed (the inverse of diffusers' `convert_z_image_transformer_checkpoint_to_diffusers`). That
        converter knows only the default 2x2 (frame 1) patch's embedder and final layer ("2-1"): a model with
        other patch sizes has no original layout."""
        layout: Layout = {}
        for key in rows:
            fused = _QKV.fullmatch(key)
            if fused:
                if fused.group(2) == "q":
                    block = fused.group(1)
                    layout[f"{block}.attention.qkv.weight"] = stacked(
                        [f"{block}.attention.to_{c}.weight" for c in "qkv"], rows)
                continue
            layout[_original_name(key)] = whole(key, rows)
        return layout

    def latent_patch(self) -> int:
        return int(self.config.all_patch_size[0])  # the pipeline calls it with its default (first) patch

    def grid_side(self) -> int:
        """The most tokens an image side can have: the length of the RoPE tables of the row and column axes."""
        return int(min(self.config.axes_lens[1:]))

    def default_size(self, pipe) -> tuple[int, int]:
        """The pipeline's 1024x1024 (the trained size), or the largest square the model's RoPE tables cover."""
        side = min(1024, self.grid_side() * self.size_multiple(pipe))
        return side, side

    def example_inputs(self, batch_size: int = 2, sequence_length: int | None = None,
                       seed: int = 0, latent: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        config = self.config
        gen = torch.Generator().manual_seed(seed)
        tokens = sequence_length or 512
        side = min(64, self.grid_side() * self.latent_patch())  # 512x512 pixels (1024 tokens); 1024x1024 is 128
        height, width = latent or (side, side)
        mask = torch.ones(batch_size, tokens)
        mask[:, tokens // 2:] = 0
        inputs = {
            "hidden_states": torch.randn(batch_size, config.in_channels, height, width, generator=gen),  # (B, C, h, w)
            "t": torch.full((batch_size,), 0.5),  # (B,) 1 - sigma
            "encoder_hidden_states": torch.randn(batch_size, tokens, config.cap_feat_dim, generator=gen),  # (B, T, D)
            "encoder_attention_mask": mask,  # (B, T): 1 for a token, 0 for padding
        }
        return {k: v.to(self.module.device, self.module.dtype) for k, v in inputs.items()}

    # --- records: the module's lists <-> the graph's batched tensors ------------------------------------------
    def record(self, args: tuple, kwargs: dict) -> dict:
        record = super().record(args, kwargs)
        if isinstance(record.get("x"), (list, tuple)):
            record["x"] = torch.stack(list(record["x"]))  # (B, C, 1, h, w), a copy of the pipeline's latents
        if isinstance(record.get("cap_feats"), (list, tuple)):
            record["cap_feats"] = list(record["cap_feats"])  # the pipeline's own caption tensors, kept as they are
        return record

    def batch_size(self, record: dict) -> int:
        return len(record["x"]) if "x" in record else record["hidden_states"].shape[0]

    def flat_inputs(self, record: dict) -> dict[str, torch.Tensor]:
        if "hidden_states" in record:
            return {k: record[k] for k in self.input_names(record)}
        latents = torch.stack(list(record["x"])) if isinstance(record["x"], (list, tuple)) else record["x"]
        if latents.shape[2] != 1:
            raise DiffquantError(f"Z-Image's graph takes one latent frame per sample, got {latents.shape[2]}")
        captions = record["cap_feats"]
        tokens = self.sequence_length()
        if max(len(c) for c in captions) > tokens:
            raise DiffquantError(f"a caption of {max(len(c) for c in captions)} tokens is longer than the {tokens} "
                                 "the Z-Image graph takes: generate with max_sequence_length <= 512")
        features = torch.zeros(len(captions), tokens, captions[0].shape[-1], dtype=captions[0].dtype,
                               device=captions[0].device)
        mask = torch.zeros(len(captions), tokens, dtype=latents.dtype, device=latents.device)
        for k, caption in enumerate(captions):
            features[k, :len(caption)] = caption
            mask[k, :len(caption)] = 1
        return {"hidden_states": latents[:, :, 0], "t": torch.as_tensor(record["t"]),
                "encoder_hidden_states": features, "encoder_attention_mask": mask}

    def input_names(self, inputs: dict) -> list[str]:
        return [k for k in GRAPH_INPUTS if isinstance(inputs.get(k), torch.Tensor)]

    def forward_kwargs(self, flat: dict[str, torch.Tensor]) -> dict:
        captions = [c[m > 0.5] for c, m in zip(flat["encoder_hidden_states"], flat["encoder_attention_mask"])]
        return {"x": flat["hidden_states"].unsqueeze(2), "t": flat["t"], "cap_feats": captions}

    def module_output(self, out: torch.Tensor, record: dict):
        return list(out.unsqueeze(2).unbind(0))  # per sample (C, 1, h, w), as the module returns it

    def output_tensor(self, out) -> torch.Tensor:
        return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out

    def __call__(self, flat: dict[str, torch.Tensor]) -> torch.Tensor:
        # Called as the module (its forward swapped for a while), so that the export's node names carry its
        # layers' names under the wrapper's, as every family's do.
        with _batched(self.module):
            return self.module(*(flat[k] for k in GRAPH_INPUTS))


_QKV = re.compile(r"(.+)\.attention\.to_([qkv])\.weight")
# diffusers' names -> the original ones, applied in order (the converter's renames, the other way).
_RENAMES = ((".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
            (".attention.norm_k.", ".attention.k_norm."))
_PATCHED = (("all_x_embedder.", "x_embedder."), ("all_final_layer.", "final_layer."))
_DEFAULT_PATCH = "2-1"  # the converter's only patch key


def _original_name(key: str) -> str:
    for new, old in _PATCHED:
        if key.startswith(new):
            patch, _, rest = key[len(new):].partition(".")
            if patch != _DEFAULT_PATCH:
                raise ValueError(f"{key}: the original Z-Image layout has only the {_DEFAULT_PATCH} patch's {old[:-1]}")
            return old + rest
    for new, old in _RENAMES:
        key = key.replace(new, old)
    return key


def _batched_forward(model, latents: torch.Tensor, timestep: torch.Tensor, captions: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """The module's forward on batched tensors, the same arithmetic as its per-sample lists (diffusers'
    `ZImageTransformer2DModel.forward`, plain mode): only the batch varies, and RoPE is real-valued cos/sin (ONNX
    has no complex tensors). Returns (B, C, h, w)."""
    patch = int(model.all_patch_size[0])
    key = f"{patch}-{model.all_f_patch_size[0]}"
    channels, height, width = latents.shape[1:]
    rows, cols = height // patch, width // patch
    tokens = rows * cols
    image_len = tokens + (-tokens) % SEQ_MULTIPLE
    text_len = captions.shape[1] + (-captions.shape[1]) % SEQ_MULTIPLE
    captions = F.pad(captions, (0, 0, 0, text_len - captions.shape[1]))
    real = F.pad(mask, (0, text_len - mask.shape[1])) > 0.5  # (B, T): the caption's own tokens
    # Each caption is padded with pad tokens to a multiple of 32, all attended; the image's first position follows.
    padded = (real.long().sum(-1) + SEQ_MULTIPLE - 1) // SEQ_MULTIPLE * SEQ_MULTIPLE  # (B,)
    cos, sin = _rope_tables(model)
    adaln = model.t_embedder(timestep * model.t_scale).type_as(latents)

    x = latents.reshape(-1, channels, rows, patch, cols, patch).permute(0, 2, 4, 3, 5, 1)
    x = model.all_x_embedder[key](x.reshape(-1, tokens, patch * patch * channels))
    x = F.pad(x, (0, 0, 0, image_len - tokens))
    is_pad = torch.arange(image_len, device=x.device) >= tokens
    x = torch.where(is_pad[None, :, None], model.x_pad_token.type_as(x), x)
    image_rope = _image_rope(cos, sin, padded, rows, cols, image_len)  # (B, N, half, 2)
    for layer in model.noise_refiner:
        x = layer(x, None, image_rope, adaln)

    cap = model.cap_embedder(captions)
    cap = torch.where(real[..., None], cap, model.cap_pad_token.type_as(cap))
    positions = torch.arange(text_len, device=cap.device)
    text_rope = torch.stack([_axes(cos, positions + 1), _axes(sin, positions + 1)], -1)[None]  # (1, T, half, 2)
    attended = positions[None] < padded[:, None]  # (B, T)
    for layer in model.context_refiner:
        cap = layer(cap, attended, text_rope)

    unified = torch.cat([x, cap], 1)
    rope = torch.cat([image_rope, text_rope.expand(image_rope.shape[0], -1, -1, -1)], 1)
    attended = torch.arange(image_len + text_len, device=cap.device)[None] < (image_len + padded)[:, None]
    for layer in model.layers:
        unified = layer(unified, attended, rope, adaln)
    out = model.all_final_layer[key](unified[:, :tokens], c=adaln)  # (B, tokens, p * p * C)
    out = out.reshape(-1, rows, cols, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(-1, channels, height, width)


def _rope_tables(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per RoPE axis, the cos and sin of the module's own frequency table (position, dim / 2)."""
    embedder = model.rope_embedder
    tables = embedder.precompute_freqs_cis(embedder.axes_dims, embedder.axes_lens, theta=embedder.theta)
    device = model.x_pad_token.device
    return [t.real.to(device) for t in tables], [t.imag.to(device) for t in tables]


def _axes(tables: list[torch.Tensor], first: torch.Tensor) -> torch.Tensor:
    """Caption tokens' angles: position `first` on the first axis, 0 on the others; (T, half)."""
    zero = torch.zeros_like(first)
    return torch.cat([tables[0][first], tables[1][zero], tables[2][zero]], -1)


def _image_rope(cos, sin, padded: torch.Tensor, rows: int, cols: int, length: int) -> torch.Tensor:
    """Image tokens' rotations (B, length, half, 2): real tokens at (padded caption + 1, row, column), pad tokens at
    (0, 0, 0), as the module's position ids."""
    device = padded.device
    grid_rows, grid_cols = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device),
                                          indexing="ij")
    pad = length - rows * cols
    grid_rows = F.pad(grid_rows.reshape(-1), (0, pad))
    grid_cols = F.pad(grid_cols.reshape(-1), (0, pad))
    real = (torch.arange(length, device=device) < rows * cols)[None, :, None]  # (1, N, 1)
    parts = []
    for tables in (cos, sin):
        first = torch.where(real, tables[0][padded + 1][:, None], tables[0][0])  # (B, N, d0 / 2)
        rest = torch.cat([tables[1][grid_rows], tables[2][grid_cols]], -1)  # (N, (d1 + d2) / 2)
        parts.append(torch.cat([first, rest.expand(first.shape[0], -1, -1)], -1))
    return torch.stack(parts, -1)


class _RealRopeProcessor:
    """diffusers' ZSingleStreamAttnProcessor with its rotary embedding in real arithmetic: `freqs_cis` is
    (..., dim / 2, 2) cos and sin, each pair (a, b) of the query and key turned to (a cos - b sin, a sin + b cos), the
    complex product the module computes."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        query, key, value = (layer(hidden_states).unflatten(-1, (attn.heads, -1))
                             for layer in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = _rotate(query, freqs_cis), _rotate(key, freqs_cis)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3)
        # a Cast only where the dtype changes: an exported no-op Cast in front of to_out lost its producer in the
        # int4 (MatMulNBits) export and ONNX Runtime refused the graph
        out = attn.to_out[0](out if out.dtype == query.dtype else out.to(query.dtype))
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out


def _rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, S, heads, half, 2)
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2).type_as(x)


@contextmanager
def _batched(model) -> Iterator[None]:
    """While active, the module's forward is `_batched_forward` and its attentions rotate with real-valued RoPE."""
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    attentions = [m for m in model.modules() if isinstance(getattr(m, "processor", None), ZSingleStreamAttnProcessor)]
    processors = [m.processor for m in attentions]
    own = model.__dict__.get("forward")  # an instance forward already there (accelerate's hooks) comes back
    model.forward = _batched_forward.__get__(model)
    for m in attentions:
        m.processor = _RealRopeProcessor()
    try:
        yield
    finally:
        for m, processor in zip(attentions, processors):
            m.processor = processor
        if own is None:
            del model.forward
        else:
            model.forward = own
