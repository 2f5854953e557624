"""The shapes-sd trainer: a few real steps write a loadable pipeline; an interrupted run leaves no output."""

from __future__ import annotations

import pytest
import torch

from diffquant.models.shapes import train as shapes_train


@pytest.fixture(autouse=True)
def few_vae_eval_images(monkeypatch):
    monkeypatch.setattr(shapes_train, "VAE_EVAL_IMAGES", 8)


def test_a_short_training_writes_a_pipeline_that_loads_and_checkpoints(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = shapes_train.train(tmp_path / "model", vae_steps=2, unet_steps=3, batch_size=4, checkpoint_every=2,
                             quiet=True)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    image = pipe("a red circle on a blue background", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()
    assert (out / "training_log.csv").read_text().count("\nunet,") == 3
    assert (tmp_path / "model-checkpoints" / "step-2" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    from diffquant.models.profiles import SHAPES_SD, profile_of

    assert profile_of(pipe) is SHAPES_SD  # read with shapes-sd's steps and guidance, not SD 1.x's


def test_an_interrupted_training_leaves_no_output_folder(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes_train, "train_unet", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shapes_train.train(tmp_path / "model", vae_steps=1, unet_steps=2, batch_size=4, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-checkpoints"]  # only the finished VAE stage
    assert (tmp_path / "model-checkpoints" / "vae" / "config.json").is_file()


def test_shapes_sd3_training_continues_from_a_trained_folder(tmp_path):
    """--init-from starts from the folder's transformer and text encoders (with a zero learning rate the EMA
    weights written are exactly those), and the command it writes into the model card names the folder."""
    from safetensors.torch import load_file

    from diffquant.models.shapes import train_sd3

    first = train_sd3.train(tmp_path / "first", steps=2, batch_size=2, num_layers=1, checkpoint_every=0, quiet=True)
    second = train_sd3.train(tmp_path / "second", steps=1, batch_size=2, num_layers=1, checkpoint_every=0, quiet=True,
                             lr=0.0, seed=1, init_from=first)
    for part in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder_3/model.safetensors"):
        before, after = load_file(first / part), load_file(second / part)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert f"--init-from {first}" in (second / "README.md").read_text()
    # A retrained folder is read with shapes-sd3's profile (25 steps, its guidance, T5 length 16), not SD3's.
    from diffquant.models.profiles import SHAPES_SD3, profile_of
    from diffquant.models.pipeline import load_pipeline

    assert profile_of(load_pipeline(str(second), device="cpu")) is SHAPES_SD3
    (second / "diffquant_profile.json").write_text('{"profile": "sd3"}')  # only a shapes model's marker counts
    assert profile_of(load_pipeline(str(second), device="cpu")).name == "sd3"
    with pytest.raises(SystemExit, match="not a shapes-sd3 folder"):
        train_sd3.train(tmp_path / "third", steps=1, batch_size=2, num_layers=1, init_from=tmp_path / "nothing",
                        quiet=True)
    assert not (tmp_path / "third").exists()
