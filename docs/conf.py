"""Sphinx configuration for agl-scverse.

The API page (``api.md``) is written by hand: it is the list of what is supported (``tests/test_docs.py`` checks it
against the ``__all__`` of every public module). The tutorial list (``_autogen_tutorials.md``) is generated at
build time from ``../tutorials/*.ipynb``, which are copied into ``docs/tutorials/`` (no symlinks; notebooks are
committed with their outputs and not executed here).

Generated files are git-ignored (``docs/.gitignore``) and excluded as pages of their own.
"""

from __future__ import annotations

import filecmp
import inspect
import re
import shutil
import sys
from datetime import date
from pathlib import Path

from sphinx.pycode import ModuleAnalyzer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))  # the package, even when not installed

import agl_scverse

# -- project -------------------------------------------------------------------------------------------------
project = "agl-scverse"
author = "agl-scverse developers"
copyright = f"{date.today().year}, {author}"
release = agl_scverse.__version__
version = release

# -- extensions ----------------------------------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
exclude_patterns = ["_build", "_autogen_*.md", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]  # autosummary/class.rst: members once, no __init__ entry

# MyST / myst-nb: tutorials are executed elsewhere (committed with outputs), never during the docs build.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "substitution"]
myst_heading_anchors = 3
nb_merge_streams = True

# autodoc / autosummary
autosummary_generate = ["api.md"]
autosummary_imported_members = True
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_use_ivar = True  # dataclass fields: one description, not an "Attributes" entry plus an autodoc member
typehints_defaults = "comma"
always_document_param_types = False
# Type hints with names only imported for type checking cannot all be resolved; these notices are not errors
# in the documentation, and the signatures still show the annotations as written.
suppress_warnings = ["sphinx_autodoc_typehints.forward_reference", "sphinx_autodoc_typehints.guarded_import"]

# -- HTML ----------------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "agl-scverse"
html_static_path = ["_static"]
html_theme_options = {
    "repository_url": "https://github.com/agl-scverse/agl-scverse",
    "use_repository_button": False,
    "show_toc_level": 2,
}


# -- generated lists -----------------------------------------------------------------------------------------
def write_tutorials(path: Path) -> None:
    """Copy ``../tutorials/*.ipynb`` into ``docs/tutorials/`` and list them in a toctree."""
    src_dir, dst_dir = REPO / "tutorials", HERE / "tutorials"
    notebooks = sorted(src_dir.glob("*.ipynb")) if src_dir.is_dir() else []
    dst_dir.mkdir(exist_ok=True)
    for stale in dst_dir.glob("*.ipynb"):
        if not (src_dir / stale.name).exists():
            stale.unlink()
    for nb in notebooks:
        dst = dst_dir / nb.name
        if not dst.exists() or not filecmp.cmp(nb, dst, shallow=False):
            shutil.copy2(nb, dst)
    if notebooks:
        body = ["```{toctree}", ":maxdepth: 1", "", *[f"tutorials/{nb.stem}" for nb in notebooks], "```", ""]
    else:
        body = ["No tutorial notebooks in `tutorials/` yet.", ""]
    _write_if_changed(path, "\n".join(body))


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


_TYPE = r"[\w.~`:]+(?:\[[\w.~`:, |]+\])?"  # a type: AnnData, numpy.ndarray, :class:`~x.Y`, list[str]
_TYPE_LINE = re.compile(rf"^{_TYPE}(?:(?: or |\s*\|\s*|, ){_TYPE})*$")  # "Axes or Figure or None"


def returns_prose(app, what, name, obj, options, lines: list[str]) -> None:
    """Let a numpy ``Returns`` section be prose, as scanpy writes them.

    napoleon reads every unindented line of ``Returns`` as a separate return *type* (with the indented lines
    under it as its description), which splits sentences, bolds them, and shows a bullet list's ``-`` markers
    and literals as raw text. A section whose first line is neither a ``name : type`` header nor a bare type
    (``AnnData``, ``Axes or Figure or None``) is rewritten as one description (``:`` then the indented body,
    lists kept) before napoleon parses it.
    """
    i = 0
    while i < len(lines) - 1:
        if lines[i].strip() == "Returns" and set(lines[i + 1].strip()) == {"-"}:
            start = j = i + 2
            while j < len(lines) and not (
                j + 1 < len(lines) and lines[j].strip() and lines[j + 1].strip() and set(lines[j + 1].strip()) == {"-"}
            ):
                j += 1
            body = lines[start:j]
            text = [ln for ln in body if ln.strip()]
            first = text[0] if text else ""
            if text and not first.startswith((" ", "\t")) and " : " not in first and not _TYPE_LINE.match(first):
                lines[start:j] = [":", *[f"    {ln}" if ln.strip() else "" for ln in body]]
            i = j
        else:
            i += 1


def constant_docs(app, what, name, obj, options, lines: list[str]) -> None:
    """Document a re-exported constant by its own doc comment, never by its type's docstring.

    A constant defined in a private submodule and re-exported; autodoc looks for
    its doc comment in the re-exporting module, finds none, and falls back to ``dict.__doc__``. Here the doc
    comment is taken from the submodule that defines it (empty if it has none).
    """
    if what not in ("data", "attribute") or not lines:
        return
    type_doc = inspect.cleandoc(type(obj).__doc__ or "")
    if "\n".join(lines).strip() != type_doc.strip():
        return
    attr = name.rsplit(".", 1)[-1]
    found: list[str] = []
    for modname, module in list(sys.modules.items()):
        if modname.startswith("agl_scverse.") and getattr(module, attr, None) is obj:
            try:
                docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
            except Exception:
                continue
            if ("", attr) in docs:
                found = list(docs[("", attr)])
                break
    lines[:] = found


def setup(app):
    app.connect("autodoc-process-docstring", returns_prose, priority=400)  # before napoleon (500)
    app.connect("autodoc-process-docstring", constant_docs, priority=300)


write_tutorials(HERE / "_autogen_tutorials.md")
