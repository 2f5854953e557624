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


def test_an_interrupted_training_leaves_no_output_folder(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes_train, "train_unet", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shapes_train.train(tmp_path / "model", vae_steps=1, unet_steps=2, batch_size=4, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-checkpoints"]  # only the finished VAE stage
    assert (tmp_path / "model-checkpoints" / "vae" / "config.json").is_file()
