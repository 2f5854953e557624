"""The peer comparison (python -m diffquant.peers) runs ModelOpt and optimum-quanto on the same captions,
calibration captions and fp32 images as diffquant, and writes one table (needs the `[peers]` extra)."""

import json

import pytest

pytestmark = pytest.mark.slow  # exports, full runs or benchmarks: `pytest -m 'not slow'` leaves them out


def test_peers_compare_on_identical_fp32_images(tiny_sd_dir, tmp_path):
    pytest.importorskip("modelopt.torch.quantization", reason="the [peers] extra (nvidia-modelopt) is not installed")
    pytest.importorskip("optimum.quanto", reason="the [peers] extra (optimum-quanto) is not installed")
    from diffquant.peers.eight import main

    methods = "diffquant:w8a8-int8,modelopt:int8,quanto:w8a8"
    assert main(["--model", str(tiny_sd_dir), "--n", "2", "--calib-size", "2", "--steps", "2",
                 "--methods", methods, "--out", str(tmp_path / "peers")]) == 0
    result = json.loads((tmp_path / "peers" / "peers.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == methods.split(",") and result["fp32_identical"]
    # ModelOpt's filter keeps conv_in, conv_out, conv_shortcut and the time embedding float; quanto takes all.
    assert rows["quanto:w8a8"]["layers_quantized"] == rows["diffquant:w8a8-int8"]["layers_quantized"]
    assert 0 < rows["modelopt:int8"]["layers_quantized"] < rows["quanto:w8a8"]["layers_quantized"]
    for row in rows.values():
        assert row["psnr_worst_db"] <= row["psnr_p10_db"] <= row["psnr_mean_db"] < 100  # quantized: not identical
    assert "modelopt:int8" in (tmp_path / "peers" / "peers.md").read_text()


FOUR_BIT_PEERS = {"bnb:nf4": "bitsandbytes", "gguf:q4_0": "gguf", "quanto:w4": "optimum.quanto",
                  "torchao:int4-g32": "torchao", "nncf:int4-g32": "nncf"}


def _installed_4bit_peers() -> list[str]:
    import importlib.util

    methods = [m for m, package in FOUR_BIT_PEERS.items() if importlib.util.find_spec(package) is not None]
    if not methods:
        pytest.skip("no 4-bit peer library is installed (bitsandbytes, gguf, optimum-quanto, torchao, nncf)")
    return methods


def test_4bit_peers_store_about_4_bits_per_weight(tiny_sd_dir, tmp_path):
    from diffquant.peers.eight import main

    methods = _installed_4bit_peers() + ["gguf:q4_k"] * ("gguf:q4_0" in _installed_4bit_peers())
    assert main(["--model", str(tiny_sd_dir), "--bits", "4", "--n", "2", "--steps", "2",
                 "--methods", ",".join(methods), "--out", str(tmp_path / "peers")]) == 0
    result = json.loads((tmp_path / "peers" / "peers.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == methods and result["fp32_bytes"] > 0
    for method in set(methods) - {"gguf:q4_k"}:
        row = rows[method]
        assert row["layers_quantized"] > 0 and row["bytes"] < result["fp32_bytes"]
        assert row["psnr_worst_db"] <= row["psnr_mean_db"] < 100 and row["seconds_per_image"] > 0
        # 4-bit codes plus scales; the tiny UNet's 8-32 wide layers give per-group/per-layer tables more weight
        assert 4.0 < row["bits_per_weight"] < 7.0
    if "gguf:q4_0" in rows:
        assert rows["gguf:q4_0"]["bits_per_weight"] == pytest.approx(4.5)  # 18 bytes per block of 32
        # gguf's Python quantizer has no Q4_K: a row saying so, not a crash
        assert rows["gguf:q4_k"]["psnr_mean_db"] is None and "no Python quantizer" in rows["gguf:q4_k"]["notes"][0]
    if "torchao:int4-g32" in rows:
        assert rows["torchao:int4-g32"]["bits_per_weight"] == pytest.approx(4 + 2 * 32 / 32)  # fp32 scale + zero
    assert "bits/weight" in (tmp_path / "peers" / "peers.md").read_text()


def test_nncf_runs_a_transformer_pipeline_at_the_text_length_it_feeds(tiny_sd3_dir, tmp_path):
    """SD3 feeds its transformer CLIP and T5 tokens together: NNCF's OpenVINO model is traced at that length
    (traced at CLIP's alone, OpenVINO returned empty outputs and the row was a note)."""
    pytest.importorskip("nncf", reason="nncf is not installed")
    from diffquant.peers.eight import main

    assert main(["--model", str(tiny_sd3_dir), "--bits", "4", "--n", "2", "--steps", "2",
                 "--methods", "nncf:int4-g16", "--out", str(tmp_path / "peers")]) == 0
    row = json.loads((tmp_path / "peers" / "peers.json").read_text())["rows"][0]
    assert row["layers_quantized"] > 0 and row["psnr_mean_db"] is not None, row["notes"]
    assert "OpenVINO fp32 vs torch fp32" in row["notes"][0]


def test_4bit_peer_whose_float_copy_differs_stops_the_run(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    import torch

    import diffquant.quantization.api
    from diffquant.peers.eight import main

    made = diffquant.quantization.api.with_denoiser

    def perturbed(pipe, attribute, module):  # a peer copy that changed the float weights
        with torch.no_grad():
            module.conv_in.weight.add_(0.5)
        return made(pipe, attribute, module)

    monkeypatch.setattr(diffquant.quantization.api, "with_denoiser", perturbed)
    assert main(["--model", str(tiny_sd_dir), "--bits", "4", "--n", "2", "--steps", "2",
                 "--methods", "bnb:nf4", "--out", str(tmp_path / "peers")]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["error: a peer's float pipeline does not reproduce diffquant's fp32 images: the comparison "
                   "would not be on identical images (check for global state the peer changes)"]


def test_diffquant_peers_command_runs_registered_peers_and_notes_a_missing_one(tiny_sd_dir, tmp_path, monkeypatch):
    from diffquant.cli.main import main
    from diffquant.peers.four import BnbPeer

    monkeypatch.setattr(BnbPeer, "required_packages", ("no_such_package_xyz",))  # as on a machine without it
    out = tmp_path / "peers"
    assert main(["--quiet", "peers", "--model", str(tiny_sd_dir), "--n", "2", "--calib-size", "2", "--steps", "2",
                 "--methods", "diffquant:int8-w,bnb:nf4", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads((out / "peers.json").read_text())["rows"]}
    assert list(rows) == ["diffquant:int8-w", "bnb:nf4"]
    assert rows["diffquant:int8-w"]["layers_quantized"] > 0 and 15 < rows["diffquant:int8-w"]["psnr_mean_db"] < 100
    assert rows["bnb:nf4"]["psnr_mean_db"] is None
    assert rows["bnb:nf4"]["notes"] == ["not run: no_such_package_xyz not installed (pip install -e '.[peers]')"]
    assert "`bnb:nf4`: not run" in (out / "peers.md").read_text()


def test_an_unknown_peer_method_is_one_line_before_any_work(tmp_path, capsys):
    from diffquant.cli.main import main

    assert main(["peers", "--model", "/no/such/model", "--methods", "modelopt:int9", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown method modelopt:int9: use one of" in err[0] and "gguf:q4_0" in err[0]


def test_q8_0_rows_put_diffquants_gguf_file_beside_the_gguf_packages(tiny_sd_dir, tmp_path):
    """`--bits 8`: diffquant's Q8_0 file (GPTQ codes) and the `gguf` package's (round to nearest), each loaded by
    diffusers' GGUF loader, in one table at the same 8.5 bits per weight."""
    pytest.importorskip("gguf", reason="the gguf package is not installed")
    from diffquant.peers.eight import main

    assert main(["--model", str(tiny_sd_dir), "--bits", "8", "--n", "2", "--steps", "2", "--calib-size", "2",
                 "--methods", "diffquant-gguf:q8_0,gguf:q8_0", "--out", str(tmp_path / "peers")]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "peers" / "peers.json").read_text())["rows"]}
    for method in ("diffquant-gguf:q8_0", "gguf:q8_0"):
        assert rows[method]["layers_quantized"] > 0 and rows[method]["bits_per_weight"] == pytest.approx(8.5)
        assert rows[method]["psnr_mean_db"] is not None
    assert rows["diffquant-gguf:q8_0"]["layers_quantized"] == rows["gguf:q8_0"]["layers_quantized"]
    assert "Q8_0" in " ".join(rows["diffquant-gguf:q8_0"]["notes"])


def test_cpu_8bit_peers_run_in_their_runtimes_on_the_same_calibration(tiny_sd_dir, tmp_path):
    """What a CPU user picks instead: NNCF's full and hybrid int8 in OpenVINO and ONNX Runtime's quantize_static,
    each on diffquant's fp32 export checked against torch's fp32 images, calibrated on diffquant's captured calls."""
    pytest.importorskip("nncf", reason="nncf is not installed")
    from diffquant.peers.eight import main

    methods = ["ort:static-int8", "nncf:int8", "nncf:int8-hybrid"]
    assert main(["--model", str(tiny_sd_dir), "--bits", "8", "--n", "2", "--steps", "2", "--calib-size", "2",
                 "--methods", ",".join(methods), "--out", str(tmp_path / "peers")]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "peers" / "peers.json").read_text())["rows"]}
    assert list(rows) == methods
    for method, row in rows.items():
        # every Linear and Conv2d of the tiny UNet (83) holds int8 codes: codes plus scales (and zero points)
        assert row["layers_quantized"] == 83 and 8.0 < row["bits_per_weight"] < 10.0, (method, row)
        assert row["psnr_worst_db"] <= row["psnr_mean_db"] < 100
        assert "fp32 vs torch fp32: pixel-identical" in row["notes"][0]  # the peer's float graph is checked first
        assert "2 calibration calls" in row["notes"][1]


def test_ort_static_quantizer_reads_a_graph_whose_tensors_are_in_files_of_their_own(tiny_sd, tmp_path):
    """torch's exporter writes a model over protobuf's 2 GB (SD 1.5's fp32 UNet) with one file per tensor: ORT's
    pre-processing must be told, or it fails on the first tensor (found on the sd15 bench)."""
    import numpy as np

    from diffquant.export.onnx import example_inputs, export_fp32_onnx
    from diffquant.runtimes import get_runtime
    from diffquant.runtimes.onnxruntime.static import int8_weight_storage, quantize_static_int8

    import onnx

    path = export_fp32_onnx(tiny_sd.unet, tmp_path / "fp32", sequence_length=8)
    # as torch's exporter lays out a graph over 2 GB: each tensor in a file of its own beside the graph
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert len(list(path.parent.iterdir())) > 10
    runner = get_runtime("onnxruntime").runner(path)
    inputs = example_inputs(tiny_sd.unet, 2, 8)
    quantized = quantize_static_int8(path, [runner.feed(inputs)], tmp_path / "q")
    layers, weights, stored = int8_weight_storage(quantized)
    assert layers > 0 and weights < stored < 2 * weights  # int8 codes plus per-channel scales and zero points
    assert not (tmp_path / "q" / "prepared").exists()  # the pre-processed copy is removed
    out = get_runtime("onnxruntime").runner(quantized).run(inputs)
    assert out.shape == runner.run(inputs).shape and np.isfinite(out).all()
