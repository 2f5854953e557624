"""The documentation site builds with mkdocs in strict mode: a dead link or anchor in docs/ fails the suite."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MKDOCS = Path(sys.executable).with_name("mkdocs")


def _build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([str(MKDOCS), "build", "--strict", "--config-file", str(root / "mkdocs.yml"),
                           "--site-dir", str(site)], cwd=root, env=env, capture_output=True, text=True)


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", root / "docs")
    shutil.copy(ROOT / "mkdocs.yml", root / "mkdocs.yml")
    return root


def test_the_docs_site_builds_in_strict_mode(tmp_path):
    result = _build(_copy(tmp_path), tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    for page in ("index", "guide", "quantization", "speed", "cpu", "models"):
        assert (tmp_path / "site" / ("" if page == "index" else page) / "index.html").is_file()


def test_a_dead_link_fails_the_build(tmp_path):
    root = _copy(tmp_path)
    guide = root / "docs" / "guide.md"
    guide.write_text(guide.read_text() + "\nSee [the missing page](missing.md) and [a missing part](speed.md#nowhere).\n")
    result = _build(root, tmp_path / "site")
    assert result.returncode != 0
    assert "missing.md" in result.stderr


def test_the_docs_tables_are_what_their_json_files_render():
    from diffquant.cli.docs_tables import sync

    assert sync(ROOT / "docs", check=True) == [], "run `diffquant docs-tables docs` after changing a result file"


def test_a_changed_result_file_makes_its_table_stale_and_the_command_rewrites_it(tmp_path):
    import json

    from diffquant.cli.main import main

    root = _copy(tmp_path)
    source = root / "docs" / "results" / "peers-shapes-sd3-8bit.json"
    data = json.loads(source.read_text())
    data["rows"][0]["psnr_mean_db"] = 12.3456
    source.write_text(json.dumps(data))
    docs = str(root / "docs")
    assert main(["docs-tables", docs, "--check"]) == 1
    assert "12.35 dB" not in (root / "docs" / "quantization.md").read_text()
    assert main(["docs-tables", docs]) == 0
    assert "12.35 dB" in (root / "docs" / "quantization.md").read_text()
    assert main(["docs-tables", docs, "--check"]) == 0
