"""Train shapes-sd from scratch on CPU: the VAE first, then the UNet and text encoder together.

    python -m diffquant.shapes.train --out DIR

Seeded and reproducible; writes a diffusers folder loadable with
`StableDiffusionPipeline.from_pretrained(DIR)` and a loss log `training_log.csv` beside the weights.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..progress import progress
from . import dataset
from .shapeeval import evaluate
from .model import DEFAULT_GUIDANCE, DEFAULT_STEPS, build_components, scheduler_config, write_tokenizer

logger = logging.getLogger(__name__)
CAPTION_DROPOUT = 0.1  # empty caption 10% of the time, for classifier-free guidance


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
    """Reconstruction (L1 + MSE) plus a tiny KL term; returns the latent scaling factor (1 / std)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps))
    vae.train()
    for step in progress(range(steps), desc="VAE", disable=quiet):
        images, _ = dataset.batch(seed=1_000_000 + step, n=batch_size)
        x = torch.from_numpy(images)  # (B, 3, H, W)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log.writerow(["vae", step, f"{loss.item():.5f}"])
    vae.eval()
    with torch.no_grad():
        images, captions = dataset.batch(seed=999, n=256)
        posterior = vae.encode(torch.from_numpy(images)).latent_dist
        recon = vae.decode(posterior.mode()).sample
    accuracy = evaluate(to_pil(recon), captions)
    logger.info("VAE reconstructions, ShapeEval: %s", {k: round(v, 3) for k, v in accuracy.items() if not k.startswith("n_")})
    return float(1.0 / posterior.sample().std())


def train_unet(vae, unet, text_encoder, tokenizer, noise_scheduler, steps: int, batch_size: int,
               lr: float, log: csv.writer, quiet: bool):
    """v-prediction diffusion loss with caption dropout; leaves the EMA weights in `unet`/`text_encoder`."""
    from diffusers.training_utils import EMAModel

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps))
    ema_unet = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, power=0.75)
    ema_text = EMAModel(text_encoder.parameters(), decay=0.999, use_ema_warmup=True, power=0.75)
    scale = vae.config.scaling_factor
    unet.train()
    text_encoder.train()
    gen = torch.Generator().manual_seed(1)
    for step in progress(range(steps), desc="UNet", disable=quiet):
        images, captions = dataset.batch(seed=step, n=batch_size)
        drop = torch.rand(batch_size, generator=gen) < CAPTION_DROPOUT
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            latents = vae.encode(torch.from_numpy(images)).latent_dist.sample(gen) * scale  # (B, 4, h, w)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise_scheduler.get_velocity(latents, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        log.writerow(["unet", step, f"{loss.item():.5f}"])
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    unet.eval()
    text_encoder.eval()


def train(out: Path, vae_steps: int = 800, unet_steps: int = 2000, batch_size: int = 64,
          seed: int = 0, quiet: bool = False, vae_from: Path | None = None) -> Path:
    """Train all components and save the pipeline to `out` (replaced atomically). Returns `out`."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    out = Path(out)
    work = Path(tempfile.mkdtemp(prefix=".shapes-train-", dir=out.parent if out.parent.exists() else None))
    write_tokenizer(work / "tokenizer")
    vae, unet, text_encoder, tokenizer = build_components(work / "tokenizer")
    started = time.perf_counter()
    with open(work / "training_log.csv", "w", newline="") as f:
        log = csv.writer(f)
        log.writerow(["stage", "step", "loss"])
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
        logger.info("VAE done in %.0f s, latent scaling factor %.3f", time.perf_counter() - started, scaling)
        noise_scheduler = DDPMScheduler.from_config(scheduler_config())
        train_unet(vae, unet, text_encoder, tokenizer, noise_scheduler, unet_steps, batch_size,
                   lr=5e-4, log=log, quiet=quiet)
    minutes = (time.perf_counter() - started) / 60
    pipe = StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler.from_config(scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(work, safe_serialization=True)
    (work / "README.md").write_text(
        f"# shapes-sd\n\nTrained by `python -m diffquant.shapes.train` (seed {seed}, VAE {vae_steps} steps"
        f"{' reused from an earlier run' if vae_from else ''}, UNet+text {unet_steps} steps x {batch_size}) "
        f"in {minutes:.1f} min on CPU.\n"
        f"Defaults: {DEFAULT_STEPS} DDIM steps, guidance {DEFAULT_GUIDANCE}.\n"
    )
    work.chmod(0o755)
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    logger.info("trained in %.1f min, saved to %s", minutes, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffquant.shapes.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the pipeline to")
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--unet-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--vae-from", type=Path, help="reuse the vae/ folder of an earlier run (skips the VAE stage)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    train(args.out, args.vae_steps, args.unet_steps, args.batch_size, args.seed, args.quiet, args.vae_from)


if __name__ == "__main__":
    main()
