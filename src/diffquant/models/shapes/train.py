"""Train shapes-sd from scratch on CPU: the VAE first, then the UNet and text encoder together.

    python -m diffquant.models.shapes.train --out DIR

Seeded and reproducible; writes a diffusers folder loadable with
`StableDiffusionPipeline.from_pretrained(DIR)` and a loss log `training_log.csv` beside the weights.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffquant.core.progress import progress
from diffquant.models.shapes import dataset
from diffquant.models.shapes.shapeeval import evaluate
from diffquant.models.shapes.model import (DEFAULT_GUIDANCE, DEFAULT_STEPS, build_components, scheduler_config,
                                           write_profile_marker, write_tokenizer)
from diffquant.core.artifacts import atomic_dir

logger = logging.getLogger(__name__)
CAPTION_DROPOUT = 0.1  # empty caption 10% of the time, for classifier-free guidance
# Position words are the rarest and the hardest to learn (the first model followed 22% of them):
# the UNet stage names a position in 75% of its captions instead of the grammar's 50%.
TRAIN_P_POSITION = 0.75
# The first retrained shapes-sd followed colours (98%) but drew shapes at chance (40%): its text encoder
# gave "circle" and "square" captions embeddings with cosine 0.98 (colours: 0.62). Small linear heads on
# the pooled text embedding that must name each attribute of the caption push the encoder to keep the
# words apart; they are used in training only and not saved.
AUX_WEIGHT = 0.1
VAE_EVAL_IMAGES = 256  # reconstructions ShapeEval reads after the VAE stage (its ceiling for the UNet)
AUX_CLASSES = {
    "color": dataset.COLORS, "shape": dataset.SHAPES, "background": dataset.COLORS,
    "size": (None, *dataset.SIZES), "position": (None, *dataset.POSITIONS),
}


def attribute_targets(captions: list[str]) -> dict[str, torch.Tensor]:
    """Class index of each attribute of each caption (None = not named), for the auxiliary heads."""
    specs = [dataset.parse_caption(c) for c in captions]
    return {name: torch.tensor([classes.index(getattr(s, name)) for s in specs]) for name, classes in AUX_CLASSES.items()}


def attribute_heads(width: int) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({n: torch.nn.Linear(width, len(c)) for n, c in AUX_CLASSES.items()})


def attribute_loss(heads: torch.nn.ModuleDict, pooled: torch.Tensor, captions: list[str],
                   keep: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the heads over the captions not dropped (`keep`)."""
    if not keep.any():
        return torch.zeros(())
    targets = attribute_targets([c for c, k in zip(captions, keep.tolist()) if k])
    return sum(F.cross_entropy(heads[n](pooled[keep]), targets[n]) for n in AUX_CLASSES) / len(AUX_CLASSES)


def _edge_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between the images' horizontal and vertical pixel differences: keeps corners and apexes sharp."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(recon), dx(x)) + F.l1_loss(dy(recon), dy(x))


def _cosine_lr(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    from PIL import Image

    array = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def train_vae(vae, steps: int, batch_size: int, lr: float, log: csv.writer, quiet: bool) -> float:
    """Reconstruction (L1 + MSE + edges) plus a tiny KL term; returns the latent scaling factor (1 / std)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps))
    vae.train()
    for step in progress(range(steps), desc="VAE", disable=quiet):
        images, _ = dataset.batch(seed=1_000_000 + step, n=batch_size)
        x = torch.from_numpy(images)  # (B, 3, H, W)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (F.l1_loss(recon, x) + F.mse_loss(recon, x) + 0.5 * _edge_loss(recon, x)
                + 1e-6 * posterior.kl().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log.writerow(["vae", step, f"{loss.item():.5f}"])
    vae.eval()
    with torch.no_grad():
        images, captions = dataset.batch(seed=999, n=VAE_EVAL_IMAGES)
        posterior = vae.encode(torch.from_numpy(images)).latent_dist
        recon = vae.decode(posterior.mode()).sample
    accuracy = evaluate(to_pil(recon), captions)
    logger.info("VAE reconstructions, ShapeEval: %s", {k: round(v, 3) for k, v in accuracy.items() if not k.startswith("n_")})
    return float(1.0 / posterior.mode().std())  # the UNet trains on posterior means


def train_unet(vae, unet, text_encoder, tokenizer, noise_scheduler, steps: int, batch_size: int,
               lr: float, log: csv.writer, quiet: bool, checkpoint=None, checkpoint_every: int = 0,
               aux_weight: float = AUX_WEIGHT):
    """v-prediction diffusion loss with caption dropout (plus the attribute heads' loss on the pooled
    text embedding); leaves the EMA weights in `unet`/`text_encoder`.

    `checkpoint(step)` is called every `checkpoint_every` steps with the EMA weights in place."""
    from diffusers.training_utils import EMAModel

    params = list(unet.parameters()) + list(text_encoder.parameters())
    heads = attribute_heads(text_encoder.config.hidden_size)
    opt = torch.optim.AdamW(params + list(heads.parameters()), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps))
    ema_unet = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, power=0.75)
    ema_text = EMAModel(text_encoder.parameters(), decay=0.999, use_ema_warmup=True, power=0.75)
    scale = vae.config.scaling_factor
    unet.train()
    text_encoder.train()
    gen = torch.Generator().manual_seed(1)
    for step in progress(range(steps), desc="UNet", disable=quiet):
        images, captions = dataset.batch(seed=step, n=batch_size, p_position=TRAIN_P_POSITION)
        keep = torch.rand(batch_size, generator=gen) >= CAPTION_DROPOUT
        prompts = [c if k else "" for c, k in zip(captions, keep.tolist())]
        with torch.no_grad():  # posterior means: the sampling noise only blurs small shapes
            latents = vae.encode(torch.from_numpy(images)).latent_dist.mode() * scale  # (B, 4, h, w)
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        hidden, pooled = text_encoder(ids)[:2]  # (B, T, D), (B, D)
        pred = unet(noisy, t, hidden).sample
        diffusion = F.mse_loss(pred, noise_scheduler.get_velocity(latents, noise, t))
        aux = attribute_loss(heads, pooled, captions, keep) if aux_weight else torch.zeros(())
        loss = diffusion + aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        log.writerow(["unet", step, f"{diffusion.item():.5f}", f"{aux.item():.4f}"])
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            for ema, model in ((ema_unet, unet), (ema_text, text_encoder)):
                ema.store(model.parameters())
                ema.copy_to(model.parameters())
            checkpoint(step + 1)
            for ema, model in ((ema_unet, unet), (ema_text, text_encoder)):
                ema.restore(model.parameters())
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    unet.eval()
    text_encoder.eval()


def _pipeline(vae, unet, text_encoder, tokenizer):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler.from_config(scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def train(out: Path, vae_steps: int = 1000, unet_steps: int = 7000, batch_size: int = 32,
          seed: int = 0, quiet: bool = False, vae_from: Path | None = None, checkpoint_every: int = 500,
          aux_weight: float = AUX_WEIGHT) -> Path:
    """Train all components and save the pipeline to `out` (replaced atomically). Returns `out`.

    While training, the VAE and every `checkpoint_every` UNet steps a complete pipeline (EMA weights)
    are saved under `<out>-checkpoints/`, so an interrupted run keeps what it finished."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    out = Path(out)
    checkpoints = out.parent / f"{out.name}-checkpoints"
    with atomic_dir(out) as work:  # an interrupted run keeps its checkpoints, not a half-written folder
        write_tokenizer(work / "tokenizer")
        vae, unet, text_encoder, tokenizer = build_components(work / "tokenizer")
        started = time.perf_counter()
        with open(work / "training_log.csv", "w", newline="") as f:
            log = csv.writer(f)
            log.writerow(["stage", "step", "loss", "aux_loss"])
            if vae_from is not None:  # the VAE stage of an earlier run with the same seed and steps
                from diffusers import AutoencoderKL

                vae = AutoencoderKL.from_pretrained(vae_from)
                scaling = vae.config.scaling_factor
                torch.manual_seed(seed + 1)
            else:
                scaling = train_vae(vae, vae_steps, batch_size=32, lr=1e-3, log=log, quiet=quiet)
                torch.manual_seed(seed + 1)  # the UNet stage starts from the same RNG state either way
            vae.register_to_config(scaling_factor=scaling)
            vae.requires_grad_(False)
            vae_minutes = (time.perf_counter() - started) / 60
            logger.info("VAE done in %.1f min, latent scaling factor %.3f", vae_minutes, scaling)
            with atomic_dir(checkpoints / "vae") as tmp:
                vae.save_pretrained(tmp, safe_serialization=True)

            def checkpoint(step: int) -> None:
                f.flush()
                with atomic_dir(checkpoints / f"step-{step}") as tmp:
                    _pipeline(vae, unet, text_encoder, tokenizer).save_pretrained(tmp, safe_serialization=True)
                    write_profile_marker(tmp, "shapes-sd")
                logger.info("step %d after %.1f min: checkpoint in %s", step, (time.perf_counter() - started) / 60,
                            checkpoints / f"step-{step}")

            noise_scheduler = DDPMScheduler.from_config(scheduler_config())
            train_unet(vae, unet, text_encoder, tokenizer, noise_scheduler, unet_steps, batch_size,
                       lr=5e-4, log=log, quiet=quiet, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                       aux_weight=aux_weight)
        minutes = (time.perf_counter() - started) / 60
        _pipeline(vae, unet, text_encoder, tokenizer).save_pretrained(work, safe_serialization=True)
        write_profile_marker(work, "shapes-sd")
        (work / "README.md").write_text(
            f"# shapes-sd\n\nTrained by `python -m diffquant.models.shapes.train --vae-steps {vae_steps} "
            f"--unet-steps {unet_steps} --batch-size {batch_size} --aux-weight {aux_weight} --seed {seed}`"
            f"{' (VAE reused from an earlier run)' if vae_from else ''} in {minutes:.1f} min on CPU "
            f"(VAE {vae_minutes:.1f} min).\n"
            f"Defaults: {DEFAULT_STEPS} DDIM steps, guidance {DEFAULT_GUIDANCE}.\n"
        )
    logger.info("trained in %.1f min, saved to %s", minutes, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffquant.models.shapes.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the pipeline to")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--unet-steps", type=int, default=7000)
    parser.add_argument("--checkpoint-every", type=int, default=500,
                        help="save a complete pipeline every N UNet steps under <out>-checkpoints/ (0: never)")
    parser.add_argument("--batch-size", type=int, default=32, help="UNet-stage batch (the VAE stage uses 32)")
    parser.add_argument("--aux-weight", type=float, default=AUX_WEIGHT,
                        help="weight of the attribute heads' loss on the pooled text embedding (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--vae-from", type=Path, help="reuse the vae/ folder of an earlier run (skips the VAE stage)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cleans up like Ctrl-C
    if args.threads:
        torch.set_num_threads(args.threads)
    train(args.out, args.vae_steps, args.unet_steps, args.batch_size, args.seed, args.quiet, args.vae_from,
          args.checkpoint_every, args.aux_weight)


if __name__ == "__main__":
    main()
