"""Stage 6, deploy: the whole pipeline as ONNX, in the folder layout that Hugging Face Optimum's ONNX
Runtime diffusion pipelines load (`ORTDiffusionPipeline.from_pretrained(folder)`: ORTStableDiffusion[XL]Pipeline,
ORTStableDiffusion3Pipeline, ORTFluxPipeline), with the quantized denoiser of `export_onnx` (compressed
int8/fp8/int4 weights) in it::

    model_index.json             the diffusers pipeline config; its class picks Optimum's pipeline
    scheduler/ tokenizer[_2|_3]/ as diffusers / transformers save_pretrained write them
    text_encoder[_2|_3]/         model.onnx (input_ids -> last_hidden_state, pooler_output | text_embeds) + config.json
    unet/                        model.onnx (sample, timestep: a scalar, encoder_hidden_states[, text_embeds,
                                 time_ids] -> out_sample): diffquant's QDQ graph + config.json
    transformer/                 (SD3, FLUX.1) model.onnx (hidden_states, encoder_hidden_states, pooled_projections,
                                 timestep[, img_ids, txt_ids, guidance] -> out_hidden_states) + config.json
    vae_encoder/ vae_decoder/    model.onnx (sample -> latent_parameters; latent_sample -> sample) + config.json
    diffquant_pipeline.json      what was exported (recipe, denoiser check, the shapes a fixed graph takes);
                                 Optimum ignores it

FLUX.1's graph keeps the shapes it was traced with (`FluxDenoiser.dynamic_batch`): its folder generates one
image per call at the height and width it was exported for (`diffquant_pipeline.json` "fixed_shape").

The float components go through Optimum's own exporter (`optimum-onnx`, the `deploy` extra), so their
names, dtypes and dynamic axes are the ones its pipelines expect.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from diffquant.core.artifacts import atomic_dir, write_json
from diffquant.models.denoisers import denoiser_of
from diffquant.core.errors import DiffquantError
from diffquant.export.model_card import base_model_of, facts_for, write_model_card
from diffquant.export.onnx import export_onnx
from diffquant.core.record import record_of

logger = logging.getLogger(__name__)

MODEL_NAME = "model.onnx"  # optimum.onnxruntime's ONNX_WEIGHTS_NAME, in every component folder
INFO_FILE = "diffquant_pipeline.json"
INFO_VERSION = 2  # 1: UNet pipelines only, no "denoiser" nor "fixed_shape"
INSTALL_HINT = "pip install 'optimum-onnx[onnxruntime]' (or diffquant's extra: pip install -e '.[deploy]')"
_FLOAT_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class PipelineExport:
    """A deployable pipeline folder: where, how big each component is, the quantized denoiser's export (its
    ONNX Runtime check when it was exported here), and for a graph with fixed shapes (FLUX.1) the height,
    width and batch it takes."""

    path: Path
    components: dict[str, int]
    recipe: str
    export_seconds: float
    denoiser: dict = field(default_factory=dict)
    fixed_shape: dict | None = None

    @property
    def size_bytes(self) -> int:
        return sum(self.components.values())

    def to_dict(self) -> dict:
        return {"path": str(self.path), "components": self.components, "size_bytes": self.size_bytes,
                "recipe": self.recipe, "export_seconds": self.export_seconds, "denoiser": self.denoiser,
                "fixed_shape": self.fixed_shape}


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
    view = copy.copy(pipe)  # the denoiser is diffquant's own export: Optimum's exporter must not touch it
    object.__setattr__(view, denoiser_of(pipe).pipeline_attribute, None)
    encoders = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, n, None) is not None]
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


# The output name Optimum's ORTTransformer reads (its ONNX configs' `outputs` for SD3 and FLUX.1).
TRANSFORMER_OUTPUT = "out_hidden_states"


def _with_output_named(model, old: str, new: str):
    """Rename the graph output `old` (diffquant's `Denoiser.output_name`) to `new`, the name Optimum reads."""
    graph = model.graph
    if not any(o.name == old for o in graph.output):
        raise DiffquantError(f"the denoiser graph has no `{old}` output: pass an ONNX file written by diffquant's "
                             "export")
    for node in graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
        node.input[:] = [new if name == old else name for name in node.input]
    for output in graph.output:
        if output.name == old:
            output.name = new
    return model


def _for_optimum(family, model):
    """The graph under the input and output conventions of Optimum's component for `family`: a UNet takes a
    scalar timestep (ORTUnet), a transformer returns `out_hidden_states` (ORTTransformer)."""
    if family.pipeline_attribute == "unet":
        return _with_scalar_timestep(model)
    return _with_output_named(model, family.output_name, TRANSFORMER_OUTPUT)


def _write_denoiser(family, source: Path, target_dir: Path, move: bool) -> dict[str, list]:
    """`source` (a denoiser from `export_onnx`) as `target_dir/model.onnx` under Optimum's conventions; returns
    the shape of each graph input (a dimension's size, or its name where it is dynamic). Only the graph is
    rewritten: an external data file keeps its name, which the graph refers to."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    onnx.save_model(_for_optimum(family, model), str(target_dir / MODEL_NAME))
    data = source.with_name(source.name + ".data")
    if data.exists():
        (shutil.move if move else shutil.copy2)(data, target_dir / data.name)
    if move:
        source.unlink()
    onnx.checker.check_model(str(target_dir / MODEL_NAME))
    return shapes


def _fixed_shape(family, pipe, graph_inputs: dict[str, list]) -> dict | None:
    """What a transformer graph fixes, which the pipeline call must match: the text tokens (SD3: CLIP's plus
    `max_sequence_length` T5 tokens; FLUX.1: `max_sequence_length`), the image size (SD3: its latent's height and
    width; FLUX.1: a square image of its 2x2 latent patches) and, for a graph that keeps its traced batch
    (FLUX.1), the batch."""
    if family.pipeline_attribute == "unet":
        return None
    text = graph_inputs["encoder_hidden_states"][1]
    fixed: dict = {"text_tokens": text}
    clip = getattr(getattr(pipe, "tokenizer", None), "model_max_length", 0)
    fixed["max_sequence_length"] = text - clip if getattr(pipe, "text_encoder_3", None) is not None else text
    latent = graph_inputs["hidden_states"]
    factor = getattr(pipe, "vae_scale_factor", 8)
    if len(latent) == 4:  # (B, C, H, W) latents
        fixed["height"], fixed["width"] = latent[2] * factor, latent[3] * factor
    else:  # (B, N, C) packed 2x2 patches
        side = round(latent[1] ** 0.5)
        fixed["image_tokens"] = latent[1]
        if side * side == latent[1]:
            fixed["height"] = fixed["width"] = side * 2 * factor
    if not family.dynamic_batch:
        fixed["batch"] = latent[0]
    return fixed


def card_facts(result: PipelineExport, family, base_model: str, fidelity=(), settings: dict | None = None):
    """The facts of the folder's model card: the denoiser graph in it, the call a fixed-shape graph needs."""
    fixed = result.fixed_shape or {}
    call = {k: fixed[k] for k in ("height", "width", "max_sequence_length", "batch") if k in fixed}
    return replace(facts_for(family.module, base_model, "onnx-pipeline", f"{family.pipeline_attribute}/{MODEL_NAME}",
                             result.components[family.pipeline_attribute], fidelity, settings), call=call)


def _one_call(pipe, height: int | None, width: int | None) -> dict[str, torch.Tensor]:
    """The flat inputs of one denoiser call of a 1-step generation, as the pipeline is called (the profile's text
    length; `height`/`width`, else the profile's size): the shapes a transformer graph is traced with, whose
    text length (SD3, FLUX.1) and image size and batch (FLUX.1) are fixed."""
    from diffquant.models.generation import generate
    from diffquant.quantization.calibration import recording_denoiser_inputs

    family = denoiser_of(pipe)
    with recording_denoiser_inputs(pipe, steps=1) as captured:
        generate(pipe, ["a photo"], seed=0, steps=1, desc="trace", height=height, width=width, show_progress=False)
    return family.first_sample(family.graph_inputs(captured[0]))


def export_pipeline(pipe, out_dir: str | Path, denoiser_onnx: str | Path | None = None,
                    int4_compute: str | None = None, height: int | None = None,
                    width: int | None = None) -> PipelineExport:
    """Write a quantized pipeline as a folder that Optimum's ONNX Runtime pipelines load and run without
    diffquant: `ORTDiffusionPipeline.from_pretrained(out_dir)` (Stable Diffusion 1.x/2.x and XL, SD3/3.5, FLUX.1).

    Args:
        pipe: a pipeline from `quantize` or `load_quantized`.
        out_dir: the folder to write (replaced atomically: an interrupted export leaves nothing behind).
        denoiser_onnx: the denoiser already exported from this pipeline by `export_onnx` (its unet.onnx or
            transformer.onnx), reused instead of exporting and checking it again; None exports it here (a
            transformer traced on one recorded call of a 1-step generation, as the pipeline is called).
        int4_compute: how ONNX Runtime multiplies 4-bit Linears when the denoiser is exported here (`export_onnx`).
        height, width: the image size a FLUX.1 graph is traced for, when it is exported here (None: the model
            profile's, 1024x1024 for FLUX.1); its folder then generates at that size only.

    Returns:
        A `PipelineExport` (component sizes; the denoiser's ONNX Runtime check when it was exported here; the
        shape a fixed-shape graph takes).
    """
    family = denoiser_of(pipe)
    recipe = record_of(family.module).recipe
    if recipe is None:
        raise DiffquantError(f"this pipeline's {family.name} is not quantized by diffquant: quantize it first "
                             "(quantize / `diffquant quantize`); a float pipeline exports with "
                             "`optimum-cli export onnx --model DIR OUT`")
    if denoiser_onnx is not None and not Path(denoiser_onnx).is_file():
        raise DiffquantError(f"no ONNX file at {denoiser_onnx}: pass the {family.name}.onnx that export_onnx wrote, "
                             "or None")
    require_exporter()  # fail before any slow work when Optimum is missing
    out_dir = Path(out_dir)
    started = time.perf_counter()
    check: dict = {}
    name = family.pipeline_attribute
    with atomic_dir(out_dir) as tmp:
        _export_float_components(pipe, tmp)
        target = tmp / name
        if denoiser_onnx is None:
            inputs = None if name == "unet" else _one_call(pipe, height, width)
            exported = export_onnx(pipe, target, int4_compute=int4_compute, inputs=inputs)
            check = exported.to_dict() | {"path": str(out_dir / name / MODEL_NAME)}
            source, move = exported.path, True
        else:
            target.mkdir()
            source, move = Path(denoiser_onnx), False
        shapes = _write_denoiser(family, source, target, move)
        family.module.save_config(target)
        pipe.scheduler.save_pretrained(tmp / "scheduler")
        for part in ("tokenizer", "tokenizer_2", "tokenizer_3", "feature_extractor"):
            if getattr(pipe, part, None) is not None:
                getattr(pipe, part).save_pretrained(tmp / part)
        pipe.save_config(tmp)  # model_index.json
        components = {p.name: sum(f.stat().st_size for f in p.iterdir()) for p in sorted(tmp.iterdir()) if p.is_dir()}
        result = PipelineExport(path=out_dir, components=components, recipe=recipe.name,
                                export_seconds=round(time.perf_counter() - started, 3), denoiser=check,
                                fixed_shape=_fixed_shape(family, pipe, shapes))
        write_json(tmp / INFO_FILE, {"type": "OnnxPipeline", "version": INFO_VERSION, **result.to_dict(),
                                     "recipe": recipe.to_dict()})
        write_model_card(tmp, card_facts(result, family, base_model_of(pipe)))
    logger.info("wrote the ONNX pipeline %s (%.1f MB) in %.1f s", out_dir, result.size_bytes / 1e6,
                result.export_seconds)
    return result
