"""Speed beside fidelity in one picture: for one model, each quantized graph's milliseconds per denoiser call
(`diffquant bench`, ONNX Runtime and OpenVINO rows, diffquant's and the peers') against the PSNR of its method's
images against the fp32 images (`diffquant peers`: the mean, with a whisker down to the 10th percentile). A
bench row meets its fidelity through its `method` ("diffquant:w8a8-int8-ort-sq", "nncf:int8"); rows whose method
the peers file did not measure are left out, and the caption says which."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffquant.core.artifacts import atomic_path
from diffquant.core.provenance import describe


@dataclass(frozen=True)
class Point:
    label: str  # the bench row: runtime and configuration
    method: str
    runtime: str
    call_ms: float
    psnr_db: float
    psnr_p10_db: float | None


def points(bench: dict, peers: dict) -> tuple[list[Point], list[str]]:
    """The (speed, fidelity) points of the bench rows whose method the peers file measured, and the labels of
    the quantized rows left out (their method was not measured)."""
    fidelity = {r["method"]: r for r in peers["rows"] if r.get("psnr_mean_db") is not None}
    found, missing = [], []
    for row in bench["rows"]:
        method = row.get("method")
        if method is None or row.get("simulated"):
            continue
        if method not in fidelity:
            missing.append(row["name"])
            continue
        measured = fidelity[method]
        found.append(Point(row["name"], method, row["runtime"], row["call_ms_median"], measured["psnr_mean_db"],
                           measured.get("psnr_p10_db")))
    return found, missing


def chart(bench: dict, peers: dict, path: str | Path) -> Path:
    """Write the picture (PNG) for one model's bench.json and peers.json; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found, missing = points(bench, peers)
    fig, ax = plt.subplots(figsize=(15, 5.5))
    colors = {"onnxruntime": "#1f77b4", "openvino": "#d62728"}
    # Points are numbered by speed and named in a key beside the axes: graphs of one recipe often share a PSNR
    # (the same method in two runtimes), and their names would overlap on the plot.
    key = []
    for number, point in enumerate(sorted(found, key=lambda p: p.call_ms), start=1):
        ours = point.method.startswith("diffquant")
        color = colors.get(point.runtime, "#555")
        low = 0.0 if point.psnr_p10_db is None else max(point.psnr_db - point.psnr_p10_db, 0.0)
        ax.errorbar(point.call_ms, point.psnr_db, yerr=[[low], [0.0]], fmt="o" if ours else "s", capsize=3,
                    color=color, markerfacecolor=color if ours else "white")
        ax.annotate(str(number), (point.call_ms, point.psnr_db), textcoords="offset points",
                    xytext=(4, 4 if number % 2 else -10), fontsize=7, color=color)
        key.append(f"{number}  {point.label}: {point.call_ms:.1f} ms, {point.psnr_db:.2f} dB")
    fig.text(0.64, 0.92, "\n".join(key), fontsize=7, va="top", family="monospace")
    for row in bench["rows"]:  # the float rows: where the speed starts (their images are the reference)
        if row.get("method") is None and row["runtime"] in colors and row.get("precision") == "f32":
            ax.axvline(row["call_ms_median"], color=colors[row["runtime"]], linestyle=":", linewidth=1)
            ax.annotate(row["name"], (row["call_ms_median"], ax.get_ylim()[0]), fontsize=7, rotation=90,
                        xytext=(2, 4), textcoords="offset points", color=colors[row["runtime"]])
    ax.set_xlabel(f"ms per denoiser call (median of {bench.get('iterations', '?')}, batch {bench.get('batch', '?')}); "
                  "lower is faster")
    ax.set_ylabel(f"PSNR vs fp32 images, dB (mean; whisker to p10; {peers.get('captions', '?')} captions)")
    ax.set_title(f"{bench.get('model')}: speed and fidelity (filled: diffquant; open: peers; "
                 "blue ONNX Runtime, red OpenVINO)", fontsize=9)
    ax.grid(True, alpha=0.3)
    caption = (f"speed: {describe(bench.get('measured')).replace('**', '')}, {bench.get('threads', '?')} threads\n"
               f"fidelity: {describe(peers.get('measured')).replace('**', '')}")
    if missing:
        caption += f"\nnot on the chart (method not in the peers file): {', '.join(missing)}"
    fig.text(0.01, 0.01, caption, fontsize=6, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.1 + 0.02 * bool(missing), 0.63, 1))
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
