"""Denoiser-output SQNR on calibration records: RTN vs Quark's SVDQuant (as shipped, with fixed arguments) vs diffquant's."""
import sys, fnmatch; sys.path.insert(0, "probes")
from common import *
from diffquant.backends.quark.svdquant import apply_svdquant

pipe, cal = load(ncal=4, steps=10, keep=4)
held = capture_denoiser_inputs(pipe, sample_captions(4, seed=77), CalibrationConfig(size=4, steps=10, timesteps=4, batch_size=4))
unet = pipe.unet
tg = [n for n in targets(unet) if not fnmatch.fnmatch(n, "*time_emb*")]
ex = non_targets(unet, tg)
ref = outputs(unet, held)
print("targets", len(tg), flush=True)
for w4a4 in (False, True):
    q = quark_quantize(copy.deepcopy(unet), int4_qconfig(ex, w4a4=w4a4), None)
    print("RTN %s  held-out SQNR %.2f" % ("w4a4" if w4a4 else "w4a16", sqnr(ref, outputs(q, held))), flush=True)
which = sys.argv[1:] or ["quark", "mine"]
if "quark" in which:
    mod = patched_svdquant_fp32()
    from quark.torch.quantization.config.config import SVDQuantConfig
    # Quark's processor with exclusions it can match and every target decomposed (min_layer_size=0)
    f = copy.deepcopy(unet)
    mod.SVDQuantProcessor(f, SVDQuantConfig(exclude_patterns=ex, min_layer_size=0), cal).apply()
    print("quark processor (exact excludes, min_layer_size 0), float: SQNR %.2f" % sqnr(ref, outputs(f, held)), flush=True)
    ex2 = [n for n, m in f.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not n.endswith(".layer")]
    for w4a4 in (False, True):
        q = quark_quantize(copy.deepcopy(f), int4_qconfig(ex2, w4a4=w4a4), None)
        print("  + int4 %s: SQNR %.2f" % ("w4a4" if w4a4 else "w4a16", sqnr(ref, outputs(q, held))), flush=True)
if "mine" in which:
    for mode in ("w4a16", "w4a4"):
        for rank in (16, 32):
            t = time.time()
            q = apply_svdquant(copy.deepcopy(unet), cal, tg, mode=mode, rank=rank)
            al = [v["alpha"] for v in q.diffquant_svdquant["layers"].values()]
            print("diffquant svdquant %s r%d: SQNR %.2f  (%.0fs; alphas %s)" % (mode, rank, sqnr(ref, outputs(q, held)), time.time() - t,
                  {a: al.count(a) for a in set(al)}), flush=True)
