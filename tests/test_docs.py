"""The documentation builds with warnings as errors; the hand-written API page is exactly the public API."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
MODULES = ["io", "pp", "tl", "pl", "datasets", "model", "configs"]


def _require_doc_tools() -> None:
    for mod in ("sphinx", "myst_nb", "sphinx_autodoc_typehints", "sphinx_book_theme"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pytest.skip(f"{mod} is not installed; install the doc extra: pip install -e '.[doc]'")


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory) -> Path:
    """The HTML docs, built once for this module with warnings as errors."""
    _require_doc_tools()
    out = tmp_path_factory.mktemp("docs") / "html"
    cmd = [
        sys.executable,
        "-m",
        "sphinx",
        "-j",
        "2",
        "-W",
        "--keep-going",
        "-q",
        "-b",
        "html",
        "-d",
        str(out.parent / "doctrees"),
    ]
    proc = subprocess.run([*cmd, str(DOCS), str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"sphinx failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out


@pytest.mark.slow
@pytest.mark.docs
def test_sphinx_build_without_warnings(built_docs):
    out = built_docs
    for page in ("index", "getting_started", "method", "data_layouts", "api", "tutorials"):
        assert (out / f"{page}.html").exists(), page
    api = (out / "api.html").read_text(encoding="utf-8")
    for module in MODULES:
        mod = importlib.import_module(f"agl_scverse.{module}")
        for name in mod.__all__:
            if not callable(getattr(mod, name, None)):
                continue  # constants are listed too, but only functions and classes are required here
            page = out / "generated" / f"agl_scverse.{module}.{name}.html"
            assert page.exists(), f"no API page for agl.{module}.{name}"
            assert f"agl_scverse.{module}.{name}.html" in api, f"api.html does not link agl.{module}.{name}"
    # equations are rendered by MathJax, images shipped
    method = (out / "method.html").read_text(encoding="utf-8")
    assert "\\sigma" in method and "mathjax" in method.lower()
    for img in ("selected_genes.png", "training_history.png", "gene_performance.png", "spatial_prediction.png"):
        assert (out / "_static" / img).exists(), img


def _checker():
    pytest.importorskip("bs4", reason="beautifulsoup4 (with the doc extra) reads the built pages")
    spec = importlib.util.spec_from_file_location("check_rendered", DOCS / "check_rendered.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_rendered"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


BAD_PAGE = """<html><body><nav class="bd-docs-nav"><a>agl_scverse.tl.agl_fit</a><a>agl_scverse.model.MODES</a></nav>
<article><dl class="py function"><dd>
<dl class="field-list"><dt>Parameters<span>:</span></dt><dd><ul>
<li><p><strong>split_key</strong> (str) – The split column and its values.</p></li>
<li><p><strong>val_groups</strong> (list) – The split column and its values.</p></li>
<li><p><strong>seed</strong> (int) – A seed.</p></li></ul></dd>
<dt>Returns<span>:</span></dt><dd><ul>
<li><p><strong>The AGLModel. Results are written</strong> – with k</p></li>
<li><p>- ``.obs[k.split]`` (train / val)</p></li></ul>
<p>See :class:`AGLModel` and <a href="agl_scverse._constants.html">agl_scverse._constants</a>.</p></dd></dl>
</dd></dl><pre>&gt;&gt;&gt; x = "``code is fine``"</pre></article></body></html>"""


def test_rendered_page_checker_finds_each_kind_of_leftover(tmp_path):
    """The checker itself: each class of rendering error of issue 11 is reported, a code example is not."""
    check = _checker()
    (tmp_path / "generated").mkdir()
    page = tmp_path / "generated" / "bad.html"
    page.write_text(BAD_PAGE, encoding="utf-8")
    found = {p.what for p in check.check_page(page, tmp_path)}
    assert found == {
        "raw role markup",
        "raw double backquotes",
        "names a private module",
        "links to a private module",
        "stray list marker in Returns",
        "sentence in bold in Returns",
        "parameters split_key, val_groups share one description",
        "constant listed as API in the sidebar",
    }, found
    clean = BAD_PAGE.split("<article>")[0].replace("<a>agl_scverse.model.MODES</a>", "")
    clean += "<article><p>Fine text.</p><pre>``x`` :class:`y`</pre></article>"
    page.write_text(clean, encoding="utf-8")
    assert check.check_page(page, tmp_path) == []


@pytest.mark.slow
@pytest.mark.docs
def test_rendered_api_pages_have_no_markup_leftovers(built_docs):
    """The built API pages read cleanly: no raw roles, double backquotes, list markers or bold sentences in
    Returns, no shared parameter descriptions, no private modules, no constants in the sidebar."""
    problems = _checker().check_html(built_docs)
    assert not problems, "\n".join(map(str, problems))
    model_page = (built_docs / "generated" / "agl_scverse.model.AGLModel.html").read_text(encoding="utf-8")
    for member in ("save", "load", "predict"):
        assert f'id="agl_scverse.model.AGLModel.{member}"' in model_page, member
    assert 'id="agl_scverse.model.AGLModel.__init__"' not in model_page


@pytest.mark.slow
@pytest.mark.docs
def test_api_pages_render_in_a_headless_browser(built_docs, tmp_path):
    """Screenshots of the main API pages with headless Chromium: each is a real, non-blank page image."""
    check = _checker()
    browser = check.find_browser()
    if browser is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set CHROMIUM=/path/to/chrome)")
    from PIL import Image

    for png in check.screenshots(built_docs, tmp_path, browser):
        with Image.open(png) as im:
            assert im.size == (1280, 2400), png
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100, f"{png.name} is blank"


def _api_page_names() -> dict[str, list[str]]:
    """Names listed in docs/api.md, per module (the autosummary blocks after each currentmodule)."""
    names: dict[str, list[str]] = {}
    module = None
    for line in (DOCS / "api.md").read_text().splitlines():
        if line.startswith(".. currentmodule:: agl_scverse."):
            module = line.rsplit(".", 1)[-1]
            names.setdefault(module, [])
        elif module and line.startswith("   ") and not line.strip().startswith(":") and line.strip():
            names[module].append(line.strip())
        elif line.startswith("```") and module and names[module]:
            module = None
    return names


def test_api_page_is_the_public_api():
    """Every name of every public module's __all__ is on the API page, and the page lists nothing else."""
    listed = _api_page_names()
    assert set(listed) == set(MODULES)
    for module in MODULES:
        public = importlib.import_module(f"agl_scverse.{module}").__all__
        assert sorted(listed[module]) == sorted(public), module
        assert all(not n.startswith("_") for n in public)


def test_public_modules_export_no_constants():
    """Public API is functions and classes; constants stay in private modules (issue: constants listed as API)."""
    for module in MODULES:
        mod = importlib.import_module(f"agl_scverse.{module}")
        for name in mod.__all__:
            assert callable(getattr(mod, name)), f"agl.{module}.{name} is not a function or class"


def test_hints_name_parameters_the_functions_have():
    """Every ``agl.<sub>.<function>(..., name=...)`` quoted in a message or docstring of the package, or in the docs,
    names parameters that function has (regression, issue 20: hints said ``key=`` where it is ``key_added``)."""
    import ast
    import inspect
    import re

    import agl_scverse as agl

    call = re.compile(r"agl\.(tl|pp|pl|io|model|datasets)\.(\w+)\(([^()]*)")
    root = Path(__file__).resolve().parents[1]
    texts = [(p, p.read_text()) for p in sorted((root / "docs").rglob("*.md"))]
    for path in sorted((root / "src" / "agl_scverse").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                texts.append((path, node.value))
            elif isinstance(node, ast.JoinedStr):
                texts.append((path, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)))
    wrong = []
    for path, text in texts:
        for m in call.finditer(text):
            fn = getattr(getattr(agl, m.group(1)), m.group(2), None)
            if fn is None:
                wrong.append(f"{path.name}: {m.group(0)} (no such function)")
                continue
            params = inspect.signature(fn).parameters
            if any(p.kind is p.VAR_KEYWORD for p in params.values()):
                continue
            wrong += [
                f"{path.name}: {m.group(0)} ({n}=)"
                for n in re.findall(r"(?<![\w.])(\w+)=", m.group(3))
                if n not in params
            ]
    assert not wrong, wrong
