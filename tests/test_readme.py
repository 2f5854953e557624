"""The README's two commands are what CI runs: `.ci/run` performs command 1's install steps and then
command 2 verbatim, and command 1 installs what command 2 needs."""

import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The non-comment lines of the README's first ```bash block (as the lead's pre-stop hook reads them)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("```bash") + 1
    end = lines.index("```", start)
    return [line.strip() for line in lines[start:end] if line.strip() and not line.strip().startswith("#")]


def ci_lines() -> list[str]:
    return [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]


def _is_install(step: str) -> bool:
    words = shlex.split(step)
    return "venv" in words or ("pip" in Path(words[0]).name and "install" in words)


def test_readme_has_two_commands_install_and_run_then_test():
    commands = readme_commands()
    assert len(commands) == 2, commands
    assert commands[0].split(" && ")[-1] == ".venv/bin/diffquant run"
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim_and_last():
    test_command = readme_commands()[1]
    steps = [line for line in ci_lines() if line and not line.startswith("#")]
    assert test_command in steps
    assert steps[-1] == test_command  # nothing after it can change what the tests saw


def test_ci_install_steps_are_the_readme_install_steps():
    readme_steps = [shlex.split(step) for step in readme_commands()[0].split(" && ") if _is_install(step)]
    ci_steps = [shlex.split(line) for line in ci_lines()
                if line and not line.startswith("#") and ".venv" in line and _is_install(line)]
    assert readme_steps and ci_steps == readme_steps


def test_readme_install_brings_the_test_runner():
    """Command 2 runs right after command 1: the extra that command 1 installs declares pytest."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = [word for step in readme_commands()[0].split(" && ") if _is_install(step)
                 for word in shlex.split(step)]
    editable = installed[installed.index("-e") + 1]
    assert editable.startswith(".[") and editable.endswith("]"), f"command 1 installs {editable!r}, no extra"
    requested = editable[2:-1].split(",")
    assert any(req.startswith("pytest") for extra in requested for req in extras.get(extra, []))


def test_readme_is_a_front_page_whose_links_resolve():
    """At most 250 lines; every relative link names a file of the repository (the docs site build checks
    the links inside docs/)."""
    import re

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    links = [target.split("#")[0] for target in re.findall(r"\]\(([^)#][^)]*)\)", text)
             if not target.startswith(("http://", "https://"))]
    assert links and all((ROOT / link).exists() for link in links), [l for l in links if not (ROOT / l).exists()]
