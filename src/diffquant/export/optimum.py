"""Stage 6, deploy: the whole pipeline as ONNX, in the folder layout that Hugging Face Optimum's ONNX
Runtime diffusion pipelines load (`ORTDiffusionPipeline.from_pretrained(folder)`), with the quantized UNet
of `export_onnx` (compressed int8/fp8 weights) in it::

    model_index.json             the diffusers pipeline config; its class picks ORTStableDiffusion[XL]Pipeline
    scheduler/ tokenizer[_2]/    as diffusers / transformers save_pretrained write them
    text_encoder[_2]/            model.onnx (input_ids -> last_hidden_state, pooler_output | text_embeds) + config.json
    unet/                        model.onnx (sample, timestep: a scalar, encoder_hidden_states[, text_embeds,
                                 time_ids] -> out_sample): diffquant's QDQ graph + config.json
    vae_encoder/ vae_decoder/    model.onnx (sample -> latent_parameters; latent_sample -> sample) + config.json
    diffquant_pipeline.json      what was exported (recipe, UNet check); Optimum ignores it

The float components go through Optimum's own exporter (`optimum-onnx`, the `deploy` extra), so their
names, dtypes and dynamic axes are the ones its pipelines expect.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffquant.core.artifacts import atomic_dir, write_json
from diffquant.models.denoisers import denoiser_of
from diffquant.core.errors import DiffquantError
from diffquant.export.onnx import export_onnx
from diffquant.core.record import record_of

logger = logging.getLogger(__name__)

MODEL_NAME = "model.onnx"  # optimum.onnxruntime's ONNX_WEIGHTS_NAME, in every component folder
INFO_FILE = "diffquant_pipeline.json"
INFO_VERSION = 1
INSTALL_HINT = "pip install 'optimum-onnx[onnxruntime]' (or diffquant's extra: pip install -e '.[deploy]')"
_FLOAT_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class PipelineExport:
    """A deployable pipeline folder: where, how big each component is, and the quantized UNet's export."""

    path: Path
    components: dict[str, int]
    recipe: str
    export_seconds: float
    unet: dict = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(self.components.values())

    def to_dict(self) -> dict:
        return {"path": str(self.path), "components": self.components, "size_bytes": self.size_bytes,
                "recipe": self.recipe, "export_seconds": self.export_seconds, "unet": self.unet}


def require_exporter():
    """Optimum's diffusion exporter (get_diffusion_models_for_export, export_models), or the one-line error
    saying what to install; callers use it to fail before any slow work."""
    try:
        from optimum.exporters.onnx.convert import export_models
        from optimum.exporters.utils import get_diffusion_models_for_export
    except ImportError:
        raise DiffquantError(f"exporting a deployable ONNX pipeline needs Hugging Face Optimum's exporter: "
                             f"{INSTALL_HINT}") from None
    return get_diffusion_models_for_export, export_models


@contextlib.contextmanager
def _configs_restored(modules):
    """Optimum's exporter marks the text encoders' configs (export_model_type; output_hidden_states for SDXL):
    the caller's pipeline gets its own configs back."""
    configs = {id(c): c for m in modules for c in (m.config, getattr(getattr(m, "text_model", None), "config", None))
               if c is not None}
    saved = {key: dict(vars(config)) for key, config in configs.items()}
    try:
        yield
    finally:
        for key, config in configs.items():
            vars(config).clear()
            vars(config).update(saved[key])


def _export_float_components(pipe, out: Path) -> None:
    """Text encoder(s) and VAE encoder/decoder through Optimum's exporter, each with its config.json."""
    get_models, export_models = require_exporter()
    view = copy.copy(pipe)  # the UNet is diffquant's own export: Optimum's exporter must not touch it
    object.__setattr__(view, "unet", None)
    encoders = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    float_dtype = _FLOAT_DTYPES.get(pipe.dtype, "fp32")
    with _configs_restored(encoders), torch.no_grad():
        models = get_models(view, float_dtype=float_dtype)
        for name, (module, _) in models.items():
            target = out / name
            if hasattr(module, "save_config"):  # diffusers models (the VAE)
                module.save_config(target)
            else:  # transformers models (the text encoders)
                module.config.save_pretrained(target)
        export_models(models_and_onnx_configs=models, output_dir=out,
                      output_names=[f"{name}/{MODEL_NAME}" for name in models], device=pipe.device.type,
                      dtype=float_dtype if float_dtype == "fp16" else None)


def _with_scalar_timestep(model):
    """Make the UNet's `timestep` input a scalar, as Optimum's UNet export does and its ORTUnet feeds it
    (with a (batch,) input it unsqueezes every step and warns the user to re-export). An Unsqueeze gives
    the traced graph back the (1,) tensor that its timestep embedding broadcasts over the batch."""
    import onnx
    from onnx import helper

    graph = model.graph
    timestep = next((i for i in graph.input if i.name == "timestep"), None)
    if timestep is None:
        raise DiffquantError("the UNet graph has no `timestep` input: pass an ONNX file written by diffquant's export")
    inner = "timestep_1d"
    for node in graph.node:
        node.input[:] = [inner if name == "timestep" else name for name in node.input]
    axes = helper.make_tensor("timestep_unsqueeze_axes", onnx.TensorProto.INT64, [1], [0])
    graph.initializer.append(axes)
    graph.node.insert(0, helper.make_node("Unsqueeze", ["timestep", axes.name], [inner], name="timestep_unsqueeze"))
    timestep.type.tensor_type.shape.ClearField("dim")
    return model


def _write_unet(source: Path, unet_dir: Path, move: bool) -> None:
    """`source` (a UNet from `export_onnx`) as `unet_dir/model.onnx` with a scalar timestep. Only the graph
    is rewritten: an external data file keeps its name, which the graph refers to."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    onnx.save_model(_with_scalar_timestep(model), str(unet_dir / MODEL_NAME))
    data = source.with_name(source.name + ".data")
    if data.exists():
        (shutil.move if move else shutil.copy2)(data, unet_dir / data.name)
    if move:
        source.unlink()
    onnx.checker.check_model(str(unet_dir / MODEL_NAME))


def export_pipeline(pipe, out_dir: str | Path, unet_onnx: str | Path | None = None,
                    int4_compute: str | None = None) -> PipelineExport:
    """Write a quantized pipeline as a folder that Optimum's ONNX Runtime pipelines load and run without
    diffquant: `ORTDiffusionPipeline.from_pretrained(out_dir)`.

    Args:
        pipe: a pipeline from `quantize` or `load_quantized`.
        out_dir: the folder to write (replaced atomically: an interrupted export leaves nothing behind).
        unet_onnx: the UNet already exported from this pipeline by `export_onnx` (its `unet.onnx`), reused
            instead of exporting and checking it again; None exports it here.
        int4_compute: how ONNX Runtime multiplies 4-bit Linears when the UNet is exported here (`export_onnx`).

    Returns:
        A `PipelineExport` (component sizes; the UNet's ONNX Runtime check when it was exported here).
    """
    family = denoiser_of(pipe)
    if family.pipeline_attribute != "unet":
        raise DiffquantError(f"export_pipeline writes Optimum's Stable Diffusion (XL) layout, which has no "
                             f"{family.module_class}: export the transformer with export_onnx and run it in "
                             f"ONNX Runtime with diffquant.runtimes.onnxruntime.ort_pipeline")
    recipe = record_of(pipe.unet).recipe
    if recipe is None:
        raise DiffquantError("this pipeline's UNet is not quantized by diffquant: quantize it first "
                             "(quantize / `diffquant quantize`); a float pipeline exports with "
                             "`optimum-cli export onnx --model DIR OUT`")
    if unet_onnx is not None and not Path(unet_onnx).is_file():
        raise DiffquantError(f"no ONNX file at {unet_onnx}: pass the unet.onnx that export_onnx wrote, or None")
    require_exporter()  # fail before any slow work when Optimum is missing
    out_dir = Path(out_dir)
    started = time.perf_counter()
    unet_check: dict = {}
    with atomic_dir(out_dir) as tmp:
        _export_float_components(pipe, tmp)
        unet_dir = tmp / "unet"
        if unet_onnx is None:
            unet_exported = export_onnx(pipe, unet_dir, int4_compute=int4_compute)
            unet_check = unet_exported.to_dict()
            unet_check["path"] = str(out_dir / "unet" / MODEL_NAME)
            _write_unet(unet_exported.path, unet_dir, move=True)
        else:
            unet_dir.mkdir()
            _write_unet(Path(unet_onnx), unet_dir, move=False)
        pipe.unet.save_config(unet_dir)
        pipe.scheduler.save_pretrained(tmp / "scheduler")
        for name in ("tokenizer", "tokenizer_2", "feature_extractor"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).save_pretrained(tmp / name)
        pipe.save_config(tmp)  # model_index.json
        components = {p.name: sum(f.stat().st_size for f in p.iterdir()) for p in sorted(tmp.iterdir()) if p.is_dir()}
        result = PipelineExport(path=out_dir, components=components, recipe=recipe.name,
                                export_seconds=round(time.perf_counter() - started, 3), unet=unet_check)
        write_json(tmp / INFO_FILE, {"type": "OnnxPipeline", "version": INFO_VERSION, **result.to_dict(),
                                     "recipe": recipe.to_dict()})
    logger.info("wrote the ONNX pipeline %s (%.1f MB) in %.1f s", out_dir, result.size_bytes / 1e6,
                result.export_seconds)
    return result
