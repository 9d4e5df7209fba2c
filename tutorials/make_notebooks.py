"""Build the tutorial notebooks from their jupytext sources (and optionally execute them).

Each notebook ``NN_name.ipynb`` is built from ``NN_name.py``, a jupytext "percent" script (``# %%`` code cells,
``# %% [markdown]`` text cells) that ruff checks like the rest of the code. Edit the ``.py`` file, never the
notebook's cells; ``tests/test_tutorials.py`` fails when a stored notebook's cells differ from its source.

Usage (from the repository root)::

    python tutorials/make_notebooks.py            # copy the sources into the notebooks; unchanged cells keep outputs
    python tutorials/make_notebooks.py --check    # exit 1 if a stored notebook differs from its source
    python tutorials/make_notebooks.py --keep-outputs  # a changed cell keeps the stored outputs at its position
    python tutorials/make_notebooks.py --execute  # rebuild and execute all notebooks in place (full mode)
    python tutorials/make_notebooks.py --execute 01  # only notebooks whose name contains "01"
"""

from __future__ import annotations

import argparse
import copy
import re
import time
from pathlib import Path

import jupytext
import nbformat

HERE = Path(__file__).resolve().parent
NOTEBOOKS = ["01_quickstart.ipynb", "02_her2st.ipynb", "03_scanpy_pipeline.ipynb", "04_whole_slide.ipynb"]

_BAR = re.compile(r"^.*\d+%\|.*\|.*$")  # a tqdm progress bar line
# a warning raised inside an installed package: "<path>/site-packages/<file>:<line>: <Name>Warning: ..."
_LIBRARY_WARNING = re.compile(r"^\S*site-packages/\S+:\d+: \w*Warning: ")


def source_path(name: str) -> Path:
    """The jupytext source of notebook ``name`` (``01_quickstart.ipynb`` -> ``tutorials/01_quickstart.py``)."""
    return HERE / Path(name).with_suffix(".py").name


def cells_of(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """``(cell_type, source)`` of every cell: what must match between a notebook and its source."""
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def build(name: str, stored: nbformat.NotebookNode | None = None, keep_outputs: bool = False) -> nbformat.NotebookNode:
    """The notebook ``name`` built from its source; a cell whose text equals the stored one keeps its outputs.

    With ``keep_outputs``, a changed code cell keeps the outputs of the stored code cell at the same position when
    the source has the same sequence of cell types (for edits that do not change what a cell shows, such as a
    renamed argument); otherwise it has none until the notebook is executed.
    """
    nb = jupytext.read(source_path(name))
    nb.metadata = (
        copy.deepcopy(stored.metadata)  # the kernel and Python version of the last execution
        if stored is not None
        else {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        }
    )
    old = {} if stored is None else {(c.cell_type, c.source): c for c in stored.cells}
    same_layout = stored is not None and [c.cell_type for c in stored.cells] == [c.cell_type for c in nb.cells]
    cells = []
    for i, cell in enumerate(nb.cells):
        previous = old.get((cell.cell_type, cell.source))
        if previous is None and keep_outputs and same_layout:
            previous = copy.deepcopy(stored.cells[i])
            previous.source = cell.source
        if previous is not None:
            cells.append(copy.deepcopy(previous))  # unchanged: its id, metadata and outputs stay as stored
        elif cell.cell_type == "code":
            cells.append(nbformat.v4.new_code_cell(cell.source))
        else:
            cells.append(nbformat.v4.new_markdown_cell(cell.source))
    nb.cells = cells
    return nb


def clean_outputs(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Stored outputs as a reader should see them: consecutive streams merged, text a carriage return overwrote
    dropped, progress-bar lines removed (Jupyter redraws a bar in place; a stored notebook repeats every frame),
    and warnings raised inside installed packages removed (they name this machine's paths, not the tutorial's)."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged: list = []
        for out in cell.get("outputs", []):
            if (
                out.output_type == "stream"
                and merged
                and merged[-1].output_type == "stream"
                and (merged[-1].name == out.name)
            ):
                merged[-1].text += out.text
            else:
                merged.append(out)
        kept = []
        for out in merged:
            if out.output_type == "stream":
                lines, keep = [ln.rsplit("\r", 1)[-1] for ln in out.text.split("\n")], []
                for ln in lines:
                    if _LIBRARY_WARNING.match(ln):
                        keep.append(None)  # and its source line below
                    elif keep and keep[-1] is None and ln.startswith("  "):
                        keep[-1] = False
                    elif not _BAR.match(ln):
                        keep.append(ln)
                out.text = "\n".join(ln for ln in keep if isinstance(ln, str))
                if not out.text.strip():
                    continue
            kept.append(out)
        cell.outputs = kept
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="only notebooks whose name contains one of these strings")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--execute", action="store_true", help="execute the rebuilt notebooks in full mode")
    mode.add_argument("--check", action="store_true", help="exit 1 if a stored notebook differs from its source")
    mode.add_argument(
        "--keep-outputs", action="store_true", help="a changed cell keeps the stored outputs at its position"
    )
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        if args.only and not any(o in name for o in args.only):
            continue
        path = HERE / name
        stored = nbformat.read(path, as_version=4) if path.exists() else None
        nb = build(name, stored, keep_outputs=args.keep_outputs)
        if args.check:
            if stored is None or cells_of(stored) != cells_of(nb):
                stale.append(name)
            continue
        if args.execute:
            from nbclient import NotebookClient

            t = time.perf_counter()
            NotebookClient(
                nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
            ).execute()
            print(f"{name}: executed in {time.perf_counter() - t:.0f} s")
            clean_outputs(nb)
        nbformat.write(nb, path)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    if stale:
        print("notebooks differ from their sources (run python tutorials/make_notebooks.py):", ", ".join(stale))
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
