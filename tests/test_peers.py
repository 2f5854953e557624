"""The peer comparison (python -m diffquant.peers) runs ModelOpt and optimum-quanto on the same captions,
calibration captions and fp32 images as diffquant, and writes one table (needs the `[peers]` extra)."""

import json

import pytest


def test_peers_compare_on_identical_fp32_images(tiny_sd_dir, tmp_path):
    pytest.importorskip("modelopt.torch.quantization", reason="the [peers] extra (nvidia-modelopt) is not installed")
    pytest.importorskip("optimum.quanto", reason="the [peers] extra (optimum-quanto) is not installed")
    from diffquant.peers import main

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
