"""shapes-sd3: a tiny Stable Diffusion 3 (MMDiT) on the shapes dataset, built from the same diffusers and
transformers classes as SD3/SD3.5 (SD3Transformer2DModel, two CLIPTextModelWithProjection, a T5EncoderModel,
FlowMatchEulerDiscreteScheduler); it reuses shapes-sd's VAE and CLIP tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from diffquant.models.shapes.model import MAX_TOKENS, grammar_words

SD3_WEIGHTS_DIR = Path(__file__).parent / "weights_sd3"
CLIP_WIDTH = 64  # two CLIP encoders of 64 features: their concatenation is exactly joint_attention_dim
JOINT_WIDTH = 2 * CLIP_WIDTH  # T5 width = joint_attention_dim = caption projection = transformer width
SD3_DEFAULT_STEPS = 25
SD3_DEFAULT_GUIDANCE = 4.0  # best "all named attributes" with size >= 80% of the sweep 2-7 on 200 held-out captions
# The T5 stream of the prompt: the grammar's captions are at most 11 words, so 16 tokens hold them all
# (the pipeline's default of 256 would make every attention 4x longer for padding).
SD3_MAX_SEQUENCE_LENGTH = MAX_TOKENS
T5_SPECIALS = ("<pad>", "</s>", "<unk>")


def write_t5_tokenizer(out_dir: Path) -> None:
    """Write a T5TokenizerFast whose vocabulary is the grammar's words (one token each) plus letters.

    Built offline with `tokenizers`: a Unigram model, a Metaspace pre-tokenizer and "$A </s>", the
    layout of T5's own tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [(s, 0.0) for s in T5_SPECIALS]
    pieces += [(f"\u2581{w}", -1.0) for w in grammar_words()]
    pieces += [("\u2581", -5.0)] + [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    raw = Tokenizer(models.Unigram(pieces, unk_id=T5_SPECIALS.index("<unk>")))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    raw.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    raw.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0, model_max_length=SD3_MAX_SEQUENCE_LENGTH)
    tokenizer.save_pretrained(out_dir)


def build_sd3_components(clip_tokenizer_dir: Path, t5_tokenizer_dir: Path, num_layers: int = 6):
    """Fresh (untrained) SD3 components, seeded by the caller.

    Returns (transformer, text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_3)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel
    from transformers import T5TokenizerFast

    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    tokenizer_3 = T5TokenizerFast.from_pretrained(t5_tokenizer_dir)

    def clip():
        # 3 layers: the pipeline reads the penultimate hidden state; the last one feeds the pooled output.
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH,
            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
            projection_dim=CLIP_WIDTH, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))

    text_encoder, text_encoder_2 = clip(), clip()
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=JOINT_WIDTH, d_kv=32, d_ff=2 * JOINT_WIDTH, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id, decoder_start_token_id=0,
    ))
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=32, num_attention_heads=JOINT_WIDTH // 32, joint_attention_dim=JOINT_WIDTH,
        caption_projection_dim=JOINT_WIDTH, pooled_projection_dim=2 * CLIP_WIDTH, pos_embed_max_size=8,
    )
    return transformer, text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_3


def sd3_scheduler_config() -> dict:
    """Flow matching with shift 1: 32x32 images need no shift towards noise (SD3 uses 3 at 1024 px)."""
    return dict(num_train_timesteps=1000, shift=1.0)
