"""Write ``benchmarks/results/MANIFEST.md``: every result file (script, command, commits, section) and every script.

For each file in ``benchmarks/results/`` the manifest gives the script that wrote it, the command stored in the
file (or in its ``.json`` companion) spelled as it runs today (``python -m benchmarks.<kind>.<script>``, data
paths as ``../shared`` / ``../cache``), the commit of the code it measured (the file's ``git`` field, when it has
one), the commit that last changed the file, whether every flag of the command still exists (from the script's
``--help``), and the ``RESULTS.md`` section that quotes it. Run from the repository root, in a git checkout::

    python -m benchmarks.make_manifest
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fnmatch
import io
import json
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

from benchmarks._common import REPO, RESULTS

MANIFEST = RESULTS / "MANIFEST.md"
#: result files whose JSON stores no command: the command that wrote them (see RESULTS.md)
KNOWN = {
    "scale_200k_fit.json": "python -m benchmarks.speed.bench_scale --worker fit --data <200k h5ad> --out <json>",
    "scale_200k_predict.json": "python -m benchmarks.speed.bench_scale --worker predict --data <200k h5ad> --out <json>",
    "subpixel_centres.json": "python -m benchmarks.accuracy.bench_subpixel_centres",
    "synthetic_signal.json": "python -m benchmarks.checks.check_synthetic_signal --embed",
}
#: machine paths in stored commands and what stands for them today
_PATHS = [
    (re.compile(r"(?<!\.)/\w+/(?:bench_)?cache/(?:\w+/)*"), "../cache/"),  # an absolute cache folder (and sub-folders)
    (re.compile(r"(?<!\.)/\w+/shared/"), "../shared/"),
    (re.compile(r"/tmp/\S+"), "<file>"),
]


def scripts() -> dict[str, str]:
    """Script file stem -> module name, for every script with a command line."""
    return {
        p.stem: ".".join(p.relative_to(REPO).with_suffix("").parts)
        for p in sorted((REPO / "benchmarks").glob("*/*.py"))
        if not p.name.startswith("_")
    }


def stored_command(path: Path) -> tuple[str, str]:
    """``(command, git)`` stored in a result file or in its ``.json`` companion (``""`` when absent)."""
    source = path if path.suffix == ".json" else path.with_suffix(".json")
    if path.name in KNOWN or not source.exists():
        return KNOWN.get(path.name, ""), ""
    data = json.loads(source.read_text())
    rows = [data] if isinstance(data, dict) else [r for r in data if isinstance(r, dict)]
    for row in [*rows, *(v for r in rows for v in r.values() if isinstance(v, dict))]:
        if "command" in row:
            return str(row["command"]), str(row.get("git", "")).split(" ")[0]
    return "", ""


def today(command: str, modules: dict[str, str]) -> str:
    """The stored command as it is spelled today (module path, no machine paths)."""
    match = re.search(r"(?:python )?(?:-m )?benchmarks[/.](?:(?:accuracy|speed|checks)[/.])?(\w+)(?:\.py)?", command)
    if match is None or match.group(1) not in modules:
        return command
    command = command.replace(match.group(0), f"python -m {modules[match.group(1)]}", 1)
    command = command.replace("prototype of ", "").split(" (")[0]
    for pattern, repl in _PATHS:
        command = pattern.sub(repl, command)
    command = re.sub(r"\[((?:'[^']*'(?:, )?)+)\]", lambda m: m.group(1).replace("'", "").replace(",", ""), command)
    return command.strip()


def flags_of(modules: list[str]) -> dict[str, set[str]]:
    """The options of each script: those its ``--help`` lists and those it declares (hidden ones included)."""
    warnings.simplefilter("ignore")
    flags = {}
    for name in modules:
        out = io.StringIO()
        sys.argv = [name, "--help"]
        with contextlib.suppress(SystemExit), contextlib.redirect_stdout(out):
            runpy.run_module(name, run_name="__main__", alter_sys=True)
        source = (REPO / Path(*name.split("."))).with_suffix(".py").read_text()
        declared = re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source)
        flags[name] = set(re.findall(r"(?<![\w-])--[\w-]+", out.getvalue())) | set(declared)
    return flags


def last_commit(path: Path) -> str:
    """The commit that last changed ``path``."""
    res = subprocess.run(["git", "log", "-1", "--format=%h", "--", str(path)], cwd=REPO, capture_output=True, text=True)
    return res.stdout.strip() or "-"


def section_of(name: str, results_md: str) -> str:
    """The ``RESULTS.md`` heading above the first mention of ``name`` (or of a pattern such as ``lookahead_*.json``
    that matches it); a ``.csv`` or ``.png`` falls back to its ``.json`` companion."""
    candidates = [name] + ([str(Path(name).with_suffix(".json"))] if not name.endswith(".json") else [])
    for candidate in candidates:
        heading = "-"
        for line in results_md.splitlines():
            if line.startswith("#"):
                heading = line.lstrip("#").strip().split(" (")[0]
                continue
            for token in re.findall(r"[\w*.-]+\.(?:json|csv|png)", line):
                if fnmatch.fnmatch(candidate, token.split("/")[-1]):
                    return heading
    return "-"


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    modules = scripts()
    results_md = (REPO / "benchmarks" / "RESULTS.md").read_text()
    rows = []
    for path in sorted(RESULTS.iterdir()):
        if path.name == MANIFEST.name:
            continue
        command, git = stored_command(path)
        rows.append([path, today(command, modules), git])
    used = sorted({m.group(1) for _, c, _ in rows if (m := re.search(r"-m (benchmarks\.\w+\.\w+)", c))})
    flags = flags_of(used)
    lines = [
        "# Result files",
        "",
        "Written by `python -m benchmarks.make_manifest`; do not edit by hand. *measured at*: the commit of the code",
        "the file records (its `git` field; `-` when it records none). *committed in*: the commit that last changed",
        "the file. *flags exist*: whether every option of the command is still in the script's `--help` (a renamed",
        "or removed option means the command no longer reproduces the file as written).",
        "",
        "| result file | command | measured at | committed in | flags exist | RESULTS.md section |",
        "|---|---|---|---|---|---|",
    ]
    for path, command, git in rows:
        module = re.search(r"-m (benchmarks\.\w+\.\w+)", command)
        missing = (
            sorted(set(re.findall(r"(?<![\w-])--[\w-]+", command)) - flags.get(module.group(1), set()))
            if module
            else []
        )
        ok = "yes" if module and not missing else ("no: " + " ".join(missing) if missing else "no command")
        lines.append(
            f"| `{path.name}` | `{command}` | {git or '-'} | `{last_commit(path)}` | {ok} | "
            f"{section_of(path.name, results_md)} |"
        )
    lines += [
        "",
        "## Scripts",
        "",
        "Run from the repository root: `python -m <module> --help`.",
        "",
        "| module | what it does |",
        "|---|---|",
    ]
    for module in modules.values():
        doc = ast.get_docstring(ast.parse((REPO / Path(*module.split("."))).with_suffix(".py").read_text())) or ""
        lines.append(f"| `{module}` | {' '.join(doc.split(chr(10) + chr(10))[0].split())} |")
    MANIFEST.write_text("\n".join(lines) + "\n")
    print(f"wrote {MANIFEST} ({len(rows)} result files)", file=sys.__stdout__)


if __name__ == "__main__":
    main()
