"""SVDQuant + GPTQ residual: exactness of Quark's rounding of the GPTQ weights, and held-out denoiser SQNR."""
import sys, fnmatch; sys.path.insert(0, "probes")
from common import *
from diffquant.backends.quark.svdquant import apply_svdquant
from diffquant.backends.quark import internals
pipe, cal = load(ncal=4, steps=10, keep=4)
held = capture_denoiser_inputs(pipe, sample_captions(4, seed=77), CalibrationConfig(size=4, steps=10, timesteps=4, batch_size=4))
unet = pipe.unet; ref = outputs(unet, held)
tg = [n for n in targets(unet) if not fnmatch.fnmatch(n, "*time_emb*")]
for mode in ("w4a16", "w4a4"):
    for rank in (16, 32):
        res = []
        for gptq in (False, True):
            q = apply_svdquant(copy.deepcopy(unet), cal, tg, mode=mode, rank=rank, gptq=gptq)
            if gptq:
                lay = q.get_submodule(tg[5] + ".layer")
                assert torch.equal(internals.fake_quantized_weight(lay), lay.weight.float()), "GPTQ weights re-rounded"
            res.append(sqnr(ref, outputs(q, held)))
        print(f"{mode} r{rank}: RTN residual {res[0]:.2f}  GPTQ residual {res[1]:.2f}", flush=True)
