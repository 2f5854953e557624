"""Image PSNR (16 captions, 25 steps): low ranks, and Quark's processor with arguments that work (1/s folded into R)."""
import sys, fnmatch; sys.path.insert(0, "probes")
from common import *
from diffquant.backends.quark.svdquant import apply_svdquant
from diffquant.quantization import with_denoiser

pipe = dq.load_pipeline(None, device="cpu")
prompts = dq.default_prompts(pipe, 16)
cal = dq.calibrate(pipe, None, size=16, steps=25, timesteps=8)
unet = pipe.unet
tg = [n for n in targets(unet) if not fnmatch.fnmatch(n, "*time_emb*")]
ex = non_targets(unet, tg)
base = dq.generate(pipe, prompts, steps=25, show_progress=False)
def run(label, q):
    imgs = dq.generate(with_denoiser(pipe, "unet", q), prompts, steps=25, show_progress=False)
    p = dq.compare(base, imgs, prompts).psnr_db
    print("%-40s PSNR mean %.2f worst %.2f" % (label, sum(p) / len(p), min(p)), flush=True)
for mode in ("w4a16", "w4a4"):
    for rank in (4, 8):
        run(f"SVDQuant {mode} r{rank}", apply_svdquant(copy.deepcopy(unet), cal, tg, mode=mode, rank=rank))
mod = patched_svdquant_fp32()
from quark.torch.quantization.config.config import SVDQuantConfig
for rank in (16, 32):
    f = copy.deepcopy(unet)
    mod.SVDQuantProcessor(f, SVDQuantConfig(svd_rank=rank, exclude_patterns=ex, min_layer_size=0), cal).apply()
    ex2 = [n for n, m in f.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not n.endswith(".layer")]
    for w4a4 in (False, True):
        q = quark_quantize(copy.deepcopy(f), int4_qconfig(ex2, w4a4=w4a4), None)
        run(f"Quark processor fixed args, 1/s folded {'w4a4' if w4a4 else 'w4a16'} r{rank}", q)
