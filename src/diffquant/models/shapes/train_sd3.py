"""Train shapes-sd3 from scratch on CPU: an MMDiT and its three text encoders, by flow matching on
shapes-sd's latents (its VAE is reused, frozen).

    python -m diffquant.models.shapes.train_sd3 --out DIR

Seeded and reproducible; writes a diffusers folder loadable with `DiffusionPipeline.from_pretrained(DIR)`
and a loss log `training_log.csv` beside the weights.
"""

from __future__ import annotations

import argparse
import csv
import logging
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffquant.core.progress import progress
from diffquant.models.shapes import dataset
from diffquant.models.shapes.model import WEIGHTS_DIR, write_profile_marker, write_tokenizer
from diffquant.models.shapes.model_sd3 import (SD3_DEFAULT_GUIDANCE, SD3_DEFAULT_STEPS, SD3_MAX_SEQUENCE_LENGTH, build_sd3_components,
                        sd3_scheduler_config, write_t5_tokenizer)
from diffquant.models.shapes.train import AUX_WEIGHT, CAPTION_DROPOUT, TRAIN_P_POSITION, _cosine_lr, attribute_heads, attribute_loss
from diffquant.core.artifacts import atomic_dir

logger = logging.getLogger(__name__)
DATA_SEED_STRIDE = 1_000_000  # batch seeds of run seed s: s * stride + step


def sd3_pipeline(vae, transformer, text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_3):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**sd3_scheduler_config()), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def train_transformer(pipe, steps: int, batch_size: int, lr: float, log: csv.writer, quiet: bool,
                      checkpoint=None, checkpoint_every: int = 0, seed: int = 0) -> None:
    """Flow matching (x_t = (1-s) x0 + s e, target e - x0, logit-normal s) with caption dropout;
    leaves the EMA weights in the pipeline's transformer and text encoders."""
    from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling

    models = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    pooled_width = pipe.transformer.config.pooled_projection_dim
    heads = attribute_heads(pooled_width)  # trained with the rest, not saved (see train.AUX_WEIGHT)
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.AdamW(params + list(heads.parameters()), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps))
    emas = [EMAModel(m.parameters(), decay=0.999, use_ema_warmup=True, power=0.75) for m in models]
    vae = pipe.vae
    for m in models:
        m.train()
    gen = torch.Generator().manual_seed(1 + seed)
    for step in progress(range(steps), desc="MMDiT", disable=quiet):
        # another seed draws other batches (a continued run does not replay the first run's data)
        images, captions = dataset.batch(seed=step + DATA_SEED_STRIDE * seed, n=batch_size, p_position=TRAIN_P_POSITION)
        keep = (torch.rand(batch_size, generator=gen) >= CAPTION_DROPOUT)
        prompts = [c if k else "" for c, k in zip(captions, keep.tolist())]
        with torch.no_grad():  # posterior means, scaled and shifted as the pipeline un-does them
            latents = vae.encode(torch.from_numpy(images)).latent_dist.mode()
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor  # (B, 4, 16, 16)
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, prompts, prompts, do_classifier_free_guidance=False, max_sequence_length=SD3_MAX_SEQUENCE_LENGTH,
        )  # (B, 16 + 16, 128), (B, 128)
        noise = torch.randn(latents.shape, generator=gen)
        sigma = compute_density_for_timestep_sampling("logit_normal", batch_size, logit_mean=0.0, logit_std=1.0)
        sigma = sigma.clamp(1e-3, 1.0).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * latents + sigma * noise
        pred = pipe.transformer(hidden_states=noisy, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
                                timestep=sigma.flatten() * 1000).sample
        flow = F.mse_loss(pred, noise - latents)
        aux = attribute_loss(heads, pooled, captions, keep)
        loss = flow + AUX_WEIGHT * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for ema, m in zip(emas, models):
            ema.step(m.parameters())
        log.writerow(["mmdit", step, f"{flow.item():.5f}", f"{aux.item():.4f}"])
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            for ema, m in zip(emas, models):
                ema.store(m.parameters())
                ema.copy_to(m.parameters())
            checkpoint(step + 1)
            for ema, m in zip(emas, models):
                ema.restore(m.parameters())
    for ema, m in zip(emas, models):
        ema.copy_to(m.parameters())
        m.eval()


def _continue_from(folder: Path, components: tuple) -> tuple:
    """The fresh components with the weights of a trained shapes-sd3 folder (same tokenizers: they are
    written from the grammar)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    if not (folder / "transformer").is_dir():
        raise SystemExit(f"--init-from {folder}: not a shapes-sd3 folder (no transformer/); give the folder "
                         "that train_sd3 wrote")
    _, _, _, _, tokenizer, tokenizer_3 = components
    return (SD3Transformer2DModel.from_pretrained(folder / "transformer"),
            CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder", use_safetensors=True),
            CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", use_safetensors=True),
            T5EncoderModel.from_pretrained(folder / "text_encoder_3", use_safetensors=True),
            tokenizer, tokenizer_3)


def train(out: Path, steps: int = 4500, batch_size: int = 32, seed: int = 0, quiet: bool = False,
          vae_from: Path = WEIGHTS_DIR / "vae", num_layers: int = 6, checkpoint_every: int = 500,
          lr: float = 3e-4, init_from: Path | None = None) -> Path:
    """Train shapes-sd3 and save the pipeline to `out` (replaced atomically). Returns `out`.

    Every `checkpoint_every` steps a complete pipeline (EMA weights) is saved under `<out>-checkpoints/`.
    `init_from`: a shapes-sd3 folder whose transformer and text encoders training continues from (fresh
    attribute heads, optimizer and learning-rate schedule)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    out = Path(out)
    checkpoints = out.parent / f"{out.name}-checkpoints"
    with atomic_dir(out) as work:  # an interrupted run keeps its checkpoints, not a half-written folder
        write_tokenizer(work / "tokenizer")
        write_t5_tokenizer(work / "tokenizer_3")
        components = build_sd3_components(work / "tokenizer", work / "tokenizer_3", num_layers=num_layers)
        if init_from is not None:
            components = _continue_from(Path(init_from), components)
        vae = AutoencoderKL.from_pretrained(vae_from)
        vae.register_to_config(shift_factor=0.0)  # SD3's pipeline shifts latents; shapes-sd's VAE has none
        vae.requires_grad_(False)
        pipe = sd3_pipeline(vae, *components)
        started = time.perf_counter()
        with open(work / "training_log.csv", "w", newline="") as f:
            log = csv.writer(f)
            log.writerow(["stage", "step", "loss", "aux_loss"])

            def checkpoint(step: int) -> None:
                f.flush()
                with atomic_dir(checkpoints / f"step-{step}") as tmp:
                    pipe.save_pretrained(tmp, safe_serialization=True)
                    write_profile_marker(tmp, "shapes-sd3")
                logger.info("step %d after %.1f min: checkpoint in %s", step, (time.perf_counter() - started) / 60,
                            checkpoints / f"step-{step}")

            train_transformer(pipe, steps, batch_size, lr=lr, log=log, quiet=quiet, checkpoint=checkpoint,
                              checkpoint_every=checkpoint_every, seed=seed)
        minutes = (time.perf_counter() - started) / 60
        pipe.save_pretrained(work, safe_serialization=True)
        write_profile_marker(work, "shapes-sd3")
        continued = f" --init-from {init_from}" if init_from is not None else ""
        (work / "README.md").write_text(
            f"# shapes-sd3\n\nTrained by `python -m diffquant.models.shapes.train_sd3 --steps {steps} --batch-size "
            f"{batch_size} --layers {num_layers} --lr {lr} --seed {seed}{continued}` in {minutes:.1f} min on CPU, with "
            f"shapes-sd's VAE (frozen) and CLIP tokenizer; the T5 encoder is trained with the rest.\n"
            f"Defaults: {SD3_DEFAULT_STEPS} flow-matching Euler steps, guidance {SD3_DEFAULT_GUIDANCE}, "
            f"max_sequence_length {SD3_MAX_SEQUENCE_LENGTH}.\n"
        )
    logger.info("trained in %.1f min, saved to %s", minutes, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffquant.models.shapes.train_sd3", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the pipeline to")
    parser.add_argument("--steps", type=int, default=4500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--checkpoint-every", type=int, default=500,
                        help="save a complete pipeline every N steps under <out>-checkpoints/ (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--vae-from", type=Path, default=WEIGHTS_DIR / "vae", help="the VAE to reuse (frozen)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue from the weights of a shapes-sd3 folder (fresh optimizer and schedule)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cleans up like Ctrl-C
    if args.threads:
        torch.set_num_threads(args.threads)
    train(args.out, args.steps, args.batch_size, args.seed, args.quiet, args.vae_from, args.layers,
          args.checkpoint_every, args.lr, args.init_from)


if __name__ == "__main__":
    main()
