"""Where and when a measurement was made: the date (UTC), the CPU (`diffquant.core.cpu`) and the versions of
what ran it. Every JSON file a measuring command writes (bench.json, peers.json, results.json) carries it, and
every table rendered from such a file names it."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from importlib import metadata

PACKAGES = ("diffquant", "torch", "diffusers", "transformers", "amd-quark", "onnx", "onnxruntime", "openvino",
            "torchmetrics")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """name -> installed version of each of `packages` that is installed, after Python's own."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def measured(packages: tuple[str, ...] = PACKAGES) -> dict:
    """{"date": "YYYY-MM-DD", "cpu": "AMD EPYC (AVX2, ...)", "versions": {...}} for a result written now."""
    from diffquant.core.cpu import cpu_features

    return {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "cpu": cpu_features().describe(),
            "versions": package_versions(packages)}


def describe(provenance: dict | None) -> str:
    """One line for a table's caption: 'measured 2026-12-07 on **AMD EPYC (...)**; torch 2.13.0, ...'."""
    if not provenance:
        return "provenance not recorded"
    versions = ", ".join(f"{k} {v}" for k, v in provenance.get("versions", {}).items())
    return (f"measured {provenance.get('date', '(date not recorded)')} on **{provenance.get('cpu', '(CPU not recorded)')}**"
            + (f"; {versions}" if versions else ""))
