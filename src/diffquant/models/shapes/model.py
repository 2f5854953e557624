"""shapes-sd: the components of a tiny Stable Diffusion, built from the very same diffusers and
transformers classes as SD 1.5 (AutoencoderKL, UNet2DConditionModel, CLIPTextModel, CLIPTokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

from diffquant.models.shapes.dataset import COLORS, POSITIONS, SHAPES, SIZES

WEIGHTS_DIR = Path(__file__).parent / "weights"
LATENT_CHANNELS = 4
VAE_FACTOR = 2  # 32x32 images -> 16x16 latents: small shapes keep their edges (f=4 blurred them)
TEXT_WIDTH = 128
MAX_TOKENS = 16  # the longest caption of the grammar is 11 words + start/end
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 2.0  # best "all named attributes" of the sweep 1-5 on 200 held-out captions (96.0%; 3: 92.5%)
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def grammar_words() -> list[str]:
    """Every word the caption grammar can produce, sorted."""
    words = {"a", "an", "on", "background"} | set(COLORS) | set(SHAPES) | set(SIZES)
    for position in POSITIONS:
        words.update(position.split())
    return sorted(words)


def write_tokenizer(out_dir: Path) -> None:
    """Write a CLIPTokenizer (vocab.json + merges.txt) whose vocabulary is the grammar's words.

    The BPE merges are trained with the `tokenizers` library so that every grammar word is one token;
    other words fall back to characters, like CLIP's own tokenizer does.
    """
    from tokenizers import Tokenizer, models, trainers
    from transformers import CLIPTokenizer

    words = grammar_words()
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    trainer = trainers.BpeTrainer(
        vocab_size=10_000, special_tokens=list(SPECIAL_TOKENS), end_of_word_suffix="</w>",
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz"), show_progress=False,
    )
    bpe.train_from_iterator(words, trainer)
    raw = out_dir / "bpe"
    raw.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = bpe.model.save(str(raw))
    vocab = json.loads(Path(vocab_file).read_text())
    for char in "abcdefghijklmnopqrstuvwxyz":  # characters at a word's end, for out-of-grammar words
        vocab.setdefault(f"{char}</w>", len(vocab))
    Path(vocab_file).write_text(json.dumps(vocab))
    tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(out_dir)
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()


def build_components(tokenizer_dir: Path):
    """Fresh (untrained) components, seeded by the caller. Returns (vae, unet, text_encoder, tokenizer)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
    )
    unet = UNet2DConditionModel(
        sample_size=32 // VAE_FACTOR, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 128), layers_per_block=1, cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8, norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    return vae, unet, text_encoder, tokenizer


def scheduler_config() -> dict:
    """SD 1.5's scaled-linear betas, rescaled to zero terminal SNR with v-prediction and trailing
    timesteps (Lin et al. 2024). With SD's own schedule the last training step keeps 7% of the image,
    so a model learns to read colours from that leak, which pure noise at inference does not have:
    an epsilon-prediction model trained that way here ignored its captions' colours (26% background)."""
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


# Written by the trainers beside model_index.json: a retrained folder is read with its model's profile (steps,
# guidance, text length; `diffquant.models.profiles.trained_profile`).
PROFILE_FILE = "diffquant_profile.json"


def write_profile_marker(folder: Path, name: str) -> None:
    """Mark a folder a shapes trainer wrote as model `name` ("shapes-sd" or "shapes-sd3")."""
    (Path(folder) / PROFILE_FILE).write_text(json.dumps({"profile": name}) + "\n")
