"""The benchmark scripts run on a clean checkout: each answers ``--help``, none edits ``sys.path`` or names a path
of one machine, and every result file is listed in the manifest with a script that exists."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SCRIPTS = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts)
    for p in [*BENCH.glob("*.py"), *BENCH.glob("*/*.py")]
    if not p.name.startswith("_")  # private modules (_common, _scale_images) have no command line
)

# One process runs every script's ``--help`` as ``python -m`` would (imports shared, so it stays quick).
_DRIVER = """
import contextlib, io, json, runpy, sys, warnings
warnings.simplefilter("ignore")
result = {}
for name in sys.argv[1:]:
    out, code, error = io.StringIO(), None, ""
    sys.argv = [name, "--help"]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(name, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    except Exception as exc:
        error = repr(exc)
    result[name] = {"code": code, "stdout": out.getvalue(), "error": error}
sys.stdout = sys.__stdout__
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def helps() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    env.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, *SCRIPTS], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_scripts_are_found():
    assert len(SCRIPTS) >= 20, SCRIPTS
    for kind in ("accuracy", "speed", "checks"):
        assert any(s.startswith(f"benchmarks.{kind}.") for s in SCRIPTS), kind


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_answers_help(helps, script):
    """``python -m benchmarks.<kind>.<script> --help`` prints a usage and exits 0 without data or weights."""
    res = helps[script]
    assert not res["error"], f"{script} --help raised {res['error']}"
    assert res["code"] == 0, f"{script} --help exited with {res['code']!r}"
    assert res["stdout"].startswith("usage:"), res["stdout"][:300]


@pytest.mark.parametrize("path", sorted(BENCH.rglob("*.py")), ids=lambda p: str(p.relative_to(BENCH)))
def test_no_sys_path_edits_or_machine_paths(path):
    """Shared code is imported as ``benchmarks.*`` (run from the repository root), and data paths come from
    ``benchmarks/_common.py`` (``AGL_SHARED`` / ``AGL_CACHE``), not from one machine's folders."""
    text = path.read_text()
    assert "sys.path" not in text, f"{path.name} edits sys.path; import shared code as benchmarks._common"
    machine = re.findall(r"""["'`(\s](/(?:work|home|Users|mnt|scratch)/[\w./-]*)""", text)
    assert not machine, f"{path.name} names machine paths {machine}; use benchmarks._common (AGL_SHARED, AGL_CACHE)"


def _manifest_rows() -> list[dict]:
    text = (BENCH / "results" / "MANIFEST.md").read_text()
    lines = text.split("## Scripts")[0].splitlines()
    table = [ln for ln in lines if ln.startswith("| `")]
    header = next(ln for ln in lines if ln.startswith("| result file"))
    keys = [h.strip() for h in header.strip("|").split("|")]
    return [dict(zip(keys, (c.strip() for c in ln.strip("|").split("|")), strict=True)) for ln in table]


def test_manifest_lists_every_result_file_with_an_existing_script():
    rows = _manifest_rows()
    listed = {row["result file"].strip("`") for row in rows}
    stored = {p.name for p in (BENCH / "results").iterdir() if p.name != "MANIFEST.md"}
    assert stored == listed, f"not in the manifest: {stored - listed}; listed but absent: {listed - stored}"
    for row in rows:
        module = re.search(r"python -m (benchmarks\.\w+\.\w+)", row["command"])
        assert module and module.group(1) in SCRIPTS, row
        assert re.fullmatch(r"`[0-9a-f]{7}`", row["committed in"]), row
    scripts_table = (BENCH / "results" / "MANIFEST.md").read_text().split("## Scripts")[1]
    listed_scripts = set(re.findall(r"^\| `(benchmarks\.\w+\.\w+)`", scripts_table, flags=re.M))
    assert listed_scripts == {s for s in SCRIPTS if s.count(".") == 2}


_QUOTED = re.compile(r"`[^`]*?(?:python\s+-m\s+benchmarks\.\w+\.(\w+)|benchmarks/\w+/(\w+)\.py)([^`]*)`", re.S)


def _declared_flags(script: str, helps: dict) -> set[str]:
    """The options a script declares (in its source, hidden ones included) and lists in ``--help``."""
    source = (REPO / Path(*script.split("."))).with_suffix(".py").read_text()
    return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source)) | set(
        re.findall(r"(?<![\w-])--[\w-]+", helps[script]["stdout"])
    )


def test_quoted_benchmark_commands_name_existing_scripts_and_flags(helps):
    """Every benchmark command quoted in the README, docs/ and RESULTS.md runs as written: its script exists and
    every ``--flag`` it passes is one the script declares (a renamed flag fails here)."""
    by_stem = {s.rsplit(".", 1)[1]: s for s in SCRIPTS}
    private = {p.stem for p in BENCH.glob("*/_*.py")}
    pages = [REPO / "README.md", BENCH / "RESULTS.md", *sorted((REPO / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        text = page.read_text()
        for match in _QUOTED.finditer(text):
            stem = match.group(1) or match.group(2)
            where = f"{page.name}:{text[: match.start()].count(chr(10)) + 1}"
            if stem in private:
                continue
            assert stem in by_stem, f"{where} quotes {stem}, which is not a script under benchmarks/"
            used = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", match.group(3)))
            missing = used - _declared_flags(by_stem[stem], helps)
            assert not missing, f"{where}: {stem} has no option {sorted(missing)}"
            checked += 1
    assert checked >= 30, checked


def test_every_results_table_names_its_commit_and_whether_it_reproduces():
    """Each section of RESULTS.md with a table starts with the commit it was measured at and its status today."""
    section, marked = "", False
    for line in (BENCH / "RESULTS.md").read_text().splitlines():
        if line.startswith("#"):
            section, marked = line, False
        elif line.startswith("> **Measured at**") or line.startswith("> **Written at**"):
            marked = True
        elif line.startswith("|---"):
            assert marked, f"the table under {section!r} has no '> **Measured at** <commit> ...' line"
