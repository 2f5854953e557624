"""The one place diffquant decides anything from the CPU it runs on, each decision overridable.

What the CPU has (`CpuFeatures`, read once) and what diffquant chose from it (`CpuDecisions`):

| decision | environment variable | values | auto |
|---|---|---|---|
| ONNX Runtime computes int8 products exactly (u8 x u8) | DIFFQUANT_ORT_EXACT_INT8 | auto, 1, 0 | 1 without VNNI/AMX |
| how ONNX Runtime multiplies int4 Linears (`--int4-compute`) | DIFFQUANT_INT4_COMPUTE | float, int8, auto | auto: int8 with VNNI/AMX |
| OpenVINO's float precision (`--runtime openvino`) | DIFFQUANT_OPENVINO_PRECISION | f32, bf16 | f32 |
| the bench measures bf16 rows | DIFFQUANT_BENCH_BF16 | auto, 1, 0 | 1 with native bf16 |

Unset, DIFFQUANT_INT4_COMPUTE is "float" and DIFFQUANT_OPENVINO_PRECISION "f32": the exact choices on
every CPU (int8 compute rounds each Linear's input; OpenVINO would otherwise run "f32" models in bf16 on
AMX/AVX512-BF16 CPUs). The others are auto. An override is read each time a decision is taken, so a
child process (the bench's rows) inherits it; `forced(...)` sets them for a block of code (tests).
`diffquant env` prints all of it.

Why /proc/cpuinfo: neither torch, ONNX Runtime nor OpenVINO exposes the VNNI/AMX flags publicly, and
py-cpuinfo reads the same file on Linux (elsewhere it executes raw CPUID bytes). Where the flags cannot be
read, nothing is assumed: the choices that are safe on any CPU are taken.
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from diffquant.core.errors import DiffquantError

CPU_DECISIONS_VERSION = 1
# /proc/cpuinfo flag names of the features that change a decision or a kernel label.
_VNNI = {"avx512_vnni", "avx_vnni"}
_AMX_INT8, _AMX_BF16 = "amx_int8", "amx_bf16"
_BF16 = {"avx512_bf16", _AMX_BF16}
_FP16 = {"avx512_fp16", "amx_fp16"}


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's model name and the instruction-set flags that matter to diffquant's kernels."""

    model: str
    flags: frozenset[str] = field(default_factory=frozenset)
    known: bool = True  # False where the flags could not be read

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def vnni(self) -> bool:
        return bool(self.flags & _VNNI)

    @property
    def amx(self) -> bool:
        return _AMX_INT8 in self.flags

    @property
    def bf16(self) -> bool:
        """Native bf16 arithmetic (AVX512-BF16 or AMX-BF16); without it torch emulates bf16 in fp32."""
        return bool(self.flags & _BF16)

    @property
    def fp16(self) -> bool:
        """Native fp16 arithmetic (AVX512-FP16 or AMX-FP16); F16C only converts."""
        return bool(self.flags & _FP16)

    @property
    def exact_u8s8(self) -> bool:
        """u8 x s8 products without int16 saturation: VNNI or AMX (AVX2's vpmaddubsw saturates)."""
        return self.vnni or self.amx

    def summary(self) -> dict[str, bool]:
        return {"AVX2": self.avx2, "AVX-512": self.avx512, "VNNI": self.vnni, "AMX": self.amx,
                "bf16": self.bf16, "fp16": self.fp16}

    def describe(self) -> str:
        """One line: the model and its flags, e.g. 'AMD EPYC (AVX2, AVX-512, VNNI, bf16)'."""
        if not self.known:
            return f"{self.model} (instruction-set flags unknown)"
        have = [name for name, present in self.summary().items() if present]
        return f"{self.model} ({', '.join(have) or 'none of AVX2, AVX-512, VNNI, AMX, bf16, fp16'})"

    def to_dict(self) -> dict:
        return {"model": self.model, "known": self.known, **self.summary()}


def read_cpu_features(cpuinfo: str | None = None) -> CpuFeatures:
    """Parse /proc/cpuinfo (or `cpuinfo`, its text) into `CpuFeatures`; unknown flags where it is absent."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return CpuFeatures(platform.processor() or platform.machine() or "unknown CPU", frozenset(), known=False)
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return CpuFeatures(model or platform.machine() or "unknown CPU", frozenset(flags), known=bool(flags))


@lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """This machine's CPU, read once."""
    return read_cpu_features()


@dataclass(frozen=True)
class Decision:
    """One choice: its value, and why (the CPU feature it followed, or the variable that forced it)."""

    value: str
    reason: str


# Decision name -> (environment variable, allowed values). "auto" defers to the CPU.
OVERRIDES = {
    "ort_exact_int8": ("DIFFQUANT_ORT_EXACT_INT8", ("auto", "1", "0")),
    "int4_compute": ("DIFFQUANT_INT4_COMPUTE", ("float", "int8", "auto")),
    "openvino_precision": ("DIFFQUANT_OPENVINO_PRECISION", ("f32", "bf16")),
    "bench_bf16": ("DIFFQUANT_BENCH_BF16", ("auto", "1", "0")),
}
_UNSET = {"ort_exact_int8": "auto", "int4_compute": "float", "openvino_precision": "f32", "bench_bf16": "auto"}


def _is_set(name: str, env) -> bool:
    return bool(env.get(OVERRIDES[name][0], "").strip())


def _setting(name: str, env) -> str:
    variable, allowed = OVERRIDES[name]
    value = env.get(variable, "").strip().lower() or _UNSET[name]
    if value not in allowed:
        raise DiffquantError(f"{variable}={env[variable]!r} is not one of {', '.join(allowed)}: set one of them or "
                             "unset it (see `diffquant env`)")
    return value


@dataclass(frozen=True)
class CpuDecisions:
    """What diffquant chose from `cpu` (and the environment's overrides); see the module docstring."""

    cpu: CpuFeatures
    ort_exact_int8: Decision
    int4_compute: Decision
    openvino_precision: Decision
    bench_bf16: Decision
    version: int = CPU_DECISIONS_VERSION

    @property
    def exact_int8(self) -> bool:
        return self.ort_exact_int8.value == "1"

    @property
    def measure_bf16(self) -> bool:
        return self.bench_bf16.value == "1"

    def items(self) -> list[tuple[str, Decision]]:
        return [(name, getattr(self, name)) for name in OVERRIDES]

    def to_dict(self) -> dict:
        return {"type": "CpuDecisions", "version": self.version, "cpu": self.cpu.to_dict(),
                **{name: {"value": d.value, "reason": d.reason} for name, d in self.items()}}


def decide(cpu: CpuFeatures | None = None, env=None) -> CpuDecisions:
    """Take every CPU-dependent decision for `cpu` (default: this machine's) under `env` (default:
    os.environ). Pure: tests call it with any CPU to run every branch."""
    cpu = cpu or cpu_features()
    env = os.environ if env is None else env

    def forced(name: str, value: str) -> Decision:
        return Decision(value, f"forced by {OVERRIDES[name][0]}={value}")

    exact = _setting("ort_exact_int8", env)
    if exact != "auto":
        ort_exact = forced("ort_exact_int8", exact)
    elif cpu.exact_u8s8:
        ort_exact = Decision("0", "VNNI/AMX: ONNX Runtime's u8 x s8 kernels are exact and faster")
    else:
        ort_exact = Decision("1", ("no VNNI/AMX: u8 x s8 products would saturate in int16 (vpmaddubsw), so the "
                                   "exact u8 x u8 kernels run") if cpu.known else
                             "CPU flags unknown: the exact u8 x u8 kernels run")

    int4 = _setting("int4_compute", env)
    if int4 != "auto":
        int4_decision = (forced("int4_compute", int4) if _is_set("int4_compute", env) else
                         Decision(int4, "default: dequantize and multiply in float, exact to torch"))
    elif cpu.exact_u8s8:
        int4_decision = Decision("int8", f"auto, {'AMX' if cpu.amx else 'VNNI'}: integer dot products "
                                         "(faster than fp32 from group 128)")
    else:
        int4_decision = Decision("float", "auto, no VNNI/AMX: int8 compute measured slower than float")

    precision = _setting("openvino_precision", env)
    native = "AMX-BF16" if _AMX_BF16 in cpu.flags else "AVX512-BF16"
    if _is_set("openvino_precision", env):
        ov = forced("openvino_precision", precision)
    elif cpu.bf16:
        ov = Decision("f32", f"default, forced with INFERENCE_PRECISION_HINT (OpenVINO would run 'f32' models "
                             f"in bf16 on this CPU's {native})")
    else:
        ov = Decision("f32", "default (this CPU has no bf16 instructions: OpenVINO runs f32 anyway)")

    bf16 = _setting("bench_bf16", env)
    if bf16 != "auto":
        bench = forced("bench_bf16", bf16)
    elif cpu.bf16:
        bench = Decision("1", f"native bf16 ({native})")
    else:
        bench = Decision("0", "no native bf16: torch would emulate it in fp32 and OpenVINO would run f32")
    return CpuDecisions(cpu, ort_exact, int4_decision, ov, bench)


def decisions() -> CpuDecisions:
    """This machine's decisions under the current environment."""
    return decide()


@contextlib.contextmanager
def forced(**choices: str):
    """Force decisions for the block (`forced(ort_exact_int8="1")`), through their environment variables
    so that child processes follow them too; restores the previous environment afterwards."""
    saved = {}
    for name, value in choices.items():
        if name not in OVERRIDES:
            raise DiffquantError(f"unknown CPU decision {name!r}: use one of {', '.join(OVERRIDES)}")
        variable = OVERRIDES[name][0]
        saved[variable] = os.environ.get(variable)
        os.environ[variable] = str(value)
    try:
        decisions()  # a bad value fails here, in one line
        yield
    finally:
        for variable, value in saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value


def kernel_class(runtime: str, weights: str, float_precision: str, decided: CpuDecisions | None = None,
                 int4_compute: str = "float") -> str:
    """What kind of kernel a bench row ran on this CPU, for its label.

    Args:
        runtime: "torch", "onnxruntime" or "openvino".
        weights: the graph's weights, "int8", "int4" or a float precision ("f32", "bf16").
        float_precision: what ran in float ("f32" or "bf16"; OpenVINO's runtime_precision).
        decided: the decisions of the row's process (default: this one's).
        int4_compute: how ONNX Runtime multiplied int4 Linears ("float" or "int8").
    """
    decided = decided or decisions()
    cpu = decided.cpu
    isa = "AMX" if cpu.amx else "VNNI" if cpu.vnni else "AVX2" if cpu.avx2 else "no VNNI"
    if float_precision == "bf16":
        floats = f"bf16 ({'AMX' if _AMX_BF16 in cpu.flags else 'AVX512-BF16'})" if cpu.bf16 else "bf16 emulated"
    else:
        floats = "float32"
    if weights == "int8":
        if runtime == "onnxruntime":
            return "int8 u8u8 exact" if decided.exact_int8 else (
                f"int8 u8s8 {isa}" + ("" if cpu.exact_u8s8 else " (saturating)"))
        return f"int8 {isa} + {floats}"
    if weights == "int4":
        if runtime == "onnxruntime":
            return f"int4 x int8 {isa}" if int4_compute == "int8" else "int4 -> float32"
        return f"int4 -> {floats}"
    return floats


def resolve_int4_compute(choice: str | None) -> str:
    """"float" or "int8" for an export's `int4_compute`: None takes `decisions()` (DIFFQUANT_INT4_COMPUTE,
    else float), "auto" decides from the CPU (int8 with VNNI/AMX), "float"/"int8" are kept."""
    if choice is None:
        return decisions().int4_compute.value
    if choice == "auto":
        return decide(env={**os.environ, OVERRIDES["int4_compute"][0]: "auto"}).int4_compute.value
    return choice
