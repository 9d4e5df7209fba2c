"""The house rules of docs/architecture.md, checked on the source: dependencies point down, no borrowed privates."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "agl_scverse"
SUBPACKAGES = ("io", "pp", "encoders", "train", "model", "tl", "pl", "datasets")
#: sub-package -> sub-packages it must not import
FORBIDDEN = {
    # the engine: encoders and train side by side on the helpers, model (the saved model, the networks) on both
    "encoders": {"io", "pp", "train", "model", "tl", "pl", "datasets"},
    "train": {"io", "pp", "encoders", "model", "tl", "pl", "datasets"},
    "model": {"io", "pp", "tl", "pl", "datasets"},
    "io": {"pp", "encoders", "train", "model", "tl", "pl", "datasets"},
    "pp": {"tl", "pl", "datasets"},
    "tl": {"pl"},
    "pl": {"io", "pp", "encoders", "train", "model", "tl", "datasets"},
    "": {"io", "pp", "encoders", "train", "model", "tl", "pl", "datasets"},  # the private helpers at the top
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """(imported module, names, lineno) for every import in a file, relative ones resolved."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "agl_scverse":
        return None
    if len(parts) == 1:
        return "root"
    return parts[1] if parts[1] in SUBPACKAGES else ""


SOURCES = sorted(p for p in PKG.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_dependencies_point_down(path):
    here = _layer(_module_name(path))
    if here in ("root", None) or path.name == "cli.py":
        return  # the package's __init__ and the CLI sit on top
    for target, names, line in _imports(path):
        there = _layer(target)
        if there == "root":  # `from .. import _constants as consts` and the like
            subs = {n for n in names if n in SUBPACKAGES}
            assert not subs & FORBIDDEN.get(here, set()), f"{path.name}:{line} imports {subs}"
            continue
        assert there not in FORBIDDEN.get(here, set()), f"{path.name}:{line}: {here or 'helper'} imports {target}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_imports_another_modules_underscore_names(path):
    for target, names, line in _imports(path):
        if not target.startswith("agl_scverse"):
            continue
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        # a private *module* (agl_scverse._constants, .encoders._factory) is fine; a private *name* is not
        private = [
            n
            for n in private
            if not (PKG / Path(*target.split(".")[1:], n)).with_suffix(".py").exists()
            and not (PKG / Path(*target.split(".")[1:], n)).is_dir()
        ]
        assert not private, f"{path.relative_to(PKG)}:{line} imports {private} from {target}"


def test_no_placeholder_strings_for_missing_values():
    """The null convention: nothing writes "None" / "unknown" placeholders (see agl_scverse._serialize)."""
    for path in SOURCES:
        text = path.read_text()
        for bad in ('"None"', "'None'", '"unknown"'):
            assert bad not in text or path.name == "_serialize.py", f"{path}: {bad}"  # it reads 0.1 files


def test_no_function_is_a_room_of_its_own():
    """No function body (docstring excluded) over ~120 lines (issue: a 396-line agl_fit)."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                if not body:
                    continue
                n = body[-1].end_lineno - body[0].lineno + 1
                assert n <= 125, f"{path.relative_to(PKG)}:{node.lineno} {node.name} has {n} lines"


def test_the_engine_has_one_public_face():
    """``agl_scverse.model`` hands on every public name of the floors below it, the very same objects."""
    import agl_scverse.encoders
    import agl_scverse.model
    import agl_scverse.train

    for floor in (agl_scverse.encoders, agl_scverse.train):
        missing = sorted(set(floor.__all__) - set(agl_scverse.model.__all__))
        assert not missing, f"{floor.__name__} names {missing} that agl_scverse.model does not hand on"
        for name in floor.__all__:
            assert getattr(agl_scverse.model, name) is getattr(floor, name), name
