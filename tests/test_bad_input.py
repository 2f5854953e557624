"""The bad-input battery of issue 9: bad arguments, broken files and faults give one clear line (exit
code 2) before slow work, never a traceback, and never lose or mislabel data."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import diffquant as dq
from diffquant.cli.main import main
from diffquant.core.errors import DiffquantError

SRC = Path(__file__).resolve().parents[1] / "src"
TINY_RUN = ["--steps", "2", "--num-images", "1", "--recipes", "int8-w"]


def one_line_error(capsys, argv: list[str], expected: str) -> str:
    """Run the CLI; it must exit with 2 and print `expected` in one line of stderr, no traceback."""
    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err
    return err


def cli_subprocess(args: list[str], env: dict, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in unset} | {"PYTHONPATH": str(SRC), **env}
    return subprocess.run([sys.executable, "-m", "diffquant.cli.main", *args], capture_output=True, text=True,
                          env=environment, timeout=600)


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- shared artifacts: one tiny run, one quantized UNet, two generated folders ----

@pytest.fixture(scope="module")
def tiny_run(tiny_sd_dir, tmp_path_factory):
    """`diffquant run --no-export` on the tiny pipeline, under umask 022; returns (out folder, stdout)."""
    out = tmp_path_factory.mktemp("tiny-run") / "out"
    stdout = io.StringIO()
    with umask(0o022), contextlib.redirect_stdout(stdout):
        assert main(["--quiet", "run", "--model", str(tiny_sd_dir), *TINY_RUN, "--no-export", "--out", str(out)]) == 0
    return out, stdout.getvalue()


@pytest.fixture(scope="module")
def quantized_dir(tiny_sd_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quantized") / "q"
    assert main(["--quiet", "quantize", "--model", str(tiny_sd_dir), "--recipe", "int8-w", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def generated_dirs(tiny_sd_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("generated")
    common = ["--model", str(tiny_sd_dir), "--steps", "2", "--num-images", "2"]
    for name, seed in (("a", "1"), ("b", "1")):
        assert main(["--quiet", "generate", *common, "--seed", seed, "--out", str(root / name)]) == 0
    return root / "a", root / "b"


def non_empty(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "keep.txt").write_text("mine")
    return folder


# ---- data lost: no command writes into a non-empty --out ----

def _fake_benchmark(out, **kwargs):
    from diffquant.bench.runner import BenchResult, BenchRow

    result = BenchResult("fake", 2, [4, 8, 8], 1, rows=[BenchRow("torch fp32", False, 1.0, 1.0, 0.1, None, 1.0, 1.0)])
    (Path(out) / "bench.json").write_text(json.dumps(result.to_dict()))
    result.plot(Path(out) / "bench.png")
    return result


@pytest.mark.slow
@pytest.mark.parametrize("command", ["generate", "quantize", "export", "compare", "sensitivity", "bench"])
def test_no_command_writes_into_a_non_empty_out(command, tmp_path, tiny_sd_dir, quantized_dir, generated_dirs,
                                                monkeypatch):
    out = non_empty(tmp_path / "out")
    model = ["--model", str(tiny_sd_dir)]
    argv = {
        "generate": ["generate", *model, "--steps", "2", "--num-images", "1"],
        "quantize": ["quantize", *model, "--recipe", "int8-w"],
        "export": ["export", str(quantized_dir)],
        "compare": ["compare", *map(str, generated_dirs)],
        "sensitivity": ["sensitivity", *model, "--recipe", "int8-w", "--steps", "2", "--calib-size", "1",
                        "--calib-prompts", str(_calib_file(tmp_path)), "--max-keep", "1"],
        "bench": ["bench"],
    }[command]
    if command == "bench":  # the folder rule is the CLI's; the benchmark itself is measured elsewhere
        import diffquant.bench.runner

        monkeypatch.setattr(diffquant.bench.runner, "benchmark", _fake_benchmark)
    assert main(["--quiet", *argv, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    siblings = [p for p in tmp_path.iterdir() if p.name.startswith("out-")]
    assert len(siblings) == 1 and any(siblings[0].iterdir())


def _calib_file(folder: Path) -> Path:
    path = folder / "calib.txt"
    path.write_text("a red circle on a blue background\n")
    return path


def test_runs_started_at_once_on_one_out_get_their_own_folders(tmp_path):
    from diffquant.core.artifacts import resolve_out_dir

    out = non_empty(tmp_path / "out")
    start, chosen, errors = threading.Barrier(8), [], []

    def one_run(k: int) -> None:
        start.wait()
        try:
            folder = resolve_out_dir(out)
            (folder / "config.json").write_text(str(k))  # a run writes at once
            chosen.append(folder)
        except OSError as error:
            errors.append(error)

    threads = [threading.Thread(target=one_run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(chosen)) == 8
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("out-")) == ["out"]  # no stray folder
    assert all(len(list(folder.iterdir())) == 1 for folder in chosen)


def test_artifacts_honour_the_umask(tmp_path):
    from safetensors.torch import save_file

    from diffquant.core.artifacts import atomic_dir, save_image, write_json

    for mask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o077, 0o600, 0o700)):
        folder = tmp_path / f"m{mask:o}"
        with umask(mask):
            write_json(folder / "results.json", {"a": 1})
            save_image(Image.new("RGB", (2, 2)), folder / "image.png")
            with atomic_dir(folder / "onnx") as tmp:
                (tmp / "unet.onnx").write_bytes(b"x")
            with atomic_dir(folder / "quantized") as tmp:  # safetensors writes 0600 through a temporary file
                save_file({"w": torch.zeros(2)}, str(tmp / "unet_quantized.safetensors"))
        assert mode(folder / "results.json") == file_mode and mode(folder / "image.png") == file_mode
        assert mode(folder / "onnx") == dir_mode and mode(folder / "onnx" / "unet.onnx") == file_mode
        assert mode(folder / "quantized" / "unet_quantized.safetensors") == file_mode


def test_a_run_names_the_cpu_its_times_were_measured_on(tiny_run):
    from diffquant.core.cpu import decisions

    out, _ = tiny_run
    versions = json.loads((out / "results.json").read_text())["versions"]
    assert versions["cpu"] == decisions().cpu.describe()
    assert versions["ort exact int8"].startswith(decisions().ort_exact_int8.value + " (")
    assert decisions().cpu.describe() in (out / "report.html").read_text()


def test_a_saved_quantized_denoiser_is_0644_under_umask_022(tiny_int8_w, tmp_path):
    from diffquant import save_quantized

    with umask(0o022):
        folder = save_quantized(tiny_int8_w, tmp_path / "q")
    assert {p.name: oct(mode(p)) for p in folder.iterdir()} == {
        "unet_quantized.safetensors": oct(0o644), "diffquant_quantized.json": oct(0o644)}
    assert mode(folder) == 0o755


def test_a_run_writes_every_artifact_0644_under_umask_022(tiny_run):
    out, _ = tiny_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"results.json", "report.html", "config.json", "grid.png", "000.png"} <= {p.name for p in files}
    assert {oct(mode(p)) for p in files} == {oct(0o644)}


# ---- silently wrong ----

def test_no_export_table_has_no_nan(tiny_run):
    out, stdout = tiny_run
    assert "nan" not in stdout.lower()
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("recipe "))
    row = next(line for line in lines if line.startswith("int8-w"))
    # the ONNX MB cell: columns are right-aligned, so it is the last word of the row up to its header's end
    end = header.index("ONNX MB") + len("ONNX MB")
    assert row[:end].split()[-1] == "-"
    assert json.loads((out / "results.json").read_text())["status"] == "complete"


def test_a_recipe_file_named_like_a_built_in_is_refused(tmp_path, capsys):
    recipe = tmp_path / "int8-w.json"
    recipe.write_text(json.dumps(dq.get_recipe("int8-w-pc").to_dict() | {"name": "int8-w"}))
    one_line_error(capsys, ["run", "--recipes", f"int8-w,{recipe}", "--out", str(tmp_path / "o")],
                   "are both named 'int8-w'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, expected", [
    (lambda r: r | {"symetric": True, "bits": 4}, "unknown fields 'symetric', 'bits' in the recipe: the fields are type"),
    (lambda r: r | {"weight": r["weight"] | {"round": "up"}}, "unknown field 'round' in the recipe's 'weight': the fields are dtype"),
    (lambda r: [r], "a recipe is a JSON object"),
    (lambda r: {k: v for k, v in r.items() if k != "weight"}, "no 'weight'"),
    (lambda r: r | {"name": "../escape"}, "cannot name a folder"),
])
def test_a_broken_recipe_file_is_one_line(change, expected, tmp_path, capsys):
    recipe = tmp_path / "mine.json"
    recipe.write_text(json.dumps(change(dq.get_recipe("int8-w").to_dict() | {"name": "mine"})))
    one_line_error(capsys, ["run", "--recipes", str(recipe), "--out", str(tmp_path / "o")], expected)


@pytest.mark.parametrize("command", ["run", "generate"])
@pytest.mark.parametrize("flags, expected", [
    (["--steps", "0"], "steps must be a whole number of at least 1, got 0"),
    (["--steps", "-3"], "steps must be a whole number of at least 1, got -3"),
    (["--num-images", "0"], "number of images must be a whole number of at least 1, got 0"),
    (["--num-images", "-2"], "number of images must be a whole number of at least 1, got -2"),
    (["--guidance", "-1"], "guidance must be a number of at least 0"),
    (["--guidance", "nan"], "guidance must be a number of at least 0"),
])
def test_bad_generation_settings_are_refused_up_front(command, flags, expected, tmp_path, capsys):
    one_line_error(capsys, [command, *flags, "--out", str(tmp_path / "o")], expected)
    assert not (tmp_path / "o").exists()


def test_generate_api_refuses_zero_steps_and_takes_a_string_as_one_prompt(shapes_pipe):
    with pytest.raises(DiffquantError, match="steps must be a whole number of at least 1, got 0"):
        dq.generate(shapes_pipe, ["a red circle on a blue background"], steps=0)
    with pytest.raises(DiffquantError, match="guidance must be"):
        dq.generate(shapes_pipe, ["a red circle on a blue background"], guidance=-2)
    with pytest.raises(DiffquantError, match="prompts must be a string or a list of strings, got int"):
        dq.generate(shapes_pipe, 3)
    one = dq.generate(shapes_pipe, "a red circle on a blue background", steps=2)
    listed = dq.generate(shapes_pipe, ["a red circle on a blue background"], steps=2)
    assert len(one) == 1 and one[0].tobytes() == listed[0].tobytes()


def _tiny_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("content", [b'{"recipes": {}}\n', b""])
def test_view_refuses_a_file_that_is_not_onnx(content, tmp_path, capsys):
    path = tmp_path / "unet.onnx"
    path.write_bytes(content)
    one_line_error(capsys, ["view", str(path), "--no-browser"], "is not an ONNX model")


def test_view_refuses_a_busy_or_invalid_port(tmp_path, capsys):
    model = _tiny_onnx(tmp_path / "unet.onnx")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        one_line_error(capsys, ["view", str(model), "--no-browser", "--port", str(port)], f"port {port} on 127.0.0.1 "
                       "is already in use")
    one_line_error(capsys, ["view", str(model), "--no-browser", "--port", "70000"], "between 1 and 65535")


# ---- tracebacks after work was done ----

def test_bf16_with_export_is_refused_up_front(tmp_path, capsys):
    one_line_error(capsys, ["run", "--dtype", "bf16", "--device", "cpu", "--out", str(tmp_path / "o")],
                   "--dtype bf16 cannot be exported to ONNX: pass --no-export")
    assert not (tmp_path / "o").exists()


def test_bf16_runs_end_to_end_without_export(tiny_sd_dir, tmp_path):
    out = tmp_path / "o"
    assert main(["--quiet", "run", "--model", str(tiny_sd_dir), *TINY_RUN, "--dtype", "bf16", "--device", "cpu",
                 "--no-export", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["recipes"]["int8-w"]["quality"]["psnr_db"] > 10


@pytest.mark.parametrize("flags, expected", [
    (["--iterations", "0"], "--iterations must be a whole number of at least 1, got 0"),
    (["--warmup", "-1"], "--warmup must be a whole number of at least 0, got -1"),
    (["--batch", "0"], "--batch must be a whole number of at least 1, got 0"),
])
def test_bench_refuses_impossible_counts(flags, expected, tmp_path, capsys):
    one_line_error(capsys, ["bench", *flags, "--out", str(tmp_path / "o")], expected)
    assert not (tmp_path / "o").exists()


def test_a_flux_index_with_a_unet_entry_is_refused(tiny_sd_dir, tmp_path, capsys):
    flux = tmp_path / "flux"
    shutil.copytree(tiny_sd_dir, flux)
    index = json.loads((flux / "model_index.json").read_text())
    (flux / "model_index.json").write_text(json.dumps(index | {"_class_name": "FluxPipeline"}))
    one_line_error(capsys, ["generate", "--model", str(flux), "--out", str(tmp_path / "o")],
                   "is a FluxPipeline, which takes no UNet")


# ---- transformer (DiT) models: SD3 and FLUX.1 ----

def test_an_unsupported_dit_is_one_line_naming_the_supported_ones(tmp_path, capsys):
    ltx = tmp_path / "ltx"
    ltx.mkdir()
    (ltx / "model_index.json").write_text(json.dumps({"_class_name": "LTXPipeline",
                                                      "transformer": ["diffusers", "LTXVideoTransformer3DModel"]}))
    one_line_error(capsys, ["generate", "--model", str(ltx), "--out", str(tmp_path / "o")],
                   "is a LTXPipeline whose denoiser is LTXVideoTransformer3DModel (DiT): not supported; "
                   "diffquant supports UNet2DConditionModel (SD 1.x/2.x, SDXL), SD3Transformer2DModel")


@pytest.mark.parametrize("damage", ["index", "folder"])
def test_a_flux_folder_without_its_t5_is_one_line(damage, tiny_flux_dir, tmp_path, capsys):
    flux = tmp_path / "flux"
    shutil.copytree(tiny_flux_dir, flux)
    if damage == "index":
        index = json.loads((flux / "model_index.json").read_text())
        del index["text_encoder_2"]
        (flux / "model_index.json").write_text(json.dumps(index))
    else:
        shutil.rmtree(flux / "text_encoder_2")
    expected = ("without its T5 text encoder (text_encoder_2 is missing" if damage == "index"
                else "has no text_encoder_2 folder: FLUX.1 cannot run without its T5 text encoder")
    one_line_error(capsys, ["generate", "--model", str(flux), "--out", str(tmp_path / "o")], expected)


def test_an_sd3_folder_without_its_t5_names_no_t5(tiny_sd3_dir, tmp_path, capsys):
    sd3 = tmp_path / "sd3"
    shutil.copytree(tiny_sd3_dir, sd3)
    shutil.rmtree(sd3 / "text_encoder_3")
    one_line_error(capsys, ["generate", "--model", str(sd3), "--out", str(tmp_path / "o")],
                   "has no text_encoder_3 folder: load SD3 without its T5 with no_t5 (--no-t5)")


def test_a_transformer_in_pickle_format_only_is_one_line(tiny_sd3_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    sd3 = tmp_path / "sd3"
    shutil.copytree(tiny_sd3_dir, sd3)
    weights = sd3 / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    one_line_error(capsys, ["generate", "--model", str(sd3), "--out", str(tmp_path / "o")],
                   "transformer holds pickle weights only (.bin): diffquant loads safetensors only")


def test_guidance_on_flux_schnell_is_one_line(tiny_flux_schnell_dir, tmp_path, capsys):
    one_line_error(capsys, ["generate", "--model", str(tiny_flux_schnell_dir), "--guidance", "3.5",
                            "--out", str(tmp_path / "o")],
                   "FLUX.1-schnell takes no guidance (it has no guidance embedding")
    schnell = dq.load_pipeline(str(tiny_flux_schnell_dir), device="cpu")
    with pytest.raises(DiffquantError, match="FLUX.1-schnell takes no guidance"):
        dq.calibrate(schnell, ["a red circle on a blue background"], guidance=2.0)
    image = dq.generate(schnell, "a red circle on a blue background", steps=1, guidance=0, height=32, width=32)[0]
    assert image.size == (32, 32)  # 0 (its model card's value) is taken


def _sd3_with_widths(joint: int, t5: int, path: Path) -> Path:
    """The tiny SD3 (two CLIP encoders of 32 features) with a transformer of joint width `joint` and a T5 of
    `t5` features, saved to `path`."""
    from conftest import T5_TOKENIZER, _t5_encoder, build_tiny_sd3
    from diffusers import SD3Transformer2DModel
    from transformers import T5TokenizerFast

    pipe = build_tiny_sd3()
    assert pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size == 64
    pipe.transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=joint, caption_projection_dim=64, pooled_projection_dim=64,
        pos_embed_max_size=8)
    pipe.text_encoder_3 = _t5_encoder(T5TokenizerFast.from_pretrained(T5_TOKENIZER), t5)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("joint, t5, expected", [
    (48, 48, "CLIP text encoders' widths 32 + 32 = 64 exceed the transformer's joint_attention_dim 48, so the "
             "pipeline would silently crop"),
    (64, 96, "its T5 width 96 is not the transformer's joint_attention_dim 64"),
])
def test_sd3_text_widths_that_do_not_fit_are_one_line(joint, t5, expected, tmp_path, capsys):
    model = _sd3_with_widths(joint, t5, tmp_path / "sd3")
    one_line_error(capsys, ["generate", "--model", str(model), "--out", str(tmp_path / "o")], expected)


@pytest.mark.parametrize("index", ["{ broken", "[]"])
def test_a_broken_model_index_is_one_line(index, tiny_sd_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_dir, broken)
    (broken / "model_index.json").write_text(index)
    one_line_error(capsys, ["generate", "--model", str(broken), "--out", str(tmp_path / "o")], "model_index.json")


def test_compare_with_an_image_missing_is_one_line(generated_dirs, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(generated_dirs[1], broken)
    (broken / "images" / "001.png").unlink()
    one_line_error(capsys, ["compare", str(generated_dirs[0]), str(broken), "--out", str(tmp_path / "c")],
                   "lacks 1 of its 2 images (first: images/001.png)")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("text, expected", [
    ('{"type": "QuantizedUNet", "version": 1, "recipe"', "is not valid JSON"),
    ("[1, 2]", "is not a diffquant quantized UNet"),
    ('{"type": "QuantizedUNet", "version": 1, "model": null}', "lacks its recipe"),
    ('{"type": "QuantizedUNet", "version": 1, "model": null, "recipe": {"type": "Recipe", "version": 2}}',
     "no 'weight'"),
])
@pytest.mark.parametrize("command", ["export", "generate"])
def test_a_broken_quantized_folder_is_one_line(command, text, expected, quantized_dir, tmp_path, capsys):
    broken = tmp_path / "q"
    shutil.copytree(quantized_dir, broken)
    (broken / "diffquant_quantized.json").write_text(text)
    argv = ["export", str(broken)] if command == "export" else ["generate", "--quantized", str(broken)]
    one_line_error(capsys, [*argv, "--out", str(tmp_path / "o")], expected)
    assert not (tmp_path / "o").exists()


def _in_own_mount(tmp_path: Path, options: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI with `<tmp_path>/mnt` a fresh tmpfs mounted with `options` (in a private mount namespace,
    gone when the command ends: hidden files left in it are listed on stdout as LEFTOVER lines)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("util-linux's unshare is not installed")
    probe = subprocess.run([unshare, "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here (unprivileged user namespaces off): {probe.stderr.decode()}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = ('mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; dir="$2"; shift 2; "$@"; rc=$?; '
              'find "$dir" -name ".*" -printf "LEFTOVER %p\\n"; exit $rc')
    return subprocess.run([unshare, "-rm", "sh", "-c", script, "sh", options, str(mnt), sys.executable, "-m",
                           "diffquant.cli.main", "--quiet", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(SRC)})


def test_a_read_only_out_is_one_line_before_any_work(tmp_path, tiny_sd_dir):
    result = _in_own_mount(tmp_path, "ro", ["run", "--model", str(tiny_sd_dir), *TINY_RUN,
                                            "--out", str(tmp_path / "mnt" / "out")])
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Read-only file system" in err and "pass a writable --out" in err, err


@pytest.mark.slow
def test_a_full_disk_says_so_without_quark_advice(tmp_path, quantized_dir):
    result = _in_own_mount(tmp_path, "size=64k", ["export", str(quantized_dir), "--out", str(tmp_path / "mnt" / "x")])
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()  # the log lines of the work done before it, then one error line
    assert err.splitlines()[-1].startswith("diffquant: error: disk full while writing"), err
    assert "Traceback" not in err and "dynamo" not in err
    assert "LEFTOVER" not in result.stdout  # the export's temporary folder was removed


# ---- faults ----

@pytest.mark.slow
def test_sigterm_cleans_up_and_keeps_what_finished(tmp_path):
    """The original finding: SIGTERM during the ONNX export left a 13 MB hidden folder and no message."""
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "diffquant.cli.main", "--quiet", "run", *TINY_RUN,
                                "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(SRC)})
    deadline = time.monotonic() + 300
    while not list((out / "onnx").glob(".int8-w.*")):  # the export's temporary folder: generation is done
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("diffquant: terminated")
    assert "--resume goes on from there" in err  # it kept results.json: the line says how to go on
    assert not [p for p in out.rglob(".*")]  # no hidden temporary file or folder
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted"
    assert all((out / p).is_file() for p in results["baseline_images"])
    assert (out / "images" / "int8-w" / "000.png").is_file()  # the finished stage before the export


# A command whose main thread sits in one long native call (a torch op that releases the GIL and takes seconds,
# as one FLUX.1 step at 1024x1024 takes minutes on two cores) while an atomic write is in progress.
STUCK_COMMAND = """
import sys, time
from pathlib import Path
import torch
from diffquant.cli import main as cli
from diffquant.cli.base import Command
from diffquant.core.artifacts import atomic_path

def add(p):
    p.add_argument("--out")

def stuck(args):
    with atomic_path(Path(args.out) / "half.bin") as tmp:
        tmp.write_bytes(b"half-written")
        print("READY", flush=True)
        big = torch.rand(4000, 4000)  # about 25 s per svd on two cores, 5x the grace period
        while True:
            torch.linalg.svd(big)  # native code all along; Python would run only between the calls

cli.COMMANDS = cli.COMMANDS + (Command("stuck", "a long native call", add, stuck),)
sys.exit(cli.main(["stuck", "--out", sys.argv[1]]))
"""


@pytest.mark.slow
def test_sigterm_inside_a_long_native_call_stops_within_seconds(tmp_path):
    """Python runs signal handlers only between bytecodes: the watchdog ends a main thread stuck in native code
    after the grace period, removing the temporary files of the writes in progress."""
    from diffquant.cli.termination import GRACE_S

    out = tmp_path / "out"
    out.mkdir()
    process = subprocess.Popen([sys.executable, "-c", STUCK_COMMAND, str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert process.stdout.readline().strip() == "READY", process.communicate()
    assert [p.name for p in out.iterdir()][0].startswith(".half.bin.")  # the atomic write's temporary file
    time.sleep(0.5)  # inside svd
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    took = time.monotonic() - sent
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "stopped inside a long native call" in err.strip().splitlines()[-1], err
    assert took < GRACE_S + 10, took
    assert not list(out.iterdir())  # the temporary file is gone, nothing half-written looks complete


def test_ctrl_c_keeps_the_images_already_generated(tiny_sd_dir, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    original, calls = StableDiffusionPipeline.__call__, []

    def second_batch_interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", second_batch_interrupted)
    out = tmp_path / "out"
    assert main(["--quiet", "run", "--model", str(tiny_sd_dir), "--steps", "2", "--num-images", "9",
                 "--recipes", "int8-w", "--no-export", "--out", str(out)]) == 130
    assert sorted(p.name for p in (out / "images" / "baseline").iterdir()) == [f"{k:03d}.png" for k in range(8)]
    assert json.loads((out / "results.json").read_text())["status"] == "interrupted"


@pytest.mark.parametrize("argv", [
    ["--model", "/no/such/model"],  # fails while loading the pipeline
    ["--recipes", "w8a8-int8", "--calib-prompts", "/no/such/prompts.txt"],  # fails after loading it
])
def test_a_run_that_fails_early_leaves_nothing_that_redirects_the_next(argv, tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--quiet", "run", "--model", str(tiny_sd_dir), "--steps", "2", "--num-images", "1", "--no-export",
                 *argv, "--out", str(out)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not out.exists()
    assert main(["--quiet", "run", "--model", str(tiny_sd_dir), *TINY_RUN, "--no-export", "--out", str(out)]) == 0
    assert (out / "results.json").is_file()  # the next run uses the folder it was given


# ---- API ----

def test_calibrate_is_public_and_feeds_w8a8(tiny_sd):
    assert "calibrate" in dq.__all__
    prompts = ["a red circle on a blue background", "a green square on a white background"]
    calibration = dq.calibrate(tiny_sd, prompts, steps=2, timesteps=2)
    assert len(calibration) == 2 and calibration.description["prompts"] == 2  # 2 batched calls, 2 timesteps
    quantized = dq.quantize(tiny_sd, "w8a8-int8", calibration=calibration)
    assert all(", act int8" in d for d in dq.layer_report(quantized.unet).quantized.values())
    with pytest.raises(DiffquantError, match="pass prompts as a list"):
        dq.calibrate(tiny_sd, "a red circle on a blue background")


def test_quantize_command_calibrates_w8a8(tiny_sd_dir, tmp_path):
    out = tmp_path / "q"
    assert main(["--quiet", "quantize", "--model", str(tiny_sd_dir), "--recipe", "w8a8-int8", "--calib-prompts",
                 str(_calib_file(tmp_path)), "--calib-steps", "2", "--calib-timesteps", "1", "--out", str(out)]) == 0
    reloaded = dq.load_quantized(out, device="cpu")
    assert all(", act int8" in d for d in dq.layer_report(reloaded.unet).quantized.values())


# ---- contention ----

@pytest.mark.parametrize("args, env, threads", [
    (["--threads", "1"], {}, 1),
    ([], {"DIFFQUANT_THREADS": "1"}, 1),
    ([], {"OMP_NUM_THREADS": "1"}, 1),  # a user's OpenMP setting is respected
])
def test_thread_count_is_chosen_by_option_env_or_user(args, env, threads):
    result = cli_subprocess([*args, "env"], env, unset=("DIFFQUANT_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY"))
    assert result.returncode == 0, result.stderr
    assert f"CPU threads: {threads} (OMP_WAIT_POLICY=PASSIVE)" in result.stdout


def test_bad_thread_count_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("DIFFQUANT_THREADS", "many")
    one_line_error(capsys, ["env"], "DIFFQUANT_THREADS must be a whole number of at least 1, got 'many'")
