"""Image PSNR vs fp32 (16 captions, 25 steps): RTN int4 g64 vs diffquant SVDQuant on the same 49 Linears."""
import sys, fnmatch, json; sys.path.insert(0, "probes")
from common import *
from diffquant.backends.quark.svdquant import apply_svdquant
from diffquant.quantization import with_denoiser

pipe = dq.load_pipeline(None, device="cpu")
prompts = dq.default_prompts(pipe, 16)
t = time.time()
cal = dq.calibrate(pipe, None, size=16, steps=25, timesteps=8)
print("calibration", len(cal), "records, %.0fs" % (time.time() - t), flush=True)
unet = pipe.unet
tg = [n for n in targets(unet) if not fnmatch.fnmatch(n, "*time_emb*")]
ex = non_targets(unet, tg)
t = time.time(); base = dq.generate(pipe, prompts, steps=25, show_progress=False); print("baseline %.0fs" % (time.time() - t), flush=True)
assert not set(prompts) & set(cal.prompts)
def run(label, q):
    imgs = dq.generate(with_denoiser(pipe, "unet", q), prompts, steps=25, show_progress=False)
    p = dq.compare(base, imgs, prompts).psnr_db
    print("%-28s PSNR mean %.2f worst %.2f" % (label, sum(p) / len(p), min(p)), flush=True)
which = sys.argv[1:] or ["rtn", "svd"]
if "rtn" in which:
    for w4a4 in (False, True):
        run("RTN int4 g64 " + ("w4a4" if w4a4 else "w4a16"), quark_quantize(copy.deepcopy(unet), int4_qconfig(ex, w4a4=w4a4), None))
if "svd" in which:
    for mode in ("w4a16", "w4a4"):
        for rank in (16, 32):
            run(f"SVDQuant {mode} r{rank}", apply_svdquant(copy.deepcopy(unet), cal, tg, mode=mode, rank=rank))
if "gptq" in which:
    for mode, rank in (("w4a16", 8), ("w4a16", 16), ("w4a16", 32), ("w4a4", 16), ("w4a4", 32)):
        run(f"SVDQuant+GPTQ {mode} r{rank}", apply_svdquant(copy.deepcopy(unet), cal, tg, mode=mode, rank=rank, gptq=True))
if "quark" in which:
    mod = patched_svdquant_fp32()
    from quark.torch.quantization.config.config import SVDQuantConfig
    f = copy.deepcopy(unet)
    mod.SVDQuantProcessor(f, SVDQuantConfig(), cal).apply()
    run("Quark SVDQuant as shipped, float", f)
