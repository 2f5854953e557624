"""Loading: local folders, SD-1.x and SDXL layouts, and each bad input as one clear error."""

import json

import pytest
import torch

from diffquant import load_pipeline
from diffquant.errors import DiffquantError


def test_loads_a_local_sd_folder_on_cpu_as_fp32(tiny_sd):
    assert type(tiny_sd).__name__ == "StableDiffusionPipeline"
    assert tiny_sd.unet.dtype == torch.float32 and tiny_sd.device.type == "cpu"


def test_loads_a_local_sdxl_folder(tiny_sdxl):
    assert type(tiny_sdxl).__name__ == "StableDiffusionXLPipeline"
    assert tiny_sdxl.unet.config.addition_embed_type == "text_time"


def test_missing_local_path_says_so(tmp_path):
    with pytest.raises(DiffquantError, match="does not exist"):
        load_pipeline(str(tmp_path / "nowhere" / "model"), device="cpu")


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(DiffquantError, match="model_index.json"):
        load_pipeline(str(tmp_path), device="cpu")


def test_hub_id_while_offline_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiffquantError) as error:
        load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cpu")
    assert "could not reach the Hugging Face Hub" in str(error.value)
    assert "--model DIR" in str(error.value)


def test_fp16_on_cpu_is_refused_with_the_fix(tiny_sd_dir):
    with pytest.raises(DiffquantError, match="--dtype fp32"):
        load_pipeline(str(tiny_sd_dir), device="cpu", dtype="fp16")


def _index(tmp_path, **components):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline", **components}))
    return str(tmp_path)


def test_a_unet_that_is_not_unet2dcondition_names_the_supported_class(tmp_path):
    with pytest.raises(DiffquantError, match="UNet2DModel.*supports UNet2DConditionModel"):
        load_pipeline(_index(tmp_path, unet=["diffusers", "UNet2DModel"]), device="cpu")


def test_dit_pipelines_are_not_yet_supported(tmp_path):
    with pytest.raises(DiffquantError, match="SD3Transformer2DModel.*not yet supported"):
        load_pipeline(_index(tmp_path, transformer=["diffusers", "SD3Transformer2DModel"]), device="cpu")


def test_corrupt_weights_give_one_clear_error(tiny_sd_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DiffquantError, match="could not load|corrupt"):
        load_pipeline(str(broken), device="cpu")


def test_unknown_dtype_is_refused(tiny_sd_dir):
    with pytest.raises(DiffquantError, match="fp32, fp16, bf16"):
        load_pipeline(str(tiny_sd_dir), device="cpu", dtype="int3")


def test_missing_gpu_is_one_clear_error(tiny_sd_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: there is no missing GPU to report")
    with pytest.raises(DiffquantError, match="--device cpu"):
        load_pipeline(str(tiny_sd_dir), device="cuda")
