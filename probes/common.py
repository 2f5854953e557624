"""Shared probe helpers (not part of the package)."""
import copy, os, sys, time, re, types
os.environ.setdefault("QUARK_DISABLE_COMPILE", "1"); os.environ.setdefault("QUARK_LOG_LEVEL", "error")
import torch
import diffquant as dq
from diffquant.calibration import CalibrationConfig, capture_denoiser_inputs
from diffquant.shapes.dataset import sample_captions

torch.set_num_threads(1)


def load(ncal=4, steps=10, keep=4):
    pipe = dq.load_pipeline(None, device="cpu")
    cal = capture_denoiser_inputs(pipe, sample_captions(ncal, seed=31337), CalibrationConfig(size=ncal, steps=steps, timesteps=keep, batch_size=ncal))
    return pipe, cal


def targets(unet, group=64):
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features % group == 0]


def non_targets(unet, tg):
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n not in tg]


@torch.no_grad()
def outputs(unet, records):
    return [unet(**r).sample.float() for r in records]


def sqnr(ref, out):
    num = sum(float((r ** 2).sum()) for r in ref)
    den = sum(float(((r - o) ** 2).sum()) for r, o in zip(ref, out))
    return 10 * torch.log10(torch.tensor(num / max(den, 1e-30))).item()


def int4_qconfig(exclude, group=64, w4a4=False, algo=None):
    from quark.torch.quantization.config.config import QConfig, QLayerConfig, Int4PerGroupSpec
    w = Int4PerGroupSpec(ch_axis=-1, is_dynamic=False, scale_type="float", group_size=group).to_quantization_spec()
    a = Int4PerGroupSpec(ch_axis=-1, is_dynamic=True, group_size=group).to_quantization_spec() if w4a4 else None
    return QConfig(global_quant_config=QLayerConfig(weight=w, input_tensors=a), exclude=list(exclude), algo_config=algo or [])


def quark_quantize(unet, qconfig, cal):
    import quark.torch as qt
    return qt.ModelQuantizer(qconfig).quantize_model(unet, cal)


def patched_svdquant_fp32():
    """Quark's svdquant module with the one line that stores fp32 residuals as bf16 removed (issue 17 probe)."""
    import quark.torch.algorithm.svdquant.svdquant as mod
    src = open(mod.__file__).read()
    line = "            if orig_dtype == torch.float32:\n                orig_dtype = torch.bfloat16\n"
    assert line in src
    code = compile(src.replace(line, ""), mod.__file__, "exec")
    exec(code, mod.__dict__)
    return mod
