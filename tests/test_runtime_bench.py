"""ONNX Runtime inside the pipeline, the fp32 export, large-model external data, and the bench command."""

import json

import numpy as np
import onnx
import pytest
import torch

from diffquant import export_onnx, generate
from diffquant.bench.runner import BENCH_VERSION
from diffquant.cli.main import main
from diffquant.core.errors import DiffquantError
from diffquant.export.onnx import export_fp32_onnx
from diffquant.evaluate.metrics import compare
from diffquant.runtimes.onnxruntime import ort_pipeline

pytestmark = pytest.mark.slow  # exports, full runs or benchmarks: `pytest -m 'not slow'` leaves them out

PROMPTS = ["a red circle on a blue background", "a small green square on the left on a white background"]


def test_pipeline_with_the_unet_in_onnx_runtime_reproduces_torch(tiny_sd, tiny_int8_w_export):
    quantized, exported = tiny_int8_w_export
    torch_images = generate(quantized, PROMPTS, seed=3, steps=2)
    ort_images = generate(ort_pipeline(tiny_sd, exported.path), PROMPTS, seed=3, steps=2)
    assert compare(torch_images, ort_images, PROMPTS).summary()["psnr_db"] > 35


def test_sdxl_pipeline_with_the_unet_in_onnx_runtime_feeds_the_added_conditioning(tiny_sdxl_int8_w_export):
    quantized, exported = tiny_sdxl_int8_w_export
    torch_images = generate(quantized, PROMPTS, seed=3, steps=2)
    ort = ort_pipeline(quantized, exported.path)
    calls = []
    ort.unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["added_cond_kwargs"]),
                                       with_kwargs=True)
    ort_images = generate(ort, PROMPTS, seed=3, steps=2)
    assert len(calls) == 2  # one ONNX Runtime call per step, both prompts and both guidance halves at once
    assert [tuple(calls[0][k].shape) for k in ("text_embeds", "time_ids")] == [(4, 32), (4, 6)]
    assert compare(torch_images, ort_images, PROMPTS).summary()["psnr_db"] > 35


def test_fp32_export_matches_torch_and_has_no_quantization(tiny_sd, tmp_path):
    from diffquant.export.onnx import example_inputs, run_onnx

    path = export_fp32_onnx(tiny_sd.unet, tmp_path / "fp32", sequence_length=16)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "DequantizeLinear" not in ops and "QuantizeLinear" not in ops
    inputs = example_inputs(tiny_sd.unet, batch_size=3, sequence_length=16)
    with torch.no_grad():
        reference = tiny_sd.unet(**inputs, return_dict=False)[0].numpy()
    assert np.abs(run_onnx(path, inputs) - reference).max() < 1e-4


def test_large_models_are_saved_with_external_data(tiny_int8_w, tmp_path, monkeypatch):
    import quark.torch.export.api as quark_export
    from collections import Counter

    from diffquant.export import onnx as export_module
    from diffquant.export.onnx import example_inputs, run_onnx

    in_memory = export_onnx(tiny_int8_w, tmp_path / "small")
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_ABOVE_BYTES", 0)  # treat the tiny UNet as > 2 GB
    passes = quark_export.export_onnx_model_optimization
    seen = {}

    def spy(path):  # what Quark's graph passes get: weights as graph inputs, no large initializer
        graph = onnx.load(str(path), load_external_data=False).graph
        seen["largest"] = max(t.ByteSize() for t in graph.initializer)
        seen["inputs"] = {i.name for i in graph.input}
        passes(path)

    monkeypatch.setattr(quark_export, "export_onnx_model_optimization", spy)
    result = export_onnx(tiny_int8_w, tmp_path / "big")
    files = sorted(p.name for p in (tmp_path / "big").iterdir())
    assert files == ["README.md", "unet.onnx", "unet.onnx.data"]  # the graph, its weights, its model card
    model = onnx.load(str(tmp_path / "big" / "unet.onnx"), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) >= 5
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"unet.onnx.data"}
    parked = seen["inputs"] - {i.name for i in model.graph.input}
    assert seen["largest"] <= 1024 and any(n.endswith("weight_int8") for n in parked)  # no weight above 1 KB
    assert [i.name for i in model.graph.input] == list(in_memory.inputs)  # and initializers again afterwards
    # the same graph and the same numbers as the export that held everything in memory
    assert Counter(n.op_type for n in model.graph.node) == Counter(in_memory.op_counts)
    assert result.compression == in_memory.compression and result.fused_ops == in_memory.fused_ops
    inputs = example_inputs(tiny_int8_w.unet, 2, in_memory.inputs["encoder_hidden_states"][1])
    assert np.array_equal(run_onnx(result.path, inputs), run_onnx(in_memory.path, inputs))


def test_bench_command_writes_its_table_json_and_chart(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'diffquant[openvino]')")
    from diffquant.core.cpu import decisions, kernel_class

    monkeypatch.setenv("DIFFQUANT_BENCH_BF16", "1")  # every row, on a CPU without bf16 too
    out = tmp_path / "bench"
    assert main(["--quiet", "bench", "--model", str(tiny_sd_dir), "--recipe", "int8-w", "--iterations", "2",
                 "--warmup", "1", "--images", "1", "--no-compile", "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["type"] == "BenchResult" and data["version"] == BENCH_VERSION
    names = [r["name"] for r in data["rows"]]
    assert names == ["torch fp32", "torch bf16", "torch fake-quant int8-w", "ORT fp32", "ORT int8-w (QDQ)",
                     "OpenVINO f32", "OpenVINO bf16", "OpenVINO int8-w (QDQ)",
                     "OpenVINO int8-w (QDQ, bf16 float parts)"]
    assert [(r["runtime"], r["precision"]) for r in data["rows"]] == [
        ("torch", "f32"), ("torch", "bf16"), ("torch", "f32"), ("onnxruntime", "f32"), ("onnxruntime", "int8"),
        ("openvino", "f32"), ("openvino", "bf16"), ("openvino", "int8"), ("openvino", "int8")]
    # Every real row ran in its own process: its peak memory is its own, not the bench process's.
    assert [r["memory"] for r in data["rows"]] == ["own process"] * 2 + ["shared"] + ["own process"] * 6
    assert data["rows"][6]["runtime_precision"] == ("bf16" if decisions().cpu.bf16 else "f32")  # as the CPU can
    assert data["rows"][8]["runtime_precision"] == data["rows"][6]["runtime_precision"]  # both asked for bf16
    assert data["bench_peak_rss_mb"] > 0  # the exporting process's own peak
    base = data["rows"][0]
    for row in data["rows"]:
        assert 0 < row["call_ms_median"] <= row["call_ms_p90"]  # the slow tail is never below the median
        assert row["artifact_mb"] > 0 and row["peak_rss_mb"] > 0 and row["image_s"] > 0
        # Ratios are against the torch fp32 row of the same run.
        assert row["speedup"] == pytest.approx(base["call_ms_median"] / row["call_ms_median"])
        assert row["size_ratio"] == pytest.approx(row["artifact_mb"] / base["artifact_mb"])
    assert [r["simulated"] for r in data["rows"]] == [False, False, True] + [False] * 6
    torch_fp32, _, fake_quant, ort_fp32, ort_int8, *_ = data["rows"]
    assert fake_quant["artifact_mb"] == torch_fp32["artifact_mb"]  # fake quantization keeps float weights
    # The int8 codes on disk (0.58x here: in a UNet this tiny the graph itself is a large share of the bytes).
    assert ort_int8["artifact_mb"] < 0.7 * ort_fp32["artifact_mb"]
    assert (out / "bench.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "(simulated)" in table
    # The ONNX Runtime rows and OpenVINO's int8 row were profiled: time per operator, and the kernels that ran.
    assert set(data["profiles"]) == set(data["optimized_ops"]) == {"ORT fp32", "ORT int8-w (QDQ)",
                                                                  "OpenVINO int8-w (QDQ)"}
    assert data["profiles"]["ORT fp32"]["Conv"] > 0 and "DequantizeLinear" not in data["optimized_ops"]["ORT fp32"]
    # self- and cross-attention of its 4 transformer blocks (down, mid, 2 up)
    assert data["optimized_ops"]["ORT fp32"]["MultiHeadAttention"] == 8
    assert any(k.endswith(" i8") for k in data["optimized_ops"]["OpenVINO int8-w (QDQ)"])
    for profile in data["profiles"].values():  # operators by time, the slowest first
        assert list(profile.values()) == sorted(profile.values(), reverse=True) and next(iter(profile.values())) > 0
    assert "profile ORT int8-w (QDQ): " in (out / "report.html").read_text()
    # The CPU it ran on, what diffquant chose from it, and the kernel class of each row.
    decided = decisions()
    assert data["cpu"] == decided.cpu.describe() and data["cpu_decisions"] == decided.to_dict()
    assert [r["kernels"] for r in data["rows"]] == [
        kernel_class(r["runtime"], r["precision"], r["runtime_precision"], decided) for r in data["rows"]]
    assert data["rows"][4]["kernels"].startswith("int8 u8")  # ORT's int8 row: u8u8 exact or u8s8
    assert data["measured"]["versions"]["onnxruntime"] and data["measured"]["date"]
    assert f"CPU: {decided.cpu.describe()}" in table and "kernels" in table
    assert main(["bench-table", str(out / "bench.json")]) == 0
    markdown = capsys.readouterr().out
    assert f"**{decided.cpu.describe()}**" in markdown and "| ORT int8-w (QDQ) | onnxruntime int8 | int8 u8" in markdown


def test_bench_leaves_out_bf16_rows_where_told_and_says_why(tiny_sd_dir, tmp_path, monkeypatch):
    """What happens by default on a CPU without bf16 instructions (DIFFQUANT_BENCH_BF16=auto), forced here."""
    monkeypatch.setenv("DIFFQUANT_BENCH_BF16", "0")
    out = tmp_path / "bench"
    assert main(["--quiet", "bench", "--model", str(tiny_sd_dir), "--recipe", "int8-w", "--iterations", "1",
                 "--warmup", "0", "--images", "1", "--no-compile", "--runtime", "torch", "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["torch fp32", "torch fake-quant int8-w"]
    assert any(n.startswith("bf16 rows not measured: forced by DIFFQUANT_BENCH_BF16=0") for n in data["notes"])


def test_bench_runtime_filter_runs_only_those_rows(tiny_sd, tmp_path, monkeypatch):
    from diffquant.models import architectures
    from diffquant.bench.runner import benchmark

    monkeypatch.setitem(architectures.ARCHITECTURES, "tiny",
                        architectures.Architecture("tiny", "UNet2DConditionModel", dict(tiny_sd.unet.config)))
    with pytest.raises(DiffquantError, match="unknown runtime\\(s\\) tensorrt: choose from torch, onnxruntime"):
        benchmark(arch="tiny", recipe="int8-w", runtimes="onnxruntime,tensorrt", out=tmp_path / "bad")
    with pytest.raises(DiffquantError, match="recipe listed twice"):  # the one parser of recipe lists
        benchmark(arch="tiny", recipe="int8-w,int8-w", out=tmp_path / "twice")
    # Two recipes side by side; a 4-bit recipe's row says what its graph runs: MatMulNBits, int4.
    result = benchmark(arch="tiny", recipe="int8-w,int4-w", iterations=1, warmup=0, out=tmp_path / "ort",
                       runtimes="onnxruntime", profile=False)
    assert [(r.name, r.runtime, r.precision) for r in result.rows] == [
        ("ORT fp32", "onnxruntime", "f32"), ("ORT int8-w (QDQ)", "onnxruntime", "int8"),
        ("ORT int4-w (MatMulNBits)", "onnxruntime", "int4")]
    fp32, int8, int4 = (r.artifact_mb for r in result.rows)
    assert int8 < fp32 and int4 < fp32


def test_a_row_whose_process_fails_is_a_note_and_the_others_still_count(tiny_sd, tmp_path, monkeypatch):
    from diffquant.models import architectures
    from diffquant.bench import runner as bench

    monkeypatch.setitem(architectures.ARCHITECTURES, "tiny",
                        architectures.Architecture("tiny", "UNet2DConditionModel", dict(tiny_sd.unet.config)))
    run_row = bench._run_in_own_process

    def failing_int8(spec, spec_path):
        if spec.precision == "int8":
            raise bench.RowFailed("bench row onnxruntime int8 failed: ...", "SomeError: the int8 graph broke")
        return run_row(spec, spec_path)

    monkeypatch.setattr(bench, "_run_in_own_process", failing_int8)
    result = bench.benchmark(arch="tiny", recipe="int8-w", iterations=1, warmup=0, out=tmp_path,
                             runtimes="onnxruntime")
    assert [r.name for r in result.rows] == ["ORT fp32"] and set(result.profiles) == {"ORT fp32"}
    assert "ORT int8-w (QDQ): not measured, its process failed: SomeError: the int8 graph broke" in result.notes
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["name"] == "ORT fp32"


def test_bench_on_an_architecture_built_from_its_config(tiny_sd, tmp_path, monkeypatch):
    """--arch builds a UNet from a config with random weights and calibrates W8A8 on random inputs."""
    from diffquant.models import architectures
    from diffquant.bench.runner import benchmark

    monkeypatch.setitem(architectures.ARCHITECTURES, "tiny",
                        architectures.Architecture("tiny", "UNet2DConditionModel", dict(tiny_sd.unet.config)))
    result = benchmark(arch="tiny", recipe="w8a8-int8", iterations=2, warmup=1, out=tmp_path,
                       fake_quant_compiled=False, runtimes="torch,onnxruntime")
    assert [r.name for r in result.rows][-1] == "ORT w8a8-int8 (QDQ)"
    assert result.rows[0].name == "torch fp32" and result.rows[0].memory == "own process"
    assert all(r.image_s is None for r in result.rows)  # no pipeline: UNet calls only
    assert result.latent == [4, 8, 8]
    assert (tmp_path / "onnx-fp32" / "unet.onnx").is_file()


def test_bench_takes_the_image_size_asked_for(tiny_sd, tiny_sd_dir, tmp_path, monkeypatch):
    """--height/--width: the denoiser inputs (and the calibration) stand for that image size; a size the model
    cannot make, or one side alone, is refused before any work."""
    from diffquant.models import architectures
    from diffquant.bench.runner import benchmark

    monkeypatch.setitem(architectures.ARCHITECTURES, "tiny",
                        architectures.Architecture("tiny", "UNet2DConditionModel", dict(tiny_sd.unet.config)))
    result = benchmark(arch="tiny", recipe="w8a8-int8", iterations=1, warmup=0, out=tmp_path / "a",
                       runtimes="onnxruntime", profile=False, height=128, width=64)
    assert result.latent == [4, 16, 8]  # an architecture's VAE downscales by 8
    with pytest.raises(DiffquantError, match="pass both --height and --width"):
        benchmark(arch="tiny", height=128, out=tmp_path / "b")
    with pytest.raises(DiffquantError, match="height 100: the tiny architecture takes multiples of 8 pixels"):
        benchmark(arch="tiny", height=100, width=64, out=tmp_path / "c")
    with pytest.raises(DiffquantError, match="width 36 cannot be generated .* multiples of 8 pixels"):
        benchmark(model=str(tiny_sd_dir), height=32, width=36, out=tmp_path / "d")


def test_timing_skips_the_warmup_and_p90_is_the_slow_tail():
    import time

    from diffquant.bench.runner import _p90, _time_calls

    # first call, one more warm-up call, then 5 timed calls of which the last is slow
    sleeps = iter([0.05, 0.05, 0.001, 0.001, 0.001, 0.001, 0.03])
    first, times = _time_calls(lambda: time.sleep(next(sleeps)), warmup=2, iterations=5)
    assert first >= 0.05 and len(times) == 5 and next(sleeps, None) is None
    assert sorted(times)[2] < 25 and _p90(times) == max(times) >= 30  # milliseconds
    assert _p90(list(range(1, 11))) == 9 and _p90([7.0]) == 7.0


def test_unknown_architecture_lists_the_known_ones():
    from diffquant.bench.runner import build_arch
    from diffquant.core.errors import DiffquantError

    with pytest.raises(DiffquantError, match="sd15"):
        build_arch("sd99")


def test_a_row_process_reports_its_own_peak_memory_not_its_parents(tiny_int8_w_export, tmp_path):
    """ru_maxrss survives fork and exec: a row started by a process that had peaked high must not report it."""
    from safetensors.torch import save_file

    from diffquant.bench.runner import _run_in_own_process
    from diffquant.bench.row import RowSpec, peak_rss_mb
    from diffquant.export.onnx import example_inputs

    quantized, exported = tiny_int8_w_export
    save_file(example_inputs(quantized.unet, 2, 16), str(tmp_path / "inputs.safetensors"))
    ballast = np.ones(400 * 2**20 // 8)  # 400 MB touched in this process
    spec = RowSpec("onnxruntime", "int8", str(tmp_path / "inputs.safetensors"), 1, 0, 1, str(exported.path))
    measured = _run_in_own_process(spec, tmp_path / "spec.json")
    assert peak_rss_mb() >= 400 + ballast[0]  # this process's peak counts its 400 MB
    assert 0 < measured["peak_rss_mb"] < peak_rss_mb() - 300


def test_bench_measures_the_cpu_peers_as_rows_of_their_runtimes(tiny_sd, tmp_path, monkeypatch):
    """--peers: NNCF's int8 (full and hybrid) in OpenVINO and ORT's quantize_static in ONNX Runtime, made from the
    bench's own fp32 export and calibration, each a row of its runtime with the kernels it ran counted."""
    pytest.importorskip("nncf", reason="nncf is not installed")
    from diffquant.bench.runner import benchmark
    from diffquant.models import architectures

    monkeypatch.setitem(architectures.ARCHITECTURES, "tiny",
                        architectures.Architecture("tiny", "UNet2DConditionModel", dict(tiny_sd.unet.config)))
    with pytest.raises(DiffquantError, match="unknown peer\\(s\\) tensorrt:int8: choose from nncf:int8"):
        benchmark(arch="tiny", recipe="int8-w", peers="tensorrt:int8", out=tmp_path / "bad")
    result = benchmark(arch="tiny", recipe="int8-w", iterations=1, warmup=0, out=tmp_path / "peers",
                       runtimes="onnxruntime,openvino", peers="nncf:int8,nncf:int8-hybrid,ort:static-int8")
    rows = {r.name: r for r in result.rows}
    for name in ("OpenVINO nncf:int8", "OpenVINO nncf:int8-hybrid", "ORT ort:static-int8"):
        # (sizes are measured, not compared: the tiny UNet's IR/graph text outweighs its 0.3 MB of weights)
        assert rows[name].precision == "int8" and rows[name].kernels.startswith("int8") and rows[name].artifact_mb > 0
    # the peers' graphs really run integer kernels, as their profiles say
    ort_ops = result.optimized_ops["ORT ort:static-int8"]
    assert any(op.startswith("QLinear") or op in ("MatMulIntegerToFloat", "ConvInteger") for op in ort_ops), ort_ops
    assert "OpenVINO nncf:int8" in result.profiles


def test_speed_fidelity_chart_puts_each_graph_at_its_bench_speed_and_peers_fidelity(tmp_path, capsys):
    """A bench row meets its method's fidelity through `method`; float and simulated rows carry none, and a
    quantized row whose method the peers file lacks is named, not plotted."""
    from PIL import Image

    from diffquant.cli.main import main
    from diffquant.report.speed_fidelity import points

    def row(name, runtime, ms, method=None, simulated=False):
        return {"name": name, "runtime": runtime, "call_ms_median": ms, "method": method, "simulated": simulated,
                "precision": "f32" if method is None else "int8"}

    bench = {"type": "BenchResult", "version": 4, "model": "shapes-sd", "batch": 2, "iterations": 10, "threads": 2,
             "rows": [row("ORT fp32", "onnxruntime", 26.0), row("torch fake-quant w8a8-int8", "torch", 90.0,
                                                                   "diffquant:w8a8-int8", simulated=True),
                      row("ORT w8a8-int8 (QDQ)", "onnxruntime", 20.0, "diffquant:w8a8-int8"),
                      row("OpenVINO nncf:int8", "openvino", 16.0, "nncf:int8"),
                      row("ORT ort:static-int8", "onnxruntime", 19.0, "ort:static-int8")]}
    peers = {"captions": 200, "rows": [{"method": "diffquant:w8a8-int8", "psnr_mean_db": 54.7, "psnr_p10_db": 50.1},
                                       {"method": "nncf:int8", "psnr_mean_db": 40.2, "psnr_p10_db": 35.0}]}
    found, missing = points(bench, peers)
    assert [(p.label, p.call_ms, p.psnr_db) for p in found] == [("ORT w8a8-int8 (QDQ)", 20.0, 54.7),
                                                                 ("OpenVINO nncf:int8", 16.0, 40.2)]
    assert missing == ["ORT ort:static-int8"]
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    (tmp_path / "peers.json").write_text(json.dumps(peers))
    assert main(["speed-fidelity", str(tmp_path / "bench.json"), str(tmp_path / "peers.json"),
                 "--out", str(tmp_path / "chart.png")]) == 0
    assert "2 graphs; not in the peers file: ORT ort:static-int8" in capsys.readouterr().out
    assert Image.open(tmp_path / "chart.png").size[0] > 500
