"""The checks the pre-commit hooks run, run here too, so CI (which reaches PyPI but not GitHub) runs them.

``.pre-commit-config.yaml`` is the one list: its global ``exclude`` is honoured, and its pinned tool versions must
equal the ``test`` extra's pins (a newer formatter would reformat the tree). ruff itself runs in test_lint.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
EXCLUDE = re.compile(CONFIG.get("exclude", "^$"))
MAX_KB = 2048  # check-added-large-files --maxkb


def console_script(name: str) -> str | None:
    """A console script of the interpreter's environment (an unactivated venv too), else one on PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


def _tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the hooks check the files git tracks")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60).stdout
    names = [n for n in out.decode().split("\0") if n and not EXCLUDE.search(n)]
    return [REPO / n for n in names if (REPO / n).is_file() and not (REPO / n).is_symlink()]


def _text_files() -> dict[str, str]:
    """Tracked files that decode as UTF-8 and hold no NUL byte (what pre-commit's ``types: [text]`` selects)."""
    texts = {}
    for path in _tracked_files():
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            texts[path.relative_to(REPO).as_posix()] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def _hook_pins() -> dict[str, str]:
    pins = {}
    for repo in CONFIG["repos"]:
        for hook in repo["hooks"]:
            for dep in hook.get("additional_dependencies", []):
                name, _, version = dep.partition("==")
                pins[name] = version
    return pins


def test_hooks_need_no_github():
    """Every hook is a local one installed from PyPI: CI cannot clone GitHub repositories."""
    assert [r["repo"] for r in CONFIG["repos"]] == ["local"] * len(CONFIG["repos"])
    assert all(h["language"] == "python" and h.get("additional_dependencies") for h in CONFIG["repos"][0]["hooks"])


def test_hook_versions_match_the_test_extra():
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    test_pins = dict(d.split("==") for d in extra if "==" in d)
    hook_pins = _hook_pins()
    for tool in ("ruff", "pyproject-fmt"):
        assert hook_pins.get(tool) == test_pins.get(tool), f"pin {tool} to one version in both files"


def test_end_of_file():
    """end-of-file-fixer: a non-empty text file ends with exactly one newline."""
    bad = [n for n, t in _text_files().items() if t and (not t.endswith("\n") or t.endswith("\n\n") or t == "\n")]
    assert not bad, f"files not ending in exactly one newline (run `pre-commit run end-of-file-fixer -a`): {bad}"


def test_trailing_whitespace():
    """trailing-whitespace: no line ends in spaces or tabs."""
    bad = [
        f"{n}:{i}"
        for n, t in _text_files().items()
        for i, line in enumerate(t.splitlines(), 1)
        if line != line.rstrip()
    ]
    assert not bad, f"trailing whitespace (run `pre-commit run trailing-whitespace -a`): {bad[:20]}"


def test_yaml_parses():
    names = [n for n in _text_files() if n.endswith((".yaml", ".yml"))]
    assert ".pre-commit-config.yaml" in names
    for name in names:
        list(yaml.safe_load_all((REPO / name).read_text()))


def test_no_large_files():
    big = [p.relative_to(REPO).as_posix() for p in _tracked_files() if p.stat().st_size > MAX_KB * 1024]
    assert not big, f"tracked files over {MAX_KB} KB: {big}"


def test_pyproject_fmt():
    exe = console_script("pyproject-fmt")
    if exe is None:
        pytest.skip("pyproject-fmt is not installed; install the test extra: pip install -e '.[test]'")
    proc = subprocess.run([exe, "--check", "pyproject.toml"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, "run `pyproject-fmt pyproject.toml`:\n" + proc.stdout[-3000:] + proc.stderr[-2000:]
