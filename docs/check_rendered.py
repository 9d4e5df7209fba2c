"""Build the HTML documentation and check the rendered API pages as a reader sees them.

Sphinx builds without warnings even when a docstring renders badly (a sentence in bold, a list's ``-`` markers
and double backquotes shown as text, one sentence copied to several parameters, a link into a private module).
This script reads the built pages and reports those leftovers, and takes screenshots of the main API pages with a
headless Chromium to look at::

    python docs/check_rendered.py                          # build into docs/_build/html, check, screenshot
    python docs/check_rendered.py --html DIR --no-build    # check an existing build
    python docs/check_rendered.py --screenshots shots/     # where the PNGs go (default: <html>/_screenshots)

Exit status 1 when a page has a problem (one line each: page, what, the text), 0 otherwise. The screenshots
need a Chromium (``chromium``, ``chromium-headless-shell``, ``google-chrome``, or ``$CHROMIUM``); without one they
are skipped with a note. ``tests/test_docs.py`` runs the same checks.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Pages photographed by default: the API index and the pages of the main entry points.
SCREENSHOT_PAGES = (
    "api.html",
    "generated/agl_scverse.tl.agl_fit.html",
    "generated/agl_scverse.tl.agl_predict.html",
    "generated/agl_scverse.model.AGLModel.html",
    "generated/agl_scverse.io.read_visium.html",
)
BROWSERS = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome", "google-chrome-stable")
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|doc|ref|py:\w+):`?")
_PRIVATE = re.compile(r"\bagl_scverse(?:\.[a-z]\w*)*\._[a-z]\w*")
_CONSTANT = re.compile(r"^agl_scverse(?:\.\w+)*\.[A-Z][A-Z0-9_]+$")


@dataclass(frozen=True)
class Problem:
    page: str
    what: str
    text: str

    def __str__(self) -> str:
        return f"{self.page}: {self.what}: {self.text[:160]!r}"


def build(html: Path, doctrees: Path | None = None, warnings_as_errors: bool = True) -> None:
    """Build the HTML docs into ``html`` (raises ``RuntimeError`` with Sphinx's output when it fails)."""
    cmd = [sys.executable, "-m", "sphinx", "-q", "-b", "html", "-d", str(doctrees or html.parent / "doctrees")]
    if warnings_as_errors:
        cmd += ["-W", "--keep-going"]
    proc = subprocess.run([*cmd, str(HERE), str(html)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"sphinx failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


def _text(node) -> str:
    """The visible text of a node, code blocks (examples) left out, whitespace collapsed."""
    from bs4 import BeautifulSoup

    node = BeautifulSoup(str(node), "html.parser")
    for pre in node.find_all(["pre", "script", "style"]):
        pre.decompose()
    return " ".join(node.get_text(" ").split())


def _field(dl, name: str):
    """The ``<dd>`` of field ``name`` (``Parameters``, ``Returns``) of a description list, or None."""
    for dt in dl.find_all("dt", recursive=False):
        if dt.get_text(strip=True).rstrip(":") == name:
            return dt.find_next_sibling("dd")
    return None


def check_page(path: Path, root: Path) -> list[Problem]:
    """The rendering problems of one built page (see the module docstring)."""
    from bs4 import BeautifulSoup

    page = str(path.relative_to(root))
    soup = BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
    main = soup.find("article") or soup.find(attrs={"role": "main"}) or soup.body or soup
    problems: list[Problem] = []
    text = _text(main)
    for m in _ROLE.finditer(text):
        problems.append(Problem(page, "raw role markup", text[max(0, m.start() - 60) : m.end() + 60]))
    for m in re.finditer("``", text):
        problems.append(Problem(page, "raw double backquotes", text[max(0, m.start() - 60) : m.end() + 60]))
    for m in _PRIVATE.finditer(text):
        problems.append(Problem(page, "names a private module", m.group(0)))
    for a in main.find_all("a", href=True):
        if _PRIVATE.search(a["href"]) and "_modules/" not in a["href"]:  # "[source]" links may point anywhere
            problems.append(Problem(page, "links to a private module", a["href"]))
    for dl in main.find_all("dl", class_="field-list"):
        returns = _field(dl, "Returns")
        if returns is not None:
            for block in returns.find_all(["p", "li"]):
                line = _text(block)
                if re.match(r"^[-*+] ", line):
                    problems.append(Problem(page, "stray list marker in Returns", line))
            for strong in returns.find_all("strong"):
                if len(strong.get_text().split()) > 2:
                    problems.append(Problem(page, "sentence in bold in Returns", _text(strong)))
        params = _field(dl, "Parameters")
        if params is not None:
            names_by_desc: dict[str, list[str]] = {}
            for li in params.find_all("li"):
                name = li.find("strong")
                parts = _text(li).split(" – ", 1)
                if name is not None and len(parts) == 2 and len(parts[1].split()) >= 2:
                    names_by_desc.setdefault(parts[1], []).append(name.get_text())
            for desc, names in names_by_desc.items():
                if len(names) > 1:
                    problems.append(Problem(page, f"parameters {', '.join(names)} share one description", desc))
    nav = soup.find(class_="bd-sidebar-primary") or soup.find("nav", class_="bd-docs-nav")
    if nav is not None:
        for a in nav.find_all("a"):
            entry = a.get_text(strip=True)
            if _CONSTANT.match(entry):
                problems.append(Problem(page, "constant listed as API in the sidebar", entry))
    return problems


def check_html(html: Path) -> list[Problem]:
    """The problems of every API page (``generated/*.html``) and of ``api.html``."""
    pages = sorted((html / "generated").glob("*.html")) + [html / "api.html"]
    missing = [p for p in pages if not p.exists()]
    if missing or len(pages) < 2:
        raise FileNotFoundError(f"no built API pages in {html}; build the docs first (without --no-build).")
    return [problem for page in pages for problem in check_page(page, html)]


def find_browser() -> str | None:
    """A headless-capable Chromium on this machine (``$CHROMIUM`` first), or None."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"]) or os.environ["CHROMIUM"]
    for name in BROWSERS:
        if found := shutil.which(name):
            return found
    return None


def screenshot(browser: str, page: Path, png: Path, width: int = 1280, height: int = 2400) -> Path:
    """A PNG of ``page`` as headless Chromium renders it (raises ``RuntimeError`` when none is written)."""
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
        f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if not png.exists() or png.stat().st_size == 0:
        raise RuntimeError(f"{browser} wrote no screenshot of {page}: {proc.stderr[-1000:]}")
    return png


def screenshots(html: Path, out: Path, browser: str, pages=SCREENSHOT_PAGES) -> list[Path]:
    """Screenshots of ``pages`` (paths relative to ``html``) into ``out``."""
    return [screenshot(browser, html / p, out / (Path(p).stem + ".png")) for p in pages]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--html", type=Path, default=HERE / "_build" / "html", help="built HTML folder")
    parser.add_argument("--no-build", action="store_true", help="check an existing build")
    parser.add_argument("--screenshots", type=Path, default=None, help="folder of the PNGs")
    args = parser.parse_args(argv)
    if not args.no_build:
        build(args.html)
    problems = check_html(args.html)
    for problem in problems:
        print(problem)
    browser = find_browser()
    if browser is None:
        print("screenshots skipped: no Chromium found (install chromium, or set CHROMIUM=/path/to/chrome)")
    else:
        shots = screenshots(args.html, args.screenshots or args.html / "_screenshots", browser)
        print(f"{len(shots)} screenshots in {shots[0].parent}")
    print(f"{len(problems)} rendering problem(s) in {args.html}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
