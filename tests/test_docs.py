"""The documentation builds with warnings as errors, and its API page covers every public function."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
MODULES = ["io", "pp", "tl", "pl", "datasets"]


def _require_doc_tools() -> None:
    for mod in ("sphinx", "myst_nb", "sphinx_autodoc_typehints", "sphinx_book_theme"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pytest.skip(f"{mod} is not installed; install the doc extra: pip install -e '.[doc]'")


@pytest.mark.slow
def test_sphinx_build_without_warnings(tmp_path):
    _require_doc_tools()
    out = tmp_path / "html"
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
        str(tmp_path / "doctrees"),
    ]
    proc = subprocess.run([*cmd, str(DOCS), str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"sphinx failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
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


def test_api_lists_are_generated_from_all():
    """conf.py's public_names follows each module's __all__, so new functions appear without editing the docs."""
    spec = importlib.util.spec_from_file_location("agl_docs_conf", DOCS / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)  # writes the generated lists, as a build does
    text = (DOCS / "_autogen_api.md").read_text()
    for module in MODULES:
        names = conf.public_names(module)
        assert names == [n for n in dict.fromkeys(importlib.import_module(f"agl_scverse.{module}").__all__)]
        for name in names:
            assert f"   {name}\n" in text
