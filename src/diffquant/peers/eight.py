"""Side-by-side comparison of diffquant's recipes with NVIDIA ModelOpt and optimum-quanto (8 bits) and with
bitsandbytes NF4, GGUF, optimum-quanto, torchao and NNCF (4 bits) on the same model, captions, calibration
captions and fp32 images (`pip install -e '.[peers]'`)::

    python -m diffquant.peers --out peers/                  # shapes-sd, 64 captions, 64 calibration captions
    python -m diffquant.peers --model DIR --n 16 --methods diffquant:w8a8-int8-sq,modelopt:int8
    python -m diffquant.peers --bits 4 --n 16 --out peers4/  # the 4-bit peers (see diffquant.peers.four)

`diffquant:RECIPE` applies the model profile's measured float layers for that recipe (as `diffquant run`
does); `diffquant-all:RECIPE` quantizes every layer the recipe allows.

Every method's images come from diffquant's own `generate` (image k seeded `seed + k`, 8 prompts a
call) and are measured against one fp32 baseline; before quantizing, each peer's float copy of the
pipeline must reproduce the baseline's first batch pixel for pixel, or the run stops. Each row gives the
bits per weight of its quantized layers (codes, scales and zero points as the module stores them) and the
bytes of the whole quantized denoiser; a peer that cannot run here gets a row with its reason instead.

ModelOpt runs as its `examples/diffusers/quantization` does: `mtq.quantize` with a forward loop that
runs the whole pipeline on the calibration captions, then its default filter disables the quantizers
of the time embeddings, `conv_in`, `conv_out` and `conv_shortcut` (its INT8 and FP8 library presets also
keep `*proj_out*` float). optimum-quanto quantizes every Linear and Conv2d to int8 weights and int8
activations, calibrated with `Calibration()` over the same captions, then `freeze`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffquant.core.provenance import describe as describe_provenance
from diffquant.core.provenance import measured as measured_now
from diffquant.core.errors import DiffquantError
from diffquant.core.record import record_of
from diffquant.report.tables import markdown
from diffquant.quantization.backends import backend_of
from diffquant.peers.base import Peer, PeerRun, PeerUnavailable, Quantized, peer_for, register, shared_calibration
from diffquant.peers.options import DEFAULT_4BIT_METHODS, DEFAULT_METHODS, add_arguments
from diffquant.peers import cpu as _cpu  # noqa: F401  (registers ort:static-int8)
from diffquant.peers.four import checked_copy, quanto_w4, torch_storage
from diffquant.core.artifacts import write_json, write_text
from diffquant.core.recipes import get_recipe
from diffquant.evaluate.metrics import compare
from diffquant.models.denoisers import denoiser_of
from diffquant.models.generation import default_settings, generate
from diffquant.models.profiles import profile_of
from diffquant.quantization.calibration import CALIBRATION_SEED

logger = logging.getLogger(__name__)
# The module names ModelOpt's diffusers example keeps in float (its filter_func_default).
MODELOPT_FLOAT = re.compile(r".*(time_emb_proj|time_embedding|conv_in|conv_out|conv_shortcut|add_embedding|pos_embed|"
                            r"time_text_embed|context_embedder|norm_out|x_embedder).*")


@dataclass
class MethodResult:
    """One method's images measured against the fp32 baseline."""

    method: str
    layers_quantized: int
    psnr_db: list[float]
    ssim: float | None
    shapeeval: dict | None = None
    agreement: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    bits_per_weight: float | None = None
    bytes: int | None = None
    seconds_per_image: float | None = None

    def row(self) -> dict:
        psnr = np.asarray(self.psnr_db)
        measured = psnr.size > 0
        return {"method": self.method, "layers_quantized": self.layers_quantized,
                "bits_per_weight": self.bits_per_weight, "bytes": self.bytes,
                "psnr_mean_db": float(psnr.mean()) if measured else None,
                "psnr_p10_db": float(np.percentile(psnr, 10)) if measured else None,
                "psnr_worst_db": float(psnr.min()) if measured else None, "ssim": self.ssim,
                "shapeeval": self.shapeeval, "agreement_with_fp32": self.agreement, "seconds": self.seconds,
                "seconds_per_image": self.seconds_per_image, "notes": self.notes}


def _modelopt_config(kind: str):
    import modelopt.torch.quantization as mtq

    if kind == "int8":
        return mtq.INT8_DEFAULT_CFG
    if kind == "int8-sq":
        return mtq.INT8_SMOOTHQUANT_CFG
    if kind == "fp8":
        # The diffusers example's FP8 config quantizes proj_out as well: the library preset (per-tensor e4m3
        # weights and inputs, max calibration) without its proj_out rule.
        config = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
        config["quant_cfg"] = [rule for rule in config["quant_cfg"] if rule.get("quantizer_name") != "*proj_out.*"]
        return config
    raise DiffquantError(f"unknown ModelOpt method {kind!r}: use modelopt:int8, modelopt:int8-sq or modelopt:fp8")


def _check_identical(peer, baseline, prompts, settings, exact: bool = True) -> str:
    """Stop unless `peer` (a peer's float pipeline) reproduces the baseline's first batch pixel for pixel;
    with `exact=False` (another runtime) say how close it comes instead."""

    batch = settings["batch_size"]
    images = generate(peer, prompts[:batch], desc="fp32 check", **settings)
    identical = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, baseline[:batch]))
    if exact and not identical:
        raise DiffquantError("a peer's float pipeline does not reproduce diffquant's fp32 images: the comparison "
                             "would not be on identical images (check for global state the peer changes)")
    if identical:
        return "pixel-identical"
    psnr = compare(baseline[:batch], images, prompts[:batch]).psnr_db
    return f"PSNR {np.mean(psnr):.2f} dB mean, {np.min(psnr):.2f} worst over {len(psnr)} images"


@register
class DiffquantPeer(Peer):
    """diffquant's own recipes, as `diffquant run` applies them (`diffquant:`: with the model profile's measured
    float layers; `diffquant-all:`: every layer the recipe allows)."""

    libraries = ("diffquant", "diffquant-all")

    def parse(self, kind: str) -> tuple[str, int | None]:
        return get_recipe(kind).name if not kind.endswith(".json") else kind, None

    def quantize(self, run: PeerRun, kind: str, group: int | None) -> Quantized:
        from diffquant import layer_report, quantize

        recipe = get_recipe(kind)
        # weight-only recipes read no calibration; the set is made once per run
        calibration = shared_calibration(run) if recipe.needs_calibration else None
        quantized = quantize(run.pipe, recipe, calibration=calibration, profile_exclusions=self.library == "diffquant")
        module = denoiser_of(quantized).module
        reason = record_of(module).float_reason
        return Quantized(quantized, len(layer_report(module).quantized), backend_of(module).storage(module),
                         [reason] if reason else [])

    def label(self, kind: str) -> str:
        from diffquant.core.recipes import get_recipe

        return f"{self.library}:{get_recipe(kind).name}"  # a recipe file is labelled by the recipe it holds


@register
class DiffquantGgufPeer(DiffquantPeer):
    """A diffquant recipe on a GGML block grid (`q4_0`, `q4_1`, `q8_0`: GPTQ; `int4-w`: round to nearest) written as
    a GGUF file (`diffquant.export.gguf`) and loaded by diffusers' own GGUF loader, as a diffusers or ComfyUI user
    loads it: the row beside the `gguf` package's files of the same type (`gguf:q4_0`)."""

    libraries = ("diffquant-gguf",)
    required_packages = ("gguf",)

    def quantize(self, run: PeerRun, kind: str, group: int | None) -> Quantized:
        from diffquant.export.gguf import export_gguf, load_gguf
        from diffquant.quantization.api import with_denoiser

        made = super().quantize(run, kind, group)
        written = export_gguf(made.pipe, run.work_dir / f"diffquant-gguf-{get_recipe(kind).name}")
        family = denoiser_of(run.pipe)
        module = load_gguf(run.pipe, written.path)
        notes = [*made.notes, f"file {written.size_bytes} bytes ({written.gguf_type}, {written.block_tensors} block "
                 f"tensors); diffusers' GGUF loader: {written.exact_layers} of {written.loaded_layers} Linears equal "
                 "to the fake-quantized weights bit for bit"]
        return Quantized(with_denoiser(run.pipe, family.pipeline_attribute, module), made.layers,
                         torch_storage(module), notes)


@register
class ModelOptPeer(Peer):
    """NVIDIA ModelOpt as its `examples/diffusers/quantization` runs it: `mtq.quantize` with a forward loop over
    the whole pipeline on the calibration captions, then its default filter."""

    libraries = ("modelopt",)
    kinds = {"int8": 8, "int8-sq": 8, "fp8": 8}
    required_packages = ("modelopt.torch.quantization",)

    def quantize(self, run: PeerRun, kind: str, group: int | None) -> Quantized:
        import modelopt.torch.quantization as mtq

        peer, module = checked_copy(run)
        mtq.quantize(module, _modelopt_config(kind), _forward_loop(run, peer, self.label(kind)))
        mtq.disable_quantizer(module, lambda name: MODELOPT_FLOAT.match(name) is not None)
        layers = sum(1 for m in module.modules() if getattr(m, "weight_quantizer", None) is not None
                     and m.weight_quantizer.is_enabled)
        return Quantized(peer, layers, torch_storage(module), ["ModelOpt filter_func_default"])


@register
class QuantoPeer(Peer):
    """optimum-quanto: `w8a8` int8 weights and activations on every Linear and Conv2d, calibrated with
    `Calibration()` over the calibration captions, then `freeze`; `w4` int4 weights (see `four.quanto_w4`)."""

    libraries = ("quanto",)
    kinds = {"w8a8": 8, "w4": 4}
    required_packages = ("optimum.quanto",)

    def quantize(self, run: PeerRun, kind: str, group: int | None) -> Quantized:
        peer, module = checked_copy(run)
        if kind == "w4":
            layers, notes = quanto_w4(module)
            return Quantized(peer, layers, torch_storage(module), notes)
        from optimum.quanto import Calibration, QModuleMixin, freeze, qint8, quantize

        quantize(module, weights=qint8, activations=qint8)
        with Calibration():
            _forward_loop(run, peer, self.label(kind))()
        freeze(module)
        # quanto also swaps LayerNorms (output quantization); the layers comparable to the others' are its Linears/Convs.
        layers = sum(isinstance(m, QModuleMixin) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                     for m in module.modules())
        return Quantized(peer, layers, torch_storage(module), [])


def _forward_loop(run: PeerRun, peer, label: str):
    def forward_loop(_=None):
        generate(peer, run.calib_prompts, desc=f"calibrate {label}", **run.calib_settings)

    return forward_loop


def run_peers(model: str | None = None, methods: tuple[str, ...] = DEFAULT_METHODS, n: int = 64,
              calib_size: int = 64, steps: int | None = None, guidance: float | None = None, seed: int = 1024,
              calib_timesteps: int = 8, on_row=None) -> dict:
    """Generate the fp32 baseline once, then each method's images with the same seeds, and measure them.

    `on_row(result)`, when given, is called with the result so far after each method (a long run keeps
    what it measured). Returns a JSON-able dict: settings, the calibration captions, the fp32 denoiser's
    bytes and one row per method (a peer that cannot run here: its reason in `notes`, no measurement)."""
    for method in methods:  # an unknown method or kind: one line before any slow work
        peer_for(method)
    with tempfile.TemporaryDirectory(prefix="diffquant-peers-") as work_dir:
        return _run(model, methods, n, calib_size, steps, guidance, seed, calib_timesteps, on_row, Path(work_dir))


def _run(model, methods, n, calib_size, steps, guidance, seed, calib_timesteps, on_row, work_dir: Path) -> dict:
    from diffquant import compare, default_prompts, generate, load_pipeline

    pipe = load_pipeline(model, device="cpu")
    defaults = default_settings(pipe, seed)
    steps = steps or defaults.steps
    guidance = defaults.guidance if guidance is None else guidance
    prompts = default_prompts(pipe, n)
    if profile_of(pipe).prompt_source == "shapes":
        from diffquant.models.shapes.dataset import sample_captions

        calib_prompts = sample_captions(calib_size, seed=CALIBRATION_SEED)
    else:
        calib_prompts = default_prompts(pipe, n + calib_size)[n:]
    settings = {"seed": seed, "steps": steps, "guidance": guidance, "batch_size": 8}
    calib_settings = settings | {"seed": CALIBRATION_SEED}
    started = time.perf_counter()
    baseline = generate(pipe, prompts, desc="fp32", **settings)
    fp32_per_image = (time.perf_counter() - started) / len(prompts)
    rows = []
    result = {"model": model or "shapes-sd", "captions": n, "calibration_captions": calib_size, **settings,
              "calib_timesteps_diffquant": calib_timesteps, "fp32_identical": True,
              "fp32_bytes": torch_storage(denoiser_of(pipe).module).total_bytes,
              "fp32_seconds_per_image": fp32_per_image,
              "calibration_prompts": calib_prompts, "rows": rows, "measured": measured_now()}
    run = PeerRun(pipe, baseline, prompts, calib_prompts, settings, calib_settings, calib_timesteps, work_dir,
                  check=lambda peer, exact=True: _check_identical(peer, baseline, prompts, settings, exact))
    for method in methods:
        started = time.perf_counter()
        peer, kind, group = peer_for(method)
        try:
            reason = peer.unavailable()
            if reason is not None:
                raise PeerUnavailable(reason)
            made = peer.quantize(run, kind, group)
        except PeerUnavailable as reason:
            logger.info("%s: cannot run here: %s", method, reason)
            rows.append(MethodResult(method, 0, [], None, seconds=time.perf_counter() - started,
                                     notes=[f"not run: {reason}"]).row())
            if on_row is not None:
                on_row(result)
            continue
        method = peer.label(kind) if peer.library.startswith("diffquant") else method
        quantized, layers, storage, notes = made.pipe, made.layers, made.storage, made.notes
        generating = time.perf_counter()
        images = generate(quantized, prompts, desc=method, **settings)
        per_image = (time.perf_counter() - generating) / len(prompts)
        comparison = compare(baseline, images, prompts)
        agreement = (comparison.shapeeval_agreement or {}).get("all")
        measured = MethodResult(method, layers, comparison.psnr_db, float(np.mean(comparison.ssim)),
                                comparison.shapeeval, agreement, time.perf_counter() - started, notes,
                                storage.bits_per_weight, storage.total_bytes, per_image)
        rows.append(measured.row())
        logger.info("%s: %d layers, PSNR %.2f dB", method, layers, rows[-1]["psnr_mean_db"])
        if on_row is not None:
            on_row(result)
    return result


def table(result: dict) -> str:
    """The comparison as a Markdown table, each method's notes (and what it could not do) below it."""
    def number(value, spec: str, suffix: str = "") -> str:
        return "-" if value is None else f"{value:{spec}}{suffix}"

    fp32_bytes = result.get("fp32_bytes")
    attributes = sorted({k for r in result["rows"] for k in (r["shapeeval"] or {}) if not k.startswith("n_")})
    head = ["method", "layers quantized", "bits/weight", "bytes", "PSNR mean", "p10", "worst", "SSIM", *attributes,
            "agree with fp32", "s/image"]
    rows = []
    for r in result["rows"]:
        shape = r["shapeeval"] or {}
        size = r.get("bytes")
        share = f" ({size / fp32_bytes:.0%})" if size is not None and fp32_bytes else ""
        rows.append([f"`{r['method']}`", str(r["layers_quantized"]), number(r.get("bits_per_weight"), ".2f"),
                     "-" if size is None else f"{size / 1e6:.2f} MB{share}", number(r["psnr_mean_db"], ".2f", " dB"),
                     number(r["psnr_p10_db"], ".2f"), number(r["psnr_worst_db"], ".2f"), number(r["ssim"], ".4f"),
                     *[f"{shape[a]:.1%}" if isinstance(shape.get(a), float) else "-" for a in attributes],
                     number(r["agreement_with_fp32"], ".1%"), number(r.get("seconds_per_image"), ".2f")])
    lines = [f"{result['model']}, {result['captions']} captions, {result.get('steps', '?')} steps; "
             f"{describe_provenance(result.get('measured'))}", "", markdown(head, rows)]
    if fp32_bytes:
        per_image = result.get("fp32_seconds_per_image")
        lines.append(f"\nfp32 denoiser: {fp32_bytes / 1e6:.2f} MB" + (f", {per_image:.2f} s/image" if per_image else "")
                     + ". bits/weight: the quantized layers' codes, scales and zero points per weight; bytes: the "
                     "whole quantized denoiser.")
    notes = [f"- `{r['method']}`: " + "; ".join(r["notes"]) for r in result["rows"] if r["notes"]]
    return "\n".join(lines + ([""] + notes if notes else []))


def run_from_args(args) -> dict:
    """Run the comparison an `add_arguments` parser asked for, writing peers.json and peers.md after each
    method (a long run keeps what it measured); returns the result and prints its table."""

    def write(result: dict) -> None:
        write_json(args.out / "peers.json", result)
        write_text(args.out / "peers.md", table(result) + "\n")

    args.out.mkdir(parents=True, exist_ok=True)
    methods = args.methods or ",".join(DEFAULT_METHODS if args.bits == 8 else DEFAULT_4BIT_METHODS)
    result = run_peers(args.model, tuple(m.strip() for m in methods.split(",") if m.strip()), args.n,
                       args.calib_size, args.steps, args.guidance, on_row=write)
    write(result)
    print(table(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffquant.peers", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_from_args(args)
    except (DiffquantError, ImportError) as error:
        print(f"error: {error}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
