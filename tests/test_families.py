"""Families added behind the denoiser registry after the first four (one file under models/denoisers/ plus a
profile): `diffquant run --model <folder>` end to end on a tiny random pipeline of each, every stage checked."""

import pytest
import torch

pytestmark = pytest.mark.slow  # full runs: `pytest -m 'not slow'` leaves them out

FAMILIES = {"pixart": ("tiny_pixart_dir", "PixArtTransformer2DModel", "PixArt-Σ"),
            "sana": ("tiny_sana_dir", "SanaTransformer2DModel", "Sana"),
            "wan": ("tiny_wan_dir", "WanTransformer3DModel", "Wan 2.x T2V"),
            "flux2": ("tiny_flux2_dir", "Flux2Transformer2DModel", "FLUX.2 [klein]"),
            "qwen-image": ("tiny_qwen_image_dir", "QwenImageTransformer2DModel", "Qwen-Image"),
            "z-image": ("tiny_z_image_dir", "ZImageTransformer2DModel", "Z-Image-Turbo")}
# the size a family's tiny run draws where its pipeline's default is the real model's (Wan: 480x832 clips of 81
# frames; FLUX.2 and Qwen-Image: 128x128 latents whatever the VAE)
SIZES = {"wan": {"height": 32, "width": 32, "frames": 5}, "flux2": {"height": 32, "width": 32},
         "qwen-image": {"height": 32, "width": 32}}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request, tmp_path_factory):
    """(family name, its tiny folder, the RunResult of `diffquant run` with a weight-only and a calibrated recipe)."""
    from diffquant.cli.main import main
    from diffquant.core.results import RunResult

    name = request.param
    folder = request.getfixturevalue(FAMILIES[name][0])
    root = tmp_path_factory.mktemp(f"{name}-run")
    (root / "captions.txt").write_text("a red circle\na blue square on the left\na small green triangle\n")
    assert main(["--quiet", "run", "--model", str(folder), "--recipes", "int8-w,w8a8-int8-sq-attn", "--num-images",
                 "2", "--steps", "3", "--calib-prompts", str(root / "captions.txt"), "--calib-size", "3",
                 "--calib-timesteps", "3", "--out", str(root / "out"),
                 *[a for k, v in SIZES.get(name, {}).items() for a in (f"--{k}", str(v))]]) == 0
    return name, folder, RunResult.load(root / "out")


def test_the_run_finds_the_family_and_its_profile(family_run):
    from diffquant.models.profiles import PROFILES

    name, _, result = family_run
    _, denoiser, title = FAMILIES[name]
    assert result.status == "complete" and result.denoiser == denoiser
    profile = next(p for p in PROFILES.values() if p.title == title)
    assert result.settings["steps"] == 3 and result.settings["guidance"] == profile.guidance


def test_every_linear_is_quantized_and_calibration_spans_timesteps(family_run):
    from diffquant import load_pipeline

    name, folder, result = family_run
    linears = sum(isinstance(m, torch.nn.Linear) for m in load_pipeline(str(folder)).transformer.modules())
    for recipe in ("int8-w", "w8a8-int8-sq-attn"):
        layers = result.recipes[recipe].layers
        assert layers["n_quantized"] + layers["n_float"] >= linears and layers["n_quantized"] >= linears - 2
    assert len(result.calibration["timesteps"]) == 3


def test_the_export_runs_integer_kernels_and_draws_the_torch_images(family_run):
    _, _, result = family_run
    for recipe in ("int8-w", "w8a8-int8-sq-attn"):
        entry = result.recipes[recipe]
        assert entry.ort.vs_torch.psnr_db > 35  # ONNX Runtime's pipeline images against torch's fake quant
    ops = result.recipes["w8a8-int8-sq-attn"].onnx["fused_ops"]
    # no rotary embedding written as in-place strided stores (ScatterND with constant indices: Wan's 230 MB)
    assert not ops.get("ScatterND")
    assert ops.get("MatMulIntegerToFloat", 0) + ops.get("QLinearMatMul", 0) + ops.get("QGemm", 0) > 0
    # int8 attention: unfused integer matmuls (Sana's linear self-attentions stay float; its cross-attentions do not)
    assert ops.get("Softmax", 0) > 0 and not ops.get("MultiHeadAttention")
    assert ops.get("QLinearMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) >= 2 * ops["Softmax"]


def test_the_quantized_denoiser_saves_and_reloads(family_run, tmp_path):
    import diffquant as dq

    name, folder, _ = family_run
    pipe = dq.load_pipeline(str(folder))
    quantized = dq.quantize(pipe, "int8-w")
    dq.save_quantized(quantized, tmp_path / "saved", model=str(folder))
    reloaded = dq.load_quantized(tmp_path / "saved")
    size = SIZES.get(name, {})
    first = dq.generate(quantized, "a red circle", seed=3, steps=2, **size)[0]
    again = dq.generate(reloaded, "a red circle", seed=3, steps=2, **size)[0]
    assert list(first.getdata()) == list(again.getdata())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_familys_example_inputs_run_at_any_size_on_its_grid(name, request):
    """What bench --arch and a bare export feed: the family's example inputs at its default and at a chosen size."""
    from diffquant import load_pipeline
    from diffquant.models.denoisers import denoiser_of

    pipe = load_pipeline(str(request.getfixturevalue(FAMILIES[name][0])))
    family = denoiser_of(pipe)
    for latent in (None, (8, 12)):
        inputs = family.example_inputs(batch_size=2, sequence_length=7, latent=latent)
        with torch.no_grad():
            out = family(inputs)
        assert out.shape[0] == 2 and out.shape[-2:] == inputs["hidden_states"].shape[-2:]
        assert torch.isfinite(out).all()


def test_a_clip_is_measured_frame_by_frame_and_shown_as_a_strip(family_run):
    """Video families (Wan): each clip is saved as a strip of its frames, compared whole and frame by frame, and the
    report shows the frame table; image families have no frame metrics."""
    from PIL import Image

    name, _, result = family_run
    out = result.out_dir
    first = Image.open(f"{out}/{result.recipes['int8-w'].images[0]}")
    report = open(f"{out}/report.html").read()
    if name != "wan":
        assert all(e.quality.frames is None for e in result.recipes.values()) and "Frame by frame" not in report
        return
    assert first.size == (5 * 32, 32) and result.settings["frames"] == 5
    for entry in result.recipes.values():
        frames = entry.quality.frames
        assert frames.n_frames == 5 and len(frames.psnr_db_by_frame) == 5
        assert frames.psnr_worst_db <= min(frames.psnr_db_by_frame) and frames.psnr_worst_db <= frames.psnr_db
    assert "Frame by frame" in report and "clip of 5 frames" in report


@pytest.mark.parametrize("arch", ["flux2-klein", "qwen-image", "z-image", "wan", "sd35-medium", "flux"])
def test_every_bench_architecture_builds_at_its_real_widths_and_takes_its_example_inputs(arch):
    """`bench --arch NAME` builds each reduced-depth architecture from its real config: checked on the meta device
    (no memory), its family found, its example inputs shaped for it, the module's output shaped as its latents."""
    import diffusers

    from diffquant.models.architectures import ARCHITECTURES
    from diffquant.models.denoisers import denoiser_for

    spec = ARCHITECTURES[arch]
    with torch.device("meta"):
        module = getattr(diffusers, spec.module_class).from_config(spec.build_config())
        family = denoiser_for(module)
        inputs = family.example_inputs(batch_size=1, sequence_length=spec.sequence_length)
        # Qwen-Image's forward reads its patch grid's values (`img_shapes`), which meta tensors do not hold
        out = family(inputs) if arch != "qwen-image" else None
    assert family.module_class == spec.module_class
    assert inputs["encoder_hidden_states"].shape[1] == spec.sequence_length
    assert out is None or (out.shape[0] == 1 and out.shape[-1] in (
        inputs["hidden_states"].shape[-1], module.config.get("in_channels"), module.config.get("out_channels")))
    assert sum(p.numel() for p in module.parameters()) > 10 ** 8  # real widths, not a tiny config


@pytest.mark.parametrize("name", ["z-image", "qwen-image", "wan"])
def test_a_four_bit_export_runs_on_matmulnbits(name, request, tmp_path):
    """int4-w (4-bit blocks of 32) of the families whose exports needed care (measured: PixArt, Sana and FLUX.2 export
    it as the others do): runs in ONNX Runtime with its int4 Linears as MatMulNBits, attentions fused only where the
    pattern truly is one (Z-Image's rotated queries are not), no MatMulNBits for a layer the family discards
    (Qwen-Image's last text stream)."""
    import diffquant as dq

    pipe = dq.load_pipeline(str(request.getfixturevalue(FAMILIES[name][0])))
    quantized = dq.quantize(pipe, "int4-w")
    exported = dq.export_onnx(quantized, tmp_path / "int4")  # checked in ONNX Runtime against torch
    assert exported.fused_ops.get("MatMulNBits", 0) > 0 and exported.relative_error < 0.05
