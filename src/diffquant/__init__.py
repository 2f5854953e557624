"""diffquant: quantize the denoiser of diffusion pipelines (SD 1.x/2.x and SDXL UNets, SD3/SD3.5 and FLUX.1
transformers) with AMD Quark, measure what it costs, export to ONNX.

The public API follows the notebook flow::

    import diffquant as dq
    pipe = dq.load_pipeline()                      # shapes-sd; "shapes-sd3", a Hub id or a local folder
    prompts = dq.default_prompts(pipe, 4)
    baseline = dq.generate(pipe, prompts, seed=1024)
    q = dq.quantize(pipe, "int8-w")                # a new pipeline; `pipe` is untouched
    images = dq.generate(q, prompts, seed=1024)
    w8a8 = dq.quantize(pipe, "w8a8-int8", calibration=dq.calibrate(pipe, prompts))  # activations too
    print(dq.compare(baseline, images, prompts).summary())
    dq.export_onnx(q, "out/int8-w")

Names are imported lazily so that `import diffquant` (and `diffquant --help`) stays instant.
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "load_pipeline": "models.pipeline", "calibrate": "quantization.calibration", "quantize": "quantization.api",
    "save_quantized": "quantization.api", "load_quantized": "quantization.api", "layer_report": "quantization.api",
    "generate": "models.generation", "default_prompts": "models.generation", "image_grid": "models.generation",
    "compare": "evaluate.metrics", "export_onnx": "export.onnx", "export_pipeline": "export.optimum",
    "view": "export.viewer", "run": "workflow", "RunConfig": "core.config", "RunResult": "core.results",
    "denoiser_of": "models.denoisers", "profile_of": "models.profiles", "Recipe": "core.recipes",
    "RECIPES": "core.recipes", "TensorQuant": "core.recipes", "PerTensor": "core.recipes", "PerChannel": "core.recipes",
    "Smoothing": "core.recipes", "get_recipe": "core.recipes", "DiffquantError": "core.errors",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'diffquant' has no attribute {name!r}")
