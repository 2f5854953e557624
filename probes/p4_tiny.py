import sys; sys.path.insert(0, "probes"); sys.path.insert(0, "tests")
from common import *
from conftest import build_tiny_sd, build_tiny_sd3
from diffquant.backends.quark.svdquant import apply_svdquant
from diffquant.metrics import sqnr_db
import diffquant as dq, tempfile

for build, group, rank in ((build_tiny_sd, 8, 4), (build_tiny_sd3, 16, 8)):
    d = tempfile.mkdtemp(); build().save_pretrained(d); pipe = dq.load_pipeline(d, device="cpu")
    fam = dq.denoiser_of(pipe); den = fam.module
    cal = capture_denoiser_inputs(pipe, ["a red circle", "a blue square", "a green triangle"], CalibrationConfig(size=3, steps=4, timesteps=2, batch_size=3))
    held = capture_denoiser_inputs(pipe, ["a black star", "a white circle"], CalibrationConfig(size=2, steps=4, timesteps=2, batch_size=2))
    tg = [n for n, m in den.named_modules() if type(m) is torch.nn.Linear and m.in_features % group == 0]
    ex = [n for n, m in den.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n not in tg]
    out = lambda u: torch.cat([u(**r, return_dict=False)[0].flatten() for r in held])
    with torch.no_grad():
        ref = out(den)
        print(type(den).__name__, "targets", len(tg), "of", sum(type(m) is torch.nn.Linear for m in den.modules()), "records", len(cal))
        for w4a4 in (False, True):
            q = quark_quantize(copy.deepcopy(den), int4_qconfig(ex, group=group, w4a4=w4a4), None)
            print(" RTN", w4a4, "%.2f" % sqnr_db(ref, out(q)))
            for r in (rank // 2, rank, 2 * rank):
                t = time.time(); q = apply_svdquant(copy.deepcopy(den), cal, tg, mode="w4a4" if w4a4 else "w4a16", rank=r, group_size=group)
                print("  svd r%d %.2f  %.1fs" % (r, sqnr_db(ref, out(q)), time.time() - t))
