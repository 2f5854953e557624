"""The CLI end to end: run the command, then reload what it wrote."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from diffquant.cli.main import main

pytestmark = pytest.mark.slow  # exports, full runs or benchmarks: `pytest -m 'not slow'` leaves them out


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    status = main(["--quiet", "run", "--num-images", "3", "--steps", "4", "--out", str(out),
                   "--prompt", "an orange circle on a blue background", "--prompt",
                   "a small green square on the left on a white background"])
    assert status == 0
    return out


def test_run_writes_results_that_reload(shapes_run):
    from diffquant import RunConfig, RunResult
    from diffquant.core.config import CONFIG_VERSION

    results = RunResult.load(shapes_run)
    assert json.loads((shapes_run / "results.json").read_text())["version"] == 5
    assert results.status == "complete" and results.denoiser == "UNet2DConditionModel"
    assert results.config["type"] == "RunConfig" and results.config["version"] == CONFIG_VERSION == 6
    assert list(results.recipes) == ["int8-w", "fp8-w"]
    config = RunConfig.load(shapes_run / "config.json")
    assert config.recipes == ("int8-w", "fp8-w") and config.steps == 4
    for entry in results.recipes.values():
        assert entry.quality.psnr_db > 15 and 0 < entry.quality.ssim <= 1
        assert entry.layers["n_quantized"] > 0
        assert len(entry.images) == 3 and all((shapes_run / p).is_file() for p in entry.images)
    for attribute in ("background", "color", "shape", "size", "position", "overall"):
        assert 0 <= results.baseline_shapeeval[attribute] <= 1
    assert results.baseline_shapeeval["n_position"] == 1  # 1 of the 3 captions names a position
    for entry in results.recipes.values():
        assert 0 <= entry.quality.shapeeval_agreement["all"] <= 1
        assert set(entry.ort.vs_baseline.shapeeval) >= {"shape", "position", "overall"}
    assert any("simulated" in step for step in results.timings)


def test_run_onnx_files_open_in_onnx_runtime(shapes_run):
    import onnxruntime as ort

    from diffquant import RunResult

    results = RunResult.load(shapes_run / "results.json")
    int8 = results.recipes["int8-w"].onnx
    fp8 = results.recipes["fp8-w"].onnx
    for entry in (int8, fp8):
        session = ort.InferenceSession(str(shapes_run / entry["path"]), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["sample", "timestep", "encoder_hidden_states"]
        assert entry["relative_error"] <= entry["relative_error_bound"]
    assert int8["size_bytes"] <= 0.3 * results.denoiser_fp32_bytes  # int8 codes
    assert fp8["size_bytes"] <= 0.3 * results.denoiser_fp32_bytes  # fp8 codes
    for name in ("int8-w", "fp8-w"):  # the pipeline with the UNet in ONNX Runtime draws the same images
        assert results.recipes[name].ort.vs_torch.psnr_db >= 30


def test_run_replays_from_its_config_json(shapes_run, tmp_path):
    """`run --config` replays a run: same prompts and seeds give the same baseline images."""
    from diffquant import RunConfig, RunResult

    config = RunConfig.load(shapes_run / "config.json").replace(recipes=("int8-w",), export=False)
    replay_config = tmp_path / "config.json"
    replay_config.write_text(json.dumps(config.to_dict()))
    assert main(["--quiet", "run", "--config", str(replay_config), "--out", str(tmp_path / "replay")]) == 0
    first, replay = RunResult.load(shapes_run), RunResult.load(tmp_path / "replay")
    assert replay.prompts == first.prompts and list(replay.recipes) == ["int8-w"]
    for a, b in zip(first.baseline_images, replay.baseline_images):
        assert Image.open(shapes_run / a).tobytes() == Image.open(tmp_path / "replay" / b).tobytes()


def test_grid_has_a_row_per_recipe_and_a_column_per_image(shapes_run):
    grid = Image.open(shapes_run / "grid.png")
    # rows: baseline, int8-w, int8-w in ONNX Runtime, fp8-w, fp8-w in ONNX Runtime
    assert grid.size == (110 + 3 * 128, 18 + 5 * 128)


def test_report_escapes_prompt_html(shapes_run):
    from dataclasses import replace

    from diffquant import RunResult
    from diffquant.report.html import render_html

    results = RunResult.load(shapes_run)
    results = replace(results, prompts=("a red circle on a <b>blue</b> background", *results.prompts[1:]))
    page = render_html(shapes_run, results)
    assert "&lt;b&gt;blue&lt;/b&gt;" in page and "<b>blue</b>" not in page
    assert "simulated" in (shapes_run / "report.html").read_text()


def test_results_keep_each_images_fidelity_and_the_report_shows_the_worst(shapes_run):
    import numpy as np
    from PIL import Image

    from diffquant import RunResult, compare

    results = RunResult.load(shapes_run)
    baseline = [Image.open(shapes_run / p) for p in results.baseline_images]
    prompts = [results.prompts[k % len(results.prompts)] for k in range(len(baseline))]
    page = (shapes_run / "report.html").read_text()
    for name, entry in results.recipes.items():
        q = entry.quality
        measured = compare(baseline, [Image.open(shapes_run / p) for p in entry.images], prompts)
        assert np.allclose(q.per_image.psnr_db, measured.psnr_db) and np.allclose(q.per_image.ssim, measured.ssim)
        assert q.psnr_db == pytest.approx(np.mean(measured.psnr_db))
        assert q.psnr_p10_db == pytest.approx(np.percentile(measured.psnr_db, 10))
        assert q.psnr_worst_db == pytest.approx(min(measured.psnr_db)) and q.ssim_worst == pytest.approx(min(measured.ssim))
        worst = q.per_image.worst()
        assert worst[0] == int(np.argmin(measured.psnr_db)) and len(worst) == 3
        for k in worst:  # each worst image beside the fp32 image of its seed
            assert f'alt="{name} image {k}"' in page and f'alt="fp32 image {k}"' in page
        for ort_quality in (entry.ort.vs_torch, entry.ort.vs_baseline):
            assert len(ort_quality.per_image.psnr_db) == len(baseline)
            assert ort_quality.psnr_worst_db == min(ort_quality.per_image.psnr_db)
    assert "Worst images" in page


def test_results_of_version_3_still_load(shapes_run):
    from diffquant import RunResult

    data = json.loads((shapes_run / "results.json").read_text())
    data["version"] = 3
    for entry in data["recipes"].values():
        for key in ("per_image", "psnr_p10_db", "psnr_worst_db", "ssim_p10", "ssim_worst"):
            entry["quality"].pop(key)
    results = RunResult.from_dict(data)
    assert all(r.quality.per_image is None and r.quality.psnr_db > 15 for r in results.recipes.values())


def test_terminal_and_report_show_adherence_per_attribute(shapes_run):
    from diffquant import RunResult
    from diffquant.cli.run import summary_table

    table = summary_table(RunResult.load(shapes_run))
    for label in ("background (n=3)", "colour (n=3)", "shape (n=3)", "size (n=1)", "position (n=1)",
                  "agree with fp32", "int8-w ORT"):
        assert label in table
    page = (shapes_run / "report.html").read_text()
    assert "Prompt adherence (ShapeEval)" in page and "position (n=1)" in page


def test_terminal_and_report_show_bits_per_weight(shapes_run):
    from diffquant import RunResult
    from diffquant.cli.run import summary_table

    results = RunResult.load(shapes_run)
    table = summary_table(results).splitlines()
    column = table[0].split().index("bits/w") - 2  # the headers "PSNR dB" and "SQNR dB" are two words each
    for name in ("int8-w", "fp8-w"):
        bits = results.recipes[name].layers["bits_per_weight"]
        assert 8 <= bits < 9  # 8-bit codes and their scales: every Linear/Conv2d of shapes-sd quantized
        row = next(line.split() for line in table if line.split()[:1] == [name])
        assert row[column] == f"{bits:.2f}"
    page = (shapes_run / "report.html").read_text()
    assert "bits per weight" in page and f"<td>{results.recipes['int8-w'].layers['bits_per_weight']:.2f}</td>" in page


def test_report_shows_every_image_in_headless_chromium(shapes_run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    page = (shapes_run / "report.html").read_text()
    probe = ("<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
             "document.body.setAttribute('data-probe',imgs.length+':'+imgs.filter(i=>i.naturalWidth>0).length);"
             "const h=[...document.querySelectorAll('h2')].find(h=>h.textContent.startsWith('Prompt adherence'));"
             "const table=h&&h.nextElementSibling.nextElementSibling;"
             "document.body.setAttribute('data-adherence',table?table.rows.length+':'+table.offsetHeight:'none')})"
             "</script></body>")
    (tmp_path / "probe.html").write_text(page.replace("</body>", probe))
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", (tmp_path / "probe.html").as_uri()],
        capture_output=True, text=True, timeout=120).stdout
    total, shown = dom.split('data-probe="')[1].split('"')[0].split(":")
    assert int(total) >= 1 and total == shown
    rows, height = dom.split('data-adherence="')[1].split('"')[0].split(":")
    assert int(rows) == 1 + 5 and int(height) > 0  # header, baseline, 2 recipes x (torch, ORT): rendered, visible


def test_existing_output_folder_is_never_overwritten(tmp_path, tiny_sd_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--quiet", "run", "--model", str(tiny_sd_dir), "--steps", "2", "--num-images", "1",
                 "--recipes", "int8-w", "--no-export", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    fresh = [p for p in tmp_path.iterdir() if p.name.startswith("out-")]
    assert len(fresh) == 1 and (fresh[0] / "results.json").is_file()


def test_interrupted_run_keeps_finished_artifacts_valid(tmp_path, tiny_sd_dir, monkeypatch):
    from diffquant import workflow

    calls = []

    def quantize_then_interrupt(pipe, recipe, *args, **kwargs):
        calls.append(recipe)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(pipe, recipe, *args, **kwargs)

    original = workflow.quantize
    monkeypatch.setattr(workflow, "quantize", quantize_then_interrupt)
    out = tmp_path / "out"
    status = main(["--quiet", "run", "--model", str(tiny_sd_dir), "--steps", "2", "--num-images", "2",
                   "--recipes", "int8-w,fp8-w", "--no-export", "--out", str(out)])
    assert status == 130
    results = json.loads((out / "results.json").read_text())
    assert list(results["recipes"]) == ["int8-w"]
    assert all((out / p).is_file() for p in results["recipes"]["int8-w"]["images"])
    assert not [p for p in out.rglob(".*")]  # no half-written temp file left


@pytest.mark.parametrize("argv, message", [
    (["run", "--recipes", "int3-w"], "unknown recipe 'int3-w': choose from int8-w"),
    (["run", "--model", "/no/such/model"], "does not exist"),
    (["run", "--dtype", "fp16", "--device", "cpu"], "--dtype fp32"),
    (["view", "/no/such.onnx", "--no-browser"], "no ONNX file"),
])
def test_bad_input_is_one_line_without_traceback(argv, message, capsys, tmp_path):
    assert main(["--quiet", *argv, *(["--out", str(tmp_path / "o")] if argv[0] == "run" else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def _imports_quark(importtime_log: str) -> bool:
    """Whether `python -X importtime`'s log (one line per imported module) lists a quark module."""
    return any(line.split("|")[-1].strip().startswith("quark") for line in importtime_log.splitlines())


def test_help_does_not_import_quark():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "diffquant.cli.main", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "view" in done.stdout
    assert "diffquant" in done.stderr and not _imports_quark(done.stderr)


def test_env_prints_versions_and_settings_without_importing_quark():
    import torch
    from importlib import metadata

    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "diffquant.cli.main", "env"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "QUARK_DISABLE_COMPILE": "0"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line[:14].strip(): line[14:].strip() for line in done.stdout.splitlines()}  # "name(padded) value"
    assert rows["torch"] == torch.__version__ and rows["onnxruntime"] == metadata.version("onnxruntime")
    assert rows["diffquant"] == metadata.version("diffquant")
    assert rows["quark compile"].startswith("QUARK_DISABLE_COMPILE=0")  # the user's setting, not a default
    assert "CPU threads" in rows["torch build"]
    assert (Path(rows["shapes-sd"]) / "model_index.json").is_file()
    assert not _imports_quark(done.stderr)


def test_view_serves_the_onnx_file_on_localhost_until_interrupted(tmp_path):
    import signal
    import socket
    import urllib.request

    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model_path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph), str(model_path))
    with socket.socket() as probe:  # a port that is free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        server = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "diffquant.cli.main", "view", str(model_path),
                                   "--port", str(port), "--no-browser"],
                                  stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        line = server.stdout.readline()  # printed once Netron is listening
        assert f"at http://127.0.0.1:{port} " in line, line + log.read_text()[-2000:]
        url = f"http://127.0.0.1:{port}"
        page = urllib.request.urlopen(url, timeout=30).read().decode()
        assert '<meta name="file" content="/data/tiny.onnx">' in page
        assert urllib.request.urlopen(f"{url}/data/tiny.onnx", timeout=30).read() == model_path.read_bytes()
        server.send_signal(signal.SIGINT)  # Ctrl-C stops the server cleanly
        try:
            status = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            lines = [x for x in log.read_text().splitlines() if not x.startswith("import time:")]
            raise AssertionError("view did not stop within 60 s of Ctrl-C; its stderr: " + "\n".join(lines[-20:]))
        assert status == 0
    finally:
        server.kill()
        server.wait()
    assert "Traceback" not in log.read_text() and not _imports_quark(log.read_text())


def test_step_subcommands_chain_on_saved_artifacts(tmp_path, tiny_sd_dir):
    model = str(tiny_sd_dir)
    common = ["--steps", "2", "--num-images", "2", "--prompt", "a red circle on a blue background"]
    assert main(["--quiet", "quantize", "--model", model, "--recipe", "int8-w", "--out", str(tmp_path / "q")]) == 0
    assert main(["--quiet", "generate", "--model", model, *common, "--out", str(tmp_path / "base")]) == 0
    assert main(["--quiet", "generate", "--quantized", str(tmp_path / "q"), *common, "--out", str(tmp_path / "int8")]) == 0
    assert main(["--quiet", "compare", str(tmp_path / "base"), str(tmp_path / "int8"), "--out", str(tmp_path / "cmp")]) == 0
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert comparison["results"][str(tmp_path / "int8")]["mean"]["psnr_db"] > 10
    assert main(["--quiet", "export", str(tmp_path / "q"), "--out", str(tmp_path / "onnx")]) == 0
    assert (tmp_path / "onnx" / "unet.onnx").is_file()
    assert Path(tmp_path / "cmp" / "grid.png").is_file()


def test_w8a8_run_needs_calibration_prompts_for_a_real_model(tmp_path, tiny_sd_dir, capsys):
    argv = ["--quiet", "run", "--model", str(tiny_sd_dir), "--recipes", "w8a8-int8", "--steps", "2",
            "--num-images", "1", "--no-export"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert "--calib-prompts" in capsys.readouterr().err
    prompts = tmp_path / "calib.txt"
    prompts.write_text("a red circle on a blue background\n\na green square on a white background\n")
    assert main([*argv, "--calib-prompts", str(prompts), "--calib-timesteps", "2", "--out", str(tmp_path / "b")]) == 0
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert results["calibration"]["prompts"] == 2 and results["calibration"]["denoiser_calls"] == 2
    assert len(results["calibration"]["timesteps"]) == 2


def test_sensitivity_command_writes_ranking_chart_and_mixed_recipe(tmp_path, tiny_sd_dir):
    prompts = tmp_path / "calib.txt"
    prompts.write_text("a red circle on a blue background\na green square on a white background\n")
    out = tmp_path / "sens"
    assert main(["--quiet", "sensitivity", "--model", str(tiny_sd_dir), "--recipe", "int8-w", "--steps", "2",
                 "--calib-prompts", str(prompts), "--keep-float", "2", "--max-keep", "2", "--out", str(out)]) == 0
    data = json.loads((out / "sensitivity.json").read_text())
    values = [r["sqnr_db"] for r in data["ranking"]]
    assert values == sorted(values) and len(data["keep_float_curve_db"]) == 3
    mixed = json.loads((out / "int8-w-mixed2.json").read_text())
    assert mixed["exclude"] == [r["name"] for r in data["ranking"][:2]]
    assert (out / "sensitivity.png").stat().st_size > 1000 and (out / "report.html").is_file()
    run_out = tmp_path / "run"
    assert main(["--quiet", "run", "--model", str(tiny_sd_dir), "--recipes", str(out / "int8-w-mixed2.json"),
                 "--steps", "2", "--num-images", "1", "--no-export", "--out", str(run_out)]) == 0
    layers = json.loads((run_out / "results.json").read_text())["recipes"]["int8-w-mixed2"]["layers"]
    assert sorted(layers["float"]) == sorted(mixed["exclude"])


def test_run_on_the_embedded_transformer_model_end_to_end(tmp_path):
    """`diffquant run --model shapes-sd3`: the SD3 MMDiT quantized, exported with int8 codes that ONNX
    Runtime runs on integer kernels, the transformer in ONNX Runtime inside its pipeline; results reload."""
    from diffquant import RunResult

    out = tmp_path / "sd3"
    assert main(["--quiet", "run", "--model", "shapes-sd3", "--recipes", "int8-w,w8a8-int8", "--num-images", "2",
                 "--steps", "3", "--calib-size", "2", "--calib-timesteps", "2", "--out", str(out)]) == 0
    results = RunResult.load(out)
    assert results.denoiser == "SD3Transformer2DModel" and results.settings["guidance"] == 4.0
    for name, entry in results.recipes.items():
        assert entry.onnx["path"].endswith("transformer.onnx")
        assert entry.onnx["relative_error"] <= entry.onnx["relative_error_bound"]
        assert entry.layers["n_quantized"] >= 40 and entry.sqnr_db > 15
        assert entry.ort.vs_torch.psnr_db >= 30 and all((out / p).is_file() for p in entry.ort.images)
    w8a8 = results.recipes["w8a8-int8"]
    fused = w8a8.onnx["fused_ops"]
    # Every quantized Linear on an integer kernel; the one Conv (the patch embedding), when quantized, runs
    # float (the profile's measured float layers include it).
    convs = sum(name == "pos_embed.proj" for name in w8a8.layers["quantized"])
    assert fused.get("MatMulIntegerToFloat", 0) + fused.get("QGemm", 0) == w8a8.layers["n_quantized"] - convs
    assert w8a8.layers["float_reason"].startswith("the 24 layers")
    # 2 kept timesteps of one batch that holds both captions and both guidance halves
    assert results.calibration["denoiser_calls"] == 2 and len(results.calibration["timesteps"]) == 2


def test_the_cli_offers_the_int4_compute_choices_export_knows():
    from diffquant.cli.main import build_parser
    from diffquant.cli.options import INT4_COMPUTE_CHOICES
    from diffquant.export.onnx import INT4_COMPUTE

    assert INT4_COMPUTE_CHOICES == (*INT4_COMPUTE, "auto")  # auto: decided from the CPU (diffquant.core.cpu)
    for command in (["export", "q", "--out", "o"], ["bench"]):
        assert build_parser().parse_args([*command, "--int4-compute", "int8"]).int4_compute == "int8"
        assert build_parser().parse_args(command).int4_compute is None  # $DIFFQUANT_INT4_COMPUTE, else float
