"""The layering of `src/diffquant/` is checked by import-linter's contracts in pyproject.toml: they hold on
the package, and an upward import breaks them."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("module, added, broken", [
    # an upward import: the bottom layer importing the workflow
    ("core/errors.py", "from diffquant.workflow import run", "diffquant.core is not allowed to import diffquant.workflow"),
    # Quark imported outside its backend
    ("passes/graph.py", "import quark.torch", "diffquant.passes is not allowed to import quark"),
    # a module reaching into the Quark backend instead of asking the registry
    ("bench/runner.py", "from diffquant.quantization.backends.quark import internals",
     "diffquant.bench is not allowed to import diffquant.quantization.backends.quark"),
])
def test_an_import_across_the_layering_breaks_a_contract(tmp_path, module, added, broken):
    root = _copy(tmp_path)
    path = root / "src" / "diffquant" / module
    path.write_text(path.read_text() + f"\n\ndef _added():\n    {added}  # noqa\n")
    result = _lint(root)
    assert result.returncode == 1
    assert broken in result.stdout
