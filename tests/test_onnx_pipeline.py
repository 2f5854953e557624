"""The deployable ONNX pipeline folder: Optimum's ORTDiffusionPipeline loads it offline and, without
diffquant, draws the images of diffquant's own ONNX Runtime pipeline; every component runs in plain
ONNX Runtime under the names Optimum feeds; the scheduler and tokenizer round-trip."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from diffquant import compare, export_onnx, export_pipeline, generate, quantize
from diffquant.core.errors import DiffquantError
from diffquant.export.onnx import MAX_RELATIVE_ERROR, example_inputs

pytestmark = pytest.mark.slow  # exports, full runs or benchmarks: `pytest -m 'not slow'` leaves them out

pytest.importorskip("optimum.onnxruntime", reason="the deploy extra: pip install -e '.[deploy]'")

STEPS, GUIDANCE, SEED = 4, 4.0, 1024
# Optimum runs the very graph that diffquant's ORT pipeline runs for the UNet; what differs is the text encoder
# and VAE (ONNX Runtime vs torch, ~1e-6 relative), which flips the rounding of a few pixels: measured 54.8-59.4 dB
# on shapes-sd at 4 steps. A broken folder is far below 45 dB: the scheduler saved with epsilon instead of
# v-prediction gives 0.7-10.5 dB, "leading" instead of "trailing" spacing 12.7-18.2 dB, and without the
# zero-terminal-SNR rescale 44.2-49.7 dB (that flag is also asserted directly by the round-trip test).
MIN_PSNR_DB = 45.0

# Run by a separate Python that never imports diffquant: the folder is all a deployment has.
DEPLOY_SCRIPT = """
import json, sys
import numpy as np, torch
from optimum.onnxruntime import ORTDiffusionPipeline

args = json.loads(sys.argv[1])
pipe = ORTDiffusionPipeline.from_pretrained(args["folder"])
generators = [torch.Generator().manual_seed(args["seed"] + k) for k in range(len(args["prompts"]))]
images = pipe(prompt=args["prompts"], num_inference_steps=args["steps"], guidance_scale=args["guidance"],
              generator=generators).images
np.save(args["out"], np.stack([np.asarray(image) for image in images]))
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "diffquant")
print(json.dumps({"pipeline": type(pipe).__name__, "unet": type(pipe.unet).__name__, "diffquant_modules": leaked}))
"""


@pytest.fixture(scope="module")
def deployed(shapes_pipe, tmp_path_factory):
    """shapes-sd quantized with int8-w, its UNet exported by diffquant, and the pipeline folder built on it."""
    root = tmp_path_factory.mktemp("deploy")
    quantized = quantize(shapes_pipe, "int8-w")
    unet = export_onnx(quantized, root / "unet-export")
    text_config = dict(vars(shapes_pipe.text_encoder.config))
    folder = export_pipeline(quantized, root / "pipeline", denoiser_onnx=unet.path)
    return {"quantized": quantized, "unet_onnx": unet.path, "result": folder, "folder": folder.path,
            "text_config_before": text_config}


def test_optimum_loads_the_folder_and_draws_diffquants_onnx_runtime_images(shapes_pipe, deployed, tmp_path):
    from diffquant.runtimes.onnxruntime import ort_pipeline

    prompts = ["a red circle on a white background", "a large blue square on the left on a black background",
               "a small yellow triangle at the top on a purple background", "a green circle on a orange background"]
    reference = generate(ort_pipeline(shapes_pipe, deployed["unet_onnx"]), prompts, seed=SEED, steps=STEPS,
                         guidance=GUIDANCE)
    args = {"folder": str(deployed["folder"]), "out": str(tmp_path / "images.npy"), "prompts": prompts,
            "seed": SEED, "steps": STEPS, "guidance": GUIDANCE}
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", DEPLOY_SCRIPT, json.dumps(args)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info == {"pipeline": "ORTStableDiffusionPipeline", "unet": "ORTUnet", "diffquant_modules": []}
    assert "re-export" not in done.stderr  # Optimum's warning for a UNet timestep that is not a scalar
    images = [Image.fromarray(array) for array in np.load(tmp_path / "images.npy")]
    psnr = compare(reference, images, prompts).psnr_db
    assert min(psnr) >= MIN_PSNR_DB, psnr


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _signature(session) -> tuple[dict, list[str]]:
    return {i.name: (i.type, len(i.shape)) for i in session.get_inputs()}, [o.name for o in session.get_outputs()]


def test_each_component_runs_in_plain_onnx_runtime_under_optimums_names(shapes_pipe, deployed):
    folder, quantized = deployed["folder"], deployed["quantized"]
    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert (folder / name / "config.json").is_file() and (folder / name / "model.onnx").is_file()
    tokens = shapes_pipe.tokenizer(["a red circle on a white background", "a blue square on a black background"],
                                   padding="max_length", max_length=shapes_pipe.tokenizer.model_max_length,
                                   return_tensors="pt").input_ids
    with torch.no_grad():
        text = shapes_pipe.text_encoder(tokens)

    session = _session(folder / "text_encoder" / "model.onnx")
    assert _signature(session) == ({"input_ids": ("tensor(int64)", 2)}, ["last_hidden_state", "pooler_output"])
    hidden, pooled = session.run(None, {"input_ids": tokens.numpy()})
    assert np.abs(hidden - text.last_hidden_state.numpy()).max() < 1e-4
    assert np.abs(pooled - text.pooler_output.numpy()).max() < 1e-4

    session = _session(folder / "unet" / "model.onnx")
    assert _signature(session) == ({"sample": ("tensor(float)", 4), "timestep": ("tensor(int64)", 0),
                                    "encoder_hidden_states": ("tensor(float)", 3)}, ["out_sample"])
    inputs = example_inputs(quantized.unet, batch_size=3, sequence_length=shapes_pipe.tokenizer.model_max_length)
    with torch.no_grad():
        expected = quantized.unet(**inputs, return_dict=False)[0].numpy()
    out = session.run(None, {"sample": inputs["sample"].numpy(), "timestep": np.array(500, dtype=np.int64),
                             "encoder_hidden_states": inputs["encoder_hidden_states"].numpy()})[0]
    assert np.linalg.norm(out - expected) / np.linalg.norm(expected) <= MAX_RELATIVE_ERROR
    graph = onnx.load(str(folder / "unet" / "model.onnx")).graph
    int8 = sum(t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2 for t in graph.initializer)  # codes, not zero points
    assert int8 == sum(hasattr(m, "_weight_quantizer") for m in quantized.unet.modules())  # the quantized UNet
    assert deployed["result"].components["unet"] < 0.35 * sum(p.numel() * 4 for p in shapes_pipe.unet.parameters())

    vae = shapes_pipe.vae
    latents = torch.randn(2, vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    session = _session(folder / "vae_decoder" / "model.onnx")
    assert _signature(session) == ({"latent_sample": ("tensor(float)", 4)}, ["sample"])
    with torch.no_grad():
        decoded = vae.decode(latents).sample.numpy()
    assert np.abs(session.run(None, {"latent_sample": latents.numpy()})[0] - decoded).max() < 1e-3
    session = _session(folder / "vae_encoder" / "model.onnx")
    assert _signature(session) == ({"sample": ("tensor(float)", 4)}, ["latent_parameters"])
    with torch.no_grad():
        parameters = vae.encode(torch.from_numpy(decoded)).latent_dist.parameters.numpy()
    assert np.abs(session.run(None, {"sample": decoded})[0] - parameters).max() < 1e-3


def test_scheduler_tokenizer_and_index_round_trip(shapes_pipe, deployed):
    from diffusers import DDIMScheduler
    from transformers import CLIPTokenizer

    folder = deployed["folder"]
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    assert dict(scheduler.config) == dict(shapes_pipe.scheduler.config)
    assert (scheduler.config.prediction_type, scheduler.config.rescale_betas_zero_snr,
            scheduler.config.timestep_spacing) == ("v_prediction", True, "trailing")
    prompts = ["a small red circle on the left on a white background", "a green triangle on a black background"]
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tokenizer(prompts).input_ids == shapes_pipe.tokenizer(prompts).input_ids
    assert tokenizer.model_max_length == shapes_pipe.tokenizer.model_max_length
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"] and index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    info = json.loads((folder / "diffquant_pipeline.json").read_text())
    assert info["type"] == "OnnxPipeline" and info["recipe"]["name"] == "int8-w"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    # Optimum's exporter marks the text encoder's config while it runs; the caller's pipeline gets it back.
    assert dict(vars(shapes_pipe.text_encoder.config)) == deployed["text_config_before"]


def test_sdxl_folder_runs_in_optimums_xl_pipeline_with_the_added_conditioning(tiny_sdxl_dir, tmp_path):
    from optimum.onnxruntime import ORTDiffusionPipeline

    from diffquant import load_pipeline

    quantized = quantize(load_pipeline(str(tiny_sdxl_dir), device="cpu"), "int8-w")
    result = export_pipeline(quantized, tmp_path / "sdxl")  # the UNet is exported (and checked) here
    assert result.denoiser["relative_error"] <= result.denoiser["relative_error_bound"]
    unet_inputs, _ = _signature(_session(tmp_path / "sdxl" / "unet" / "model.onnx"))
    assert list(unet_inputs) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    inputs, outputs = _signature(_session(tmp_path / "sdxl" / "text_encoder_2" / "model.onnx"))
    assert list(inputs) == ["input_ids"] and outputs[:2] == ["text_embeds", "last_hidden_state"]
    pipe = ORTDiffusionPipeline.from_pretrained(tmp_path / "sdxl")
    assert type(pipe).__name__ == "ORTStableDiffusionXLPipeline"
    prompts = ["a cat", "a dog"]
    images = pipe(prompt=prompts, num_inference_steps=2, guidance_scale=5.0,
                  generator=[torch.Generator().manual_seed(SEED + k) for k in range(2)]).images
    # Against torch fake-quant, so the UNet's ONNX-vs-torch rounding ties count too (random weights sit on
    # them more than trained ones): measured 53.4 and 54.2 dB (51.7-55.0 with other seeds).
    reference = generate(quantized, prompts, seed=SEED, steps=2, guidance=5.0)
    assert min(compare(reference, images, prompts).psnr_db) >= 40.0


def test_a_float_pipeline_is_refused_with_the_fix(shapes_pipe, tmp_path):
    with pytest.raises(DiffquantError, match="not quantized by diffquant: quantize it first"):
        export_pipeline(shapes_pipe, tmp_path / "float")
    assert not (tmp_path / "float").exists()


def test_without_optimum_the_error_says_what_to_install(deployed, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optimum.exporters.onnx.convert", None)  # import fails as if not installed
    with pytest.raises(DiffquantError, match=r"pip install 'optimum-onnx\[onnxruntime\]'"):
        export_pipeline(deployed["quantized"], tmp_path / "no-optimum")
    assert not (tmp_path / "no-optimum").exists()
    from diffquant.cli.main import main

    assert main(["run", "--export-pipeline", "--out", str(tmp_path / "run")]) == 2  # before any slow work
    assert "optimum-onnx" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_export_command_and_run_option_write_folders_optimum_runs(tiny_sd_dir, tmp_path, capsys):
    from optimum.onnxruntime import ORTDiffusionPipeline

    from diffquant.cli.main import main

    assert main(["--quiet", "quantize", "--model", str(tiny_sd_dir), "--recipe", "int8-w",
                 "--out", str(tmp_path / "q")]) == 0
    assert main(["--quiet", "export", str(tmp_path / "q"), "--pipeline", "--out", str(tmp_path / "deploy")]) == 0
    assert "ORTDiffusionPipeline.from_pretrained" in capsys.readouterr().out
    assert main(["--quiet", "run", "--model", str(tiny_sd_dir), "--recipes", "int8-w", "--num-images", "1",
                 "--steps", "2", "--export-pipeline", "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    from_run = tmp_path / "run" / results["recipes"]["int8-w"]["pipeline"]["path"]
    assert from_run == tmp_path / "run" / "pipeline" / "int8-w"
    card = (from_run / "README.md").read_text()  # the run's fidelity of the graph in the folder
    assert "| ONNX Runtime | 1 |" in card and "ORTDiffusionPipeline.from_pretrained" in card
    for folder in (tmp_path / "deploy", from_run):
        pipe = ORTDiffusionPipeline.from_pretrained(folder)
        image = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
        assert image.size == (16, 16) and np.asarray(image).std() > 0


def test_export_pipeline_without_export_is_refused_before_any_work(tmp_path, capsys):
    from diffquant.cli.main import main

    assert main(["run", "--no-export", "--export-pipeline", "--out", str(tmp_path / "out")]) == 2
    assert "drop --no-export" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
