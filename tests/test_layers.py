"""The layering of `src/diffquant/` is checked by import-linter's contracts in pyproject.toml: they hold on
the package, and an upward import breaks them."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(root / "src"), "PATH": str(LINT.parent)}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True)


def _copy(tmp_path: Path) -> Path:
    """The package and its contracts, without the embedded weights (grimp reads only the sources)."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "src" / "diffquant", tmp_path / "src" / "diffquant",
                    ignore=shutil.ignore_patterns("weights*", "__pycache__"))
    return tmp_path


def test_the_package_keeps_its_contracts(tmp_path):
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    root = _copy(tmp_path)
    errors = root / "src" / "diffquant" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _upward():\n    from diffquant.workflow import run  # noqa\n")
    result = _lint(root)
    assert result.returncode == 1
    assert "diffquant.core is not allowed to import diffquant.workflow" in result.stdout


def test_quark_outside_its_backend_breaks_a_contract(tmp_path):
    root = _copy(tmp_path)
    graph = root / "src" / "diffquant" / "passes" / "graph.py"
    graph.write_text(graph.read_text() + "\n\ndef _quark():\n    import quark.torch  # noqa\n")
    result = _lint(root)
    assert result.returncode == 1
    assert "diffquant.passes is not allowed to import quark" in result.stdout


def test_reaching_into_the_quark_backend_breaks_a_contract(tmp_path):
    root = _copy(tmp_path)
    bench = root / "src" / "diffquant" / "bench" / "runner.py"
    bench.write_text(bench.read_text() + "\n\ndef _leak():\n    from diffquant.quantization.backends.quark import internals  # noqa\n")
    result = _lint(root)
    assert result.returncode == 1
    assert "diffquant.bench is not allowed to import diffquant.quantization.backends.quark" in result.stdout
