"""Benchmarks, tutorials and the docs' code call the package with today's spelling, not the deprecated keywords.

``agl_fit(adata, epochs=5)`` still works for one release, with a FutureWarning naming the new spelling
(``training=agl.TrainingConfig(epochs=5)``). The scripts and pages a newcomer copies from must not teach it. The
deprecated names come from the package: :data:`~agl_scverse._legacy_keywords.LEGACY_KEYWORDS` (the flat keywords of
``agl_fit`` and the configs they moved to), ``TRAIN_NETWORK_KEYWORDS`` (``train_network``'s of 0.2.0) and the
keywords each ``encoder_keywords``-wrapped function still accepts (``embed_patches(patch_px=...)``,
``agl_predict(weights=...)``).
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

import agl_scverse as agl
from agl_scverse._legacy_keywords import LEGACY_KEYWORDS, TRAIN_NETWORK_KEYWORDS, TRAIN_NETWORK_RENAMED

REPO = Path(__file__).resolve().parents[1]

#: Functions whose extra keywords go to ``agl_fit`` (``compare_methods(adata, epochs=5)``).
FORWARD_TO_FIT = ("compare_methods",)
#: Arguments holding ``agl_fit`` keywords in a dict: ``fit_kwargs={"epochs": 5}``, ``method_kwargs={"agl": {...}}``.
FIT_DICTS = {"fit_kwargs": 1, "method_kwargs": 2}  # how deep the agl_fit keywords sit


def _public_functions() -> dict[str, Callable]:
    funcs = {}
    for mod in (agl.pp, agl.tl, agl.model):
        for name in getattr(mod, "__all__", dir(mod)):
            obj = getattr(mod, name, None)
            if inspect.isfunction(obj):
                funcs[name] = obj
    return funcs


def _config_class(param: str) -> str:
    return next(cls.__name__ for p, cls in LEGACY_KEYWORDS.values() if p == param)


def _takes_config(params: Mapping[str, inspect.Parameter], param: str) -> bool:
    """Whether ``param`` is a parameter typed as its config (``spatial_context``'s ``encoder: Any`` is not)."""
    return param in params and _config_class(param) in str(params[param].annotation)


def _wrapped_names(func: Callable) -> tuple[str, ...]:
    """The old keywords an ``encoder_keywords`` wrapper still accepts (its ``names``)."""
    if not hasattr(func, "__wrapped__"):
        return ()
    names = inspect.getclosurevars(func).nonlocals.get("names", ())
    return tuple(names) if isinstance(names, tuple) else ()


def deprecated_keywords() -> dict[str, dict[str, str]]:
    """For each public function: ``{old keyword: its new spelling}``."""
    fit_names = {n: f"{p}=agl.{_config_class(p)}({n}=...)" for n, (p, _) in LEGACY_KEYWORDS.items()}
    out: dict[str, dict[str, str]] = {}
    for name, func in _public_functions().items():
        params = inspect.signature(inspect.unwrap(func)).parameters
        old: dict[str, str] = {}
        if name == "agl_fit" or name in FORWARD_TO_FIT:
            old.update(fit_names)
        # an explicit keyword beside the config it moved to (cross_validate's n_targets= beside genes=GeneConfig)
        old.update({n: s for n, s in fit_names.items() if n in params and _takes_config(params, LEGACY_KEYWORDS[n][0])})
        old.update({n: f"encoder=agl.EncoderConfig({n}=...)" for n in _wrapped_names(func)})
        if name == "train_network":  # its 0.2.0 keywords, deprecated
            old.update(
                {
                    n: f"{p}=agl.{_config_class(p)}({TRAIN_NETWORK_RENAMED.get(n, n)}=...)"
                    for n, (p, _) in TRAIN_NETWORK_KEYWORDS.items()
                }
            )
        if old:
            out[name] = old
    return out


DEPRECATED = deprecated_keywords()
#: Functions whose ``encoder=`` takes a config; a bare name there is the old spelling.
ENCODER_NAME_DEPRECATED = {"agl_fit", *FORWARD_TO_FIT}


def _callee(node: ast.Call) -> str | None:
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name == "partial" and node.args:  # functools.partial(agl.tl.agl_fit, epochs=5)
        first = node.args[0]
        return first.attr if isinstance(first, ast.Attribute) else first.id if isinstance(first, ast.Name) else None
    return name


def _is_name(node: ast.expr) -> bool:
    """An encoder given by name: a string, or ``args.encoder`` / ``args["encoder"]`` (a config is never called so)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return str(node.slice.value).endswith("encoder")
    return isinstance(node, ast.Attribute) and node.attr.endswith("encoder")


Scope = dict[str, list[ast.expr]]  # a name -> the values assigned to it in a function (or the module)


def _dict_keys(node: ast.expr, scope: Scope, seen: frozenset[str] = frozenset()) -> list[tuple[str, ast.expr]]:
    """The string keys of a ``{...}`` / ``dict(...)`` literal, with their values; names assigned one are followed."""
    if isinstance(node, ast.Dict):
        out = []
        for k, v in zip(node.keys, node.values):
            if k is None:  # {**other, ...}
                out += _dict_keys(v, scope, seen)
            elif isinstance(k, ast.Constant) and isinstance(k.value, str):
                out.append((k.value, v))
        return out
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return [(kw.arg, kw.value) for kw in node.keywords if kw.arg] + [
            pair for kw in node.keywords if kw.arg is None for pair in _dict_keys(kw.value, scope, seen)
        ]
    if isinstance(node, ast.IfExp):
        return _dict_keys(node.body, scope, seen) + _dict_keys(node.orelse, scope, seen)
    if isinstance(node, ast.Name) and node.id not in seen:
        return [pair for value in scope.get(node.id, []) for pair in _dict_keys(value, scope, seen | {node.id})]
    return []


def _keywords(node: ast.Call, scope: Scope) -> Iterator[tuple[str, ast.expr]]:
    """The keywords of a call, those of ``**{...}`` / ``**dict(...)`` / ``**kw`` (``kw = {...}``) included."""
    for kw in node.keywords:
        if kw.arg is None:
            yield from _dict_keys(kw.value, scope)
        else:
            yield kw.arg, kw.value


def _fit_dict_keys(value: ast.expr, depth: int, scope: Scope) -> list[str]:
    keys = _dict_keys(value, scope)
    if depth == 1:
        return [k for k, _ in keys]
    return [k for _, v in keys for k in _fit_dict_keys(v, depth - 1, scope)]


def _scoped_calls(tree: ast.AST, outer: Scope | None = None) -> Iterator[tuple[ast.Call, Scope]]:
    """Every call with the assignments of its function (and, behind them, of the enclosing ones)."""
    own: Scope = {}
    for node in _own_nodes(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    own.setdefault(target.id, []).append(node.value)
    scope = {**(outer or {}), **own}
    for node in _own_nodes(tree):
        if isinstance(node, ast.Call):
            yield node, scope
        elif node is not tree and _defines_scope(node):
            yield from _scoped_calls(node, scope)


def _defines_scope(node: ast.AST) -> bool:
    return isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)


def _own_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """The nodes of ``tree``, with nested functions themselves but not their insides."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if node is tree or not _defines_scope(node):
            todo.extend(ast.iter_child_nodes(node))


def find_old_spellings(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, message)`` for every call of the package that uses a deprecated keyword."""
    hits = []
    for node, scope in _scoped_calls(tree):
        func = _callee(node)
        old = DEPRECATED.get(func or "", {})
        for arg, value in _keywords(node, scope):
            if arg in old:
                hits.append((node.lineno, f"{func}({arg}=...): use {old[arg]}"))
            elif arg == "encoder" and func in ENCODER_NAME_DEPRECATED and _is_name(value):
                hits.append((node.lineno, f"{func}(encoder=<a name>): use encoder=agl.EncoderConfig(<the name>)"))
            elif arg in FIT_DICTS and func in DEPRECATED:
                for key in _fit_dict_keys(value, FIT_DICTS[arg], scope):
                    if key in DEPRECATED["agl_fit"]:
                        hits.append((node.lineno, f"{func}({arg}={{{key!r}: ...}}): use {DEPRECATED['agl_fit'][key]}"))
    return sorted(set(hits))


FENCE = re.compile(r"^```(?:python|py|ipython3?|{code-cell}[^\n]*)\s*\n(.*?)^```", re.M | re.S)


def _markdown_blocks(text: str) -> Iterator[tuple[int, str]]:
    """The python code blocks of a Markdown page: (line of the block's first line, code without prompts)."""
    for m in FENCE.finditer(text):
        first = text.count("\n", 0, m.start(1)) + 1
        lines = m.group(1).splitlines()
        if any(line.lstrip().startswith(">>>") for line in lines):
            lines = [
                re.sub(r"^(\s*)(>>> |\.\.\. |>>>$|\.\.\.$)", "", ln) if ln.lstrip()[:3] in (">>>", "...") else ""
                for ln in lines
            ]
        yield first, textwrap.dedent("\n".join(lines))


def _embedded_code(text: str) -> Iterator[tuple[int, str]]:
    """Python held in a script's multi-line strings (a subprocess's script): (line offset, code)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "\n" in node.value and "(" in node.value:
            code = textwrap.dedent(node.value)
            try:
                ast.parse(code)
            except SyntaxError:
                continue  # prose, not code
            yield node.lineno - 1, code


def _sources() -> Iterator[tuple[str, int, str]]:
    """(file, line offset, python source) for every checked piece of code."""
    for path in sorted([*(REPO / "benchmarks").rglob("*.py"), *(REPO / "tutorials").glob("*.py")]):
        name, text = path.relative_to(REPO).as_posix(), path.read_text()
        yield name, 0, text
        yield from ((name, line, code) for line, code in _embedded_code(text))
    for path in sorted([*(REPO / "docs").glob("*.md"), REPO / "README.md"]):
        for first, code in _markdown_blocks(path.read_text()):
            yield path.relative_to(REPO).as_posix(), first - 1, code


def test_the_deprecated_names_come_from_the_package():
    """The rules above see what the package deprecates (a guard against a renamed wrapper or table)."""
    assert set(DEPRECATED["agl_fit"]) == set(LEGACY_KEYWORDS)
    assert DEPRECATED["agl_fit"]["epochs"] == "training=agl.TrainingConfig(epochs=...)"
    for func in ("embed_patches", "agl_predict", "predict_anndata", "predict_chunked"):
        assert "weights" in DEPRECATED[func] and "precision" in DEPRECATED[func], func
    assert "patch_px" in DEPRECATED["embed_patches"]
    assert "n_targets" in DEPRECATED["cross_validate"]
    assert "epochs" in DEPRECATED["compare_methods"]
    assert "spatial_context" not in DEPRECATED  # its weights= / precision= are its own, not deprecated
    assert DEPRECATED["train_network"]["normalizer"] == "dkgsb=agl.DkGSBConfig(meta_normalizer=...)"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("agl.tl.agl_fit(adata, epochs=5)", ["agl_fit(epochs=...): use training=agl.TrainingConfig(epochs=...)"]),
        (
            "agl_fit(adata, encoder='resnet50')",
            ["agl_fit(encoder=<a name>): use encoder=agl.EncoderConfig(<the name>)"],
        ),
        (
            "agl.pp.embed_patches(a, encoder='resnet50', patch_px=112)",
            ["embed_patches(patch_px=...): use encoder=agl.EncoderConfig(patch_px=...)"],
        ),
        (
            "tl.agl_predict(a, m, **{'weights': w})",
            ["agl_predict(weights=...): use encoder=agl.EncoderConfig(weights=...)"],
        ),
        (
            "partial(agl.tl.agl_fit, n_seeds=3)(a)",
            ["agl_fit(n_seeds=...): use training=agl.TrainingConfig(n_seeds=...)"],
        ),
        (
            "cross_validate(a, 'g', fit_kwargs=dict(lr=1e-3))",
            ["cross_validate(fit_kwargs={'lr': ...}): use training=agl.TrainingConfig(lr=...)"],
        ),
        (
            "compare_methods(a, method_kwargs={'topk': {'k': 5}})",
            ["compare_methods(method_kwargs={'k': ...}): use dkgsb=agl.DkGSBConfig(k=...)"],
        ),
        (
            "kw = {} if n is None else {'n_seeds': n}\nagl.tl.agl_fit(a, **kw)",
            ["agl_fit(n_seeds=...): use training=agl.TrainingConfig(n_seeds=...)"],
        ),
        (
            "def f():\n    kw = {'patch_px': 32}\n    return kw\ndef g(kw):\n    agl.pp.embed_patches(a, **kw)",
            [],  # another function's kw
        ),
        ("agl.tl.agl_fit(a, training=agl.TrainingConfig(epochs=5), encoder=agl.EncoderConfig('resnet50'))", []),
        ("agl.pp.embed_patches(a, encoder='resnet50')", []),
        ("agl.pp.spatial_context(a, weights=w, precision='fp32')", []),
        ("other(adata, epochs=5)", []),
    ],
)
def test_the_finder(code, expected):
    assert [m for _, m in find_old_spellings(ast.parse(code))] == expected


def test_markdown_blocks_are_found_with_their_lines():
    page = "text\n\n```python\nimport agl_scverse as agl\n\nagl.tl.agl_fit(a, epochs=5)\n```\n\n```bash\nagl_fit\n```\n"
    page += "```python\n>>> agl.pp.embed_patches(\n...     a, precision='fp32'\n... )\n```\n"
    found = [
        (first - 1 + line, msg)
        for first, code in _markdown_blocks(page)
        for line, msg in find_old_spellings(ast.parse(code))
    ]
    assert [line for line, _ in found] == [6, 13]
    assert "training=agl.TrainingConfig(epochs=...)" in found[0][1]
    assert "encoder=agl.EncoderConfig(precision=...)" in found[1][1]


def test_no_deprecated_spellings():
    """Every call of the package in benchmarks/, tutorials/, docs/*.md and README.md uses the configs."""
    hits, unparsed = [], []
    for name, offset, code in _sources():
        try:
            tree = ast.parse(code)
        except SyntaxError:
            unparsed.append(f"{name}:{offset + 1}")
            continue
        hits += [f"{name}:{offset + line}: {msg}" for line, msg in find_old_spellings(tree)]
    assert not hits, "deprecated keywords (they warn, and go in the next release):\n" + "\n".join(hits)
    assert not [u for u in unparsed if u.endswith(".py:1")], f"scripts that do not parse: {unparsed}"
