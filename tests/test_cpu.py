"""diffquant.core.cpu: every decision taken from the CPU, for every kind of CPU (AVX2-only, VNNI, AMX, unknown),
whatever CPU runs the tests; each override; `diffquant env` printing what was detected and chosen."""

import os

import pytest

from diffquant.core.cpu import (CpuFeatures, decide, decisions, forced, kernel_class, read_cpu_features,
                           resolve_int4_compute)
from diffquant.core.errors import DiffquantError

# The CPUs the project's machines and its users have: flags as /proc/cpuinfo spells them.
AVX2_EPYC = CpuFeatures("AMD EPYC 7B12", frozenset({"avx", "avx2", "fma", "f16c"}))
ZEN4_EPYC = CpuFeatures("AMD EPYC 9B14", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "f16c"}))
AMX_XEON = CpuFeatures("Intel Xeon Platinum 8481C", frozenset(
    {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16", "amx_tile"}))
UNKNOWN = CpuFeatures("arm64", frozenset(), known=False)


def test_cpuinfo_text_is_read_into_model_and_flags():
    text = ("processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu avx avx2 fma\n\n"
            "processor\t: 1\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu avx avx2 fma\n")
    cpu = read_cpu_features(text)
    assert cpu.model == "AMD EPYC 7B12" and cpu.avx2 and not (cpu.vnni or cpu.amx or cpu.bf16 or cpu.avx512)
    assert cpu.describe() == "AMD EPYC 7B12 (AVX2)"
    assert not read_cpu_features("processor : 0\n").known


@pytest.mark.parametrize("cpu, exact, int4_auto, bench_bf16", [
    (AVX2_EPYC, "1", "float", "0"),  # AVX2 saturates u8 x s8: exact kernels; no bf16 rows
    (ZEN4_EPYC, "0", "int8", "1"),
    (AMX_XEON, "0", "int8", "1"),
    (UNKNOWN, "1", "float", "0"),   # nothing assumed
])
def test_each_cpu_gets_its_own_decisions(cpu, exact, int4_auto, bench_bf16):
    decided = decide(cpu, env={})
    assert decided.ort_exact_int8.value == exact and decided.exact_int8 == (exact == "1")
    assert decided.bench_bf16.value == bench_bf16
    assert decided.int4_compute.value == "float"  # unset: the exact choice on every CPU
    assert decided.openvino_precision.value == "f32"  # unset: forced f32, on AMX too
    assert decide(cpu, env={"DIFFQUANT_INT4_COMPUTE": "auto"}).int4_compute.value == int4_auto
    assert decided.to_dict()["cpu"]["model"] == cpu.model


def test_openvino_f32_says_why_it_is_forced_on_a_bf16_cpu():
    assert "would run 'f32' models in bf16" in decide(AMX_XEON, env={}).openvino_precision.reason
    assert "no bf16" in decide(AVX2_EPYC, env={}).openvino_precision.reason


@pytest.mark.parametrize("cpu", [AVX2_EPYC, AMX_XEON])
def test_every_decision_can_be_forced_either_way_on_any_cpu(cpu):
    env = {"DIFFQUANT_ORT_EXACT_INT8": "0", "DIFFQUANT_INT4_COMPUTE": "int8",
           "DIFFQUANT_OPENVINO_PRECISION": "bf16", "DIFFQUANT_BENCH_BF16": "1"}
    decided = decide(cpu, env=env)
    assert [d.value for _, d in decided.items()] == ["0", "int8", "bf16", "1"]
    assert all(d.reason.startswith("forced by DIFFQUANT_") for _, d in decided.items())
    env = {"DIFFQUANT_ORT_EXACT_INT8": "1", "DIFFQUANT_INT4_COMPUTE": "float",
           "DIFFQUANT_OPENVINO_PRECISION": "f32", "DIFFQUANT_BENCH_BF16": "0"}
    assert [d.value for _, d in decide(cpu, env=env).items()] == ["1", "float", "f32", "0"]


def test_a_bad_override_is_one_line_naming_the_variable_and_the_values():
    with pytest.raises(DiffquantError, match=r"DIFFQUANT_ORT_EXACT_INT8='yes' is not one of auto, 1, 0"):
        decide(AVX2_EPYC, env={"DIFFQUANT_ORT_EXACT_INT8": "yes"})
    with pytest.raises(DiffquantError, match="unknown CPU decision 'exact'"):
        with forced(exact="1"):
            pass


def test_forced_sets_the_variables_for_child_processes_and_restores_them(monkeypatch):
    monkeypatch.delenv("DIFFQUANT_ORT_EXACT_INT8", raising=False)
    monkeypatch.setenv("DIFFQUANT_BENCH_BF16", "0")
    with forced(ort_exact_int8="1", bench_bf16="1"):
        assert os.environ["DIFFQUANT_ORT_EXACT_INT8"] == "1" and decisions().exact_int8
        assert decisions().measure_bf16
    assert "DIFFQUANT_ORT_EXACT_INT8" not in os.environ and os.environ["DIFFQUANT_BENCH_BF16"] == "0"


def test_int4_compute_resolves_through_the_decisions(monkeypatch):
    monkeypatch.delenv("DIFFQUANT_INT4_COMPUTE", raising=False)
    assert resolve_int4_compute(None) == "float" and resolve_int4_compute("int8") == "int8"
    assert resolve_int4_compute("auto") == decide(env={"DIFFQUANT_INT4_COMPUTE": "auto"}).int4_compute.value
    monkeypatch.setenv("DIFFQUANT_INT4_COMPUTE", "int8")
    assert resolve_int4_compute(None) == "int8"


def test_onnx_runtime_sessions_follow_the_exact_int8_decision():
    from diffquant.runtimes.onnxruntime.session import EXACT_INT8_PRODUCTS, session_options

    with forced(ort_exact_int8="1"):
        assert session_options().get_session_config_entry(EXACT_INT8_PRODUCTS) == "1"
    with forced(ort_exact_int8="0"), pytest.raises(RuntimeError):  # ONNX Runtime: a key never set
        session_options().get_session_config_entry(EXACT_INT8_PRODUCTS)


@pytest.mark.parametrize("cpu, exact, label", [
    (AVX2_EPYC, "1", "int8 u8u8 exact"), (AVX2_EPYC, "0", "int8 u8s8 AVX2 (saturating)"),
    (ZEN4_EPYC, "0", "int8 u8s8 VNNI"), (AMX_XEON, "0", "int8 u8s8 AMX"), (AMX_XEON, "1", "int8 u8u8 exact"),
])
def test_the_bench_labels_the_int8_kernels_that_ran(cpu, exact, label):
    decided = decide(cpu, env={"DIFFQUANT_ORT_EXACT_INT8": exact})
    assert kernel_class("onnxruntime", "int8", "f32", decided) == label


def test_the_bench_labels_float_bf16_and_int4_kernels():
    avx2, amx = decide(AVX2_EPYC, env={}), decide(AMX_XEON, env={})
    assert kernel_class("torch", "f32", "f32", avx2) == "float32"
    assert kernel_class("torch", "bf16", "bf16", avx2) == "bf16 emulated"
    assert kernel_class("openvino", "bf16", "bf16", amx) == "bf16 (AMX)"
    assert kernel_class("openvino", "int8", "bf16", amx) == "int8 AMX + bf16 (AMX)"
    assert kernel_class("onnxruntime", "int4", "f32", amx, "int8") == "int4 x int8 AMX"
    assert kernel_class("onnxruntime", "int4", "f32", avx2, "float") == "int4 -> float32"


def test_env_command_prints_the_cpu_and_every_decision(capsys, monkeypatch):
    from diffquant.cli.main import main

    monkeypatch.setenv("DIFFQUANT_ORT_EXACT_INT8", "1")
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"CPU            {decisions().cpu.describe()}" in out
    for variable in ("DIFFQUANT_ORT_EXACT_INT8", "DIFFQUANT_INT4_COMPUTE", "DIFFQUANT_OPENVINO_PRECISION",
                     "DIFFQUANT_BENCH_BF16"):
        assert variable in out
    assert "forced by DIFFQUANT_ORT_EXACT_INT8=1" in out
