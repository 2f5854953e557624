import sys; sys.path.insert(0, "probes"); sys.path.insert(0, "tests")
from common import *
from conftest import build_tiny_sd3
from diffquant.backends.quark.svdquant import apply_svdquant
from diffquant.backends.quark import internals
from diffquant.metrics import sqnr_db
pipe = build_tiny_sd3()
cal = capture_denoiser_inputs(pipe, ["a red circle", "a blue square"], CalibrationConfig(size=2, steps=3, timesteps=2, batch_size=2))
den = pipe.transformer
tg = [n for n, m in den.named_modules() if type(m) is torch.nn.Linear]
h = copy.deepcopy(den).half()
cal16 = [{k: (v.half() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in r.items()} for r in cal]
out = lambda u, rs: torch.cat([u(**r, return_dict=False)[0].float().flatten() for r in rs])
with torch.no_grad():
    ref = out(den, cal)
    q = apply_svdquant(h, cal16, tg, mode="w4a16", rank=8, group_size=16)
    print({p.dtype for p in q.parameters()})
    a = out(q, cal16); print("fp16 svdquant SQNR %.2f" % sqnr_db(ref, a))
    internals.set_fake_quant([m for m in q.modules() if internals.is_quant_layer(m)], False)
    print("fp16 rounding off SQNR %.2f" % sqnr_db(ref, out(q, cal16)))
