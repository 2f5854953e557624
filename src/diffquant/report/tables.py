"""Tables as Markdown, the one renderer of every Markdown table diffquant writes (bench-table, peers.md)."""

from __future__ import annotations

from diffquant.core.provenance import describe


def markdown(headers: list[str], rows: list[list]) -> str:
    """A Markdown table: a header row, its rule, one line per row (cells already formatted as text)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# Operators that mean "ONNX Runtime runs this layer on an integer kernel" in a graph's optimized form.
INTEGER_KERNELS = ("MatMulIntegerToFloat", "QGemm", "QLinearConv", "QLinearMatMul", "MatMulNBits")


def _db(quality: dict | None) -> str:
    """'47.39 / 40.41 / 24.01 dB': mean / 10th percentile / worst image."""
    if not quality or quality.get("psnr_db") is None:
        return "-"
    parts = [quality["psnr_db"], quality.get("psnr_p10_db"), quality.get("psnr_worst_db")]
    return " / ".join("-" if v is None else f"{v:.2f}" for v in parts) + " dB"


def _kernels(fused: dict | None) -> str:
    found = [f"{fused[op]} `{op}`" for op in INTEGER_KERNELS if (fused or {}).get(op)]
    return " + ".join(found) or "float"


def run_markdown(data: dict) -> str:
    """The recipes of a `diffquant run` results.json as a Markdown table (fidelity against the fp32 images,
    sizes, and what ONNX Runtime ran), headed by the model, n, seed rule and where it was measured."""
    versions = dict(data.get("versions") or {})
    provenance = {"date": versions.pop("date", None) or "(date not recorded)", "cpu": versions.pop("cpu", None),
                  "versions": {k: v for k, v in versions.items() if k != "ort exact int8"}}
    settings = data.get("settings") or {}
    n = len(data.get("baseline_images") or [])
    head = ["recipe", "PSNR vs fp32 (mean / p10 / worst)", "SSIM", "denoiser SQNR", "bits/w", "ONNX MB",
            "ORT vs torch (rel. L2)", "ORT images vs torch", "kernels ORT runs", "all named", "agree with fp32"]
    baseline = data.get("baseline_shapeeval") or {}
    rows = [["fp32", "-", "-", "-", "32", "-", "-", "-", "-",
             f"{baseline['overall']:.1%}" if "overall" in baseline else "-", "-"]]
    for name, r in (data.get("recipes") or {}).items():
        if r is None:
            continue
        quality, onnx, ort = r.get("quality") or {}, r.get("onnx") or {}, r.get("ort") or {}
        shape = quality.get("shapeeval") or {}
        agree = (quality.get("shapeeval_agreement") or {}).get("all")
        vs_torch = (ort.get("vs_torch") or {}).get("psnr_db")
        bits = (r.get("layers") or {}).get("bits_per_weight")
        rows.append([name, _db(quality), f"{quality['ssim']:.4f}" if quality.get("ssim") is not None else "-",
                     f"{r['sqnr_db']:.1f} dB" if r.get("sqnr_db") is not None else "-",
                     f"{bits:.2f}" if bits is not None else "-",
                     f"{onnx['size_bytes'] / 1e6:.1f}" if onnx.get("size_bytes") else "-",
                     f"{onnx['relative_error']:.1e}" if onnx.get("relative_error") is not None else "-",
                     "-" if vs_torch is None else ("100 dB (identical)" if vs_torch >= 100 else f"{vs_torch:.1f} dB"),
                     _kernels(onnx.get("fused_ops")) if onnx else "-",
                     f"{shape['overall']:.1%}" if "overall" in shape else "-", "-" if agree is None else f"{agree:.1%}"])
    caption = (f"{data.get('model')}, {n} images (seed {settings.get('seed', '?')} + image index), "
               f"{settings.get('steps', '?')} steps, guidance {settings.get('guidance', '?')}; "
               f"{describe(provenance)}")
    return caption + "\n\n" + markdown(head, rows)
