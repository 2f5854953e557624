"""Denoiser SQNR (held-out records) with the time-embedding Linears included (61 layers) vs the 49."""
import sys, fnmatch; sys.path.insert(0, "probes")
from common import *
from diffquant.backends.quark.svdquant import apply_svdquant
pipe, cal = load(ncal=4, steps=10, keep=4)
held = capture_denoiser_inputs(pipe, sample_captions(4, seed=77), CalibrationConfig(size=4, steps=10, timesteps=4, batch_size=4))
unet = pipe.unet; ref = outputs(unet, held)
for label, tg in (("49", [n for n in targets(unet) if not fnmatch.fnmatch(n, "*time_emb*")]), ("61 (+time emb)", targets(unet))):
    ex = non_targets(unet, tg)
    for mode in ("w4a16", "w4a4"):
        rtn = sqnr(ref, outputs(quark_quantize(copy.deepcopy(unet), int4_qconfig(ex, w4a4=mode == "w4a4"), None), held))
        svd = sqnr(ref, outputs(apply_svdquant(copy.deepcopy(unet), cal, tg, mode=mode, rank=16), held))
        print(f"{label} {mode}: RTN {rtn:.2f}  SVDQuant r16 {svd:.2f}", flush=True)
