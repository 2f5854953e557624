import sys; sys.path.insert(0, "probes")
from common import *

pipe, cal = load()
unet = pipe.unet
ref = outputs(unet, cal)
tg = targets(unet); ex = non_targets(unet, tg)
print("targets", len(tg), "records", len(cal))
t = time.time(); q = quark_quantize(copy.deepcopy(unet), int4_qconfig(ex), cal); print("RTN w4a16 SQNR %.2f  (%.0fs)" % (sqnr(ref, outputs(q, cal)), time.time() - t))
q = quark_quantize(copy.deepcopy(unet), int4_qconfig(ex, w4a4=True), cal); print("RTN w4a4 SQNR %.2f" % sqnr(ref, outputs(q, cal)))
from quark.torch.quantization.config.config import SVDQuantConfig
try:
    quark_quantize(copy.deepcopy(unet), int4_qconfig(ex, algo=[SVDQuantConfig()]), cal)
except Exception as e:
    print("as shipped:", type(e).__name__, str(e)[:200])
mod = patched_svdquant_fp32()
q = quark_quantize(copy.deepcopy(unet), int4_qconfig(ex, algo=[SVDQuantConfig()]), cal); print("SVDQuant w4a16 (fp32 patch) SQNR %.2f" % sqnr(ref, outputs(q, cal)))
# float only: SVDQuant processor without any quantizer
f = copy.deepcopy(unet)
p = mod.SVDQuantProcessor(f, SVDQuantConfig(), cal); p.apply()
n_ecm = sum(isinstance(m, mod.ErrorCorrectedModule) for m in f.modules())
print("SVDQuant processor only, no quantization: ECMs %d, SQNR %.2f" % (n_ecm, sqnr(ref, outputs(f, cal))))
print("layers smoothed:", len(p.smoother.activation_max))
