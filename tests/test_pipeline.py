"""Loading: local folders, SD-1.x, SDXL, SD3 and FLUX.1 layouts, model profiles, and each bad input as one
clear error."""

import json

import pytest
import torch

from diffquant import generate, load_pipeline
from diffquant.models.denoisers import supported_classes
from diffquant.core.errors import DiffquantError
from diffquant.models.profiles import class_profile, profile_of


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


@pytest.mark.parametrize("pipeline, denoiser", [("HunyuanDiTPipeline", "HunyuanDiT2DModel"),
                                                ("LTXPipeline", "LTXVideoTransformer3DModel")])
def test_unsupported_dit_pipelines_name_the_supported_ones(pipeline, denoiser, tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline,
                                                           "transformer": ["diffusers", denoiser]}))
    with pytest.raises(DiffquantError) as error:
        load_pipeline(str(tmp_path), device="cpu")
    message = str(error.value)
    assert f"{pipeline} whose denoiser is {denoiser} (DiT): not supported" in message
    for supported in supported_classes():
        assert supported in message
    assert "FLUX.1-dev" in message and "SD3-medium" in message and "\n" not in message


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


@pytest.mark.parametrize("fixture, pipeline, attribute, denoiser", [
    ("tiny_sd3", "StableDiffusion3Pipeline", "transformer", "SD3Transformer2DModel"),
    ("tiny_flux", "FluxPipeline", "transformer", "FluxTransformer2DModel"),
])
def test_loads_sd3_and_flux_folders_like_unet_ones(fixture, pipeline, attribute, denoiser, request):
    pipe = request.getfixturevalue(fixture)
    module = getattr(pipe, attribute)
    assert type(pipe).__name__ == pipeline and type(module).__name__ == denoiser
    assert module.dtype == torch.float32 and module.device.type == "cpu"  # auto on CPU: fp32


def test_no_t5_loads_sd3_without_its_t5(tiny_sd3_dir, tiny_sd3):
    pipe = load_pipeline(str(tiny_sd3_dir), device="cpu", no_t5=True)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert tiny_sd3.text_encoder_3 is not None  # the same folder loads it without the option
    image = generate(pipe, "a red circle on a blue background", steps=1)[0]
    assert image.size == (16, 16)


@pytest.mark.parametrize("fixture", ["tiny_sd_dir", "tiny_flux_dir"])
def test_no_t5_on_a_model_without_sd3s_t5_is_refused(fixture, request):
    with pytest.raises(DiffquantError, match="no_t5 drops the T5 text encoder of SD3/SD3.5.*leave no_t5 off"):
        load_pipeline(str(request.getfixturevalue(fixture)), device="cpu", no_t5=True)


@pytest.mark.parametrize("fixture, expected", [("tiny_sd_dir", torch.float16), ("tiny_sd3_dir", torch.bfloat16),
                                               ("tiny_flux_dir", torch.bfloat16)])
def test_auto_dtype_on_a_gpu_is_the_model_cards(fixture, expected, request, monkeypatch):
    """Without a GPU: the device is made to look like one and from_pretrained is stopped once asked."""
    import diffusers

    import diffquant.models.pipeline

    asked = {}

    class Stop(Exception):
        pass

    def from_pretrained(name, torch_dtype=None, **kwargs):
        asked["dtype"] = torch_dtype
        raise Stop

    monkeypatch.setattr(diffquant.models.pipeline, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", from_pretrained)
    with pytest.raises(Stop):
        load_pipeline(str(request.getfixturevalue(fixture)), device="auto")
    assert asked["dtype"] == expected


def test_the_profile_comes_from_the_model_not_its_tokenizer(shapes_pipe, tiny_sd, tiny_sdxl, tiny_sd3, tiny_flux,
                                                           tiny_flux_schnell_dir):
    # The tiny SD pipeline uses the shapes grammar's tokenizer: the old vocabulary guess took it for shapes-sd.
    assert profile_of(shapes_pipe).name == "shapes-sd" and profile_of(shapes_pipe).shapeeval
    assert profile_of(tiny_sd).name == "sd" and not profile_of(tiny_sd).shapeeval
    assert profile_of(tiny_sdxl).name == "sdxl"
    assert profile_of(tiny_sd3).name == "sd3"
    assert dict(profile_of(tiny_sd3).call_kwargs) == {"max_sequence_length": 256}
    assert profile_of(tiny_flux).name == "flux-dev" and profile_of(tiny_flux).guidance_kind == "distilled"
    schnell = load_pipeline(str(tiny_flux_schnell_dir), device="cpu")
    assert profile_of(schnell).name == "flux-schnell" and profile_of(schnell).steps == 4


def test_sd35_profiles_come_from_the_transformer_config():
    assert class_profile("StableDiffusion3Pipeline", {"qk_norm": None}).name == "sd3"
    assert class_profile("StableDiffusion3Pipeline", {"qk_norm": "rms_norm"}).name == "sd3.5-large"
    assert class_profile("StableDiffusion3Pipeline", {"qk_norm": "rms_norm", "dual_attention_layers": [0, 1]}).name \
        == "sd3.5-medium"


def test_an_embedded_model_by_name_gets_its_profile(tiny_sd3_dir, monkeypatch):
    """shapes-sd3 ships later: the tiny SD3 folder stands in for its weights."""
    import diffquant.models.profiles

    folders = diffquant.models.profiles.embedded_models() | {"shapes-sd3": tiny_sd3_dir}
    monkeypatch.setattr(diffquant.models.profiles, "embedded_models", lambda: folders)
    pipe = load_pipeline("shapes-sd3", device="cpu")
    profile = profile_of(pipe)
    assert profile.name == "shapes-sd3" and profile.prompt_source == "shapes" and profile.num_images == 6
    assert dict(profile.call_kwargs) == {"max_sequence_length": 16}
    assert profile_of(load_pipeline("shapes-sd", device="cpu")).name == "shapes-sd"


def test_missing_embedded_weights_are_one_line(tmp_path, monkeypatch):
    import diffquant.models.profiles

    monkeypatch.setattr(diffquant.models.profiles, "embedded_models", lambda: {"shapes-sd3": tmp_path / "absent"})
    with pytest.raises(DiffquantError, match="the embedded shapes-sd3 weights are missing from .*reinstall"):
        load_pipeline("shapes-sd3", device="cpu")
