"""Image size chosen by the user (`--height`/`--width` on run and quantize, `RunConfig.height/width`): the
calibration records, the images and a fixed-shape export all take it, and a size the model cannot make is
refused in one line that says which sizes it takes."""

import numpy as np
import pytest

import diffquant as dq
from diffquant.cli.main import main
from diffquant.core.config import RunConfig
from diffquant.core.errors import DiffquantError
from diffquant.models.denoisers import denoiser_of


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sd3", "tiny_flux"])
def test_a_size_off_the_grid_is_refused_naming_the_sizes_it_takes(fixture, request):
    from diffquant.models.generation import pipeline_kwargs

    pipe = request.getfixturevalue(fixture)
    family = denoiser_of(pipe)
    step = family.size_multiple(pipe)
    # the grid: the VAE's downscale times the latent patch (FLUX.1 packs 2x2 latents into a token); diffusers' SD
    # pipelines take multiples of 8 whatever their VAE (the tiny one scales by 2)
    grid = {"tiny_sd": lambda: 8, "tiny_sd3": lambda: pipe.vae_scale_factor * pipe.transformer.config.patch_size,
            "tiny_flux": lambda: pipe.vae_scale_factor * 2}
    assert step == grid[fixture]()
    assert pipeline_kwargs(pipe, height=4 * step, width=2 * step)["width"] == 2 * step
    with pytest.raises(DiffquantError, match=f"height {4 * step + 1} cannot be generated .* multiples of {step} "):
        pipeline_kwargs(pipe, height=4 * step + 1, width=2 * step)


def test_run_refuses_a_bad_size_before_any_work(tiny_sd_dir, tmp_path, capsys):
    assert main(["--quiet", "run", "--model", str(tiny_sd_dir), "--height", "-8", "--out", str(tmp_path / "a")]) == 2
    assert "--height must be a whole number of at least 1, got -8" in capsys.readouterr().err
    assert main(["--quiet", "run", "--model", str(tiny_sd_dir), "--width", "33", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "width 33 cannot be generated" in err
    assert not (tmp_path / "b" / "baseline").exists()


def test_calibration_records_the_size_asked_for(tiny_sd, tmp_path):
    from diffquant.quantization.calibration import calibrate_for_run

    step = denoiser_of(tiny_sd).size_multiple(tiny_sd)
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    config = RunConfig(height=6 * step, width=4 * step, calib_prompts=str(tmp_path / "prompts.txt"), calib_size=1,
                       calib_timesteps=1)
    captured, _ = calibrate_for_run(tiny_sd, config, steps=2, guidance=1.0)
    factor = tiny_sd.vae_scale_factor
    assert {tuple(r["sample"].shape[-2:]) for r in captured} == {(6 * step // factor, 4 * step // factor)}


def test_a_flux_run_at_a_chosen_non_square_size_generates_and_exports_at_it(tiny_flux_dir, tiny_flux, tmp_path):
    """FLUX.1's graph keeps its traced shapes: the run traces it at the size asked, and ONNX Runtime draws the
    same images as torch at that size."""
    from PIL import Image

    result = dq.run(RunConfig(model=str(tiny_flux_dir), height=32, width=48, recipes=("int8-w",), num_images=1,
                              steps=2, out=str(tmp_path / "run")))
    out = tmp_path / "run"
    assert result.settings["height"] == 32 and result.settings["width"] == 48
    for image in (result.baseline_images[0], result.recipes["int8-w"].images[0], result.recipes["int8-w"].ort.images[0]):
        assert Image.open(out / image).size == (48, 32)
    step = denoiser_of(tiny_flux).size_multiple(tiny_flux)  # one token per step x step pixels
    assert result.recipes["int8-w"].onnx["inputs"]["hidden_states"][1] == (32 // step) * (48 // step)
    assert result.recipes["int8-w"].ort.vs_torch.psnr_db > 40
    assert RunConfig.load(out / "config.json").height == 32
