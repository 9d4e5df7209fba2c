"""Readers fed corrupted or odd files: each either reads a valid AnnData or raises a clear error.

A clear error is one of :data:`CLEAR` with a message. A result is valid when it has spots, unique spot names,
finite coordinates and finite non-negative counts: a reader never returns NaN coordinates silently.

The table tests (:data:`LEGACY_CASES`, :data:`VISIUM_CASES`) name each case of the "Reliability" table; the
hypothesis tests mutate a valid folder at random. Raw exceptions found in reader code are listed in
:data:`KNOWN_RAW` (none today).
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from builders import small_slide, write_legacy_section, write_visium
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import agl_scverse as agl
from agl_scverse import cli

CLEAR = (ValueError, KeyError, FileNotFoundError, OSError)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

COUNTS, SPOTS, IMAGE = "counts.tsv.gz", "spots.tsv", "he.jpg"
POSITIONS, SCALEFACTORS = "spatial/tissue_positions.csv", "spatial/scalefactors_json.json"
ODD_VALUES = [np.nan, np.inf, -np.inf, -1, 0, "", "abc", 1e12, -5.5, 2.5]

# Raw exception types (not in CLEAR) a reader raised, by the corrupted file that caused them; empty since the legacy
# ST reader names the file in a ValueError for truncated counts, empty spots files and non-numeric positions.
KNOWN_RAW: dict[type, set[str]] = {}


def outcome(read, counts: bool = True) -> str:
    """Run ``read()``; return "ok" or "clear", fail on a raw exception or an invalid result.

    ``counts=False``: the counts are not checked (a plain .h5ad read; the tools check them).
    """
    try:
        adata = read()
    except CLEAR as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        return "clear"
    assert adata.n_obs > 0 and adata.n_vars > 0
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    assert xy.shape == (adata.n_obs, 2) and np.isfinite(xy).all(), "NaN/inf coordinates returned silently"
    X = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
    assert not counts or (np.isfinite(X).all() and (X >= 0).all())
    return "ok"


# --- file mutations -------------------------------------------------------------------------------------------
def truncate(name: str, frac: float):
    def mutate(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: int(len(data) * frac)])

    return mutate


def write_bytes(name: str, data: bytes):
    return lambda d: (d / name).write_bytes(data)


def _read_table(d: Path, name: str) -> pd.DataFrame:
    if name == COUNTS:
        return pd.read_csv(d / name, sep="\t", index_col=0)
    return pd.read_csv(d / name, sep="\t" if name == SPOTS else ",")


def _write_table(d: Path, name: str, df: pd.DataFrame, sep: str | None = None) -> None:
    if name == COUNTS:
        with gzip.open(d / name, "wt") as fh:
            df.to_csv(fh, sep=sep or "\t")
    else:
        df.to_csv(d / name, sep=sep or ("\t" if name == SPOTS else ","), index=False)


def edit(name: str, fn, sep: str | None = None):
    def mutate(d: Path) -> None:
        _write_table(d, name, fn(_read_table(d, name)), sep)

    return mutate


def set_cell(row: int, col: str, value):
    def fn(df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        df[col] = df[col].astype(object)
        df.iloc[row % len(df), df.columns.get_loc(col)] = value
        return df

    return fn


def gray_image(d: Path) -> None:
    Image.open(d / IMAGE).convert("L").save(d / IMAGE)


LEGACY_CASES = {
    # case: (mutation, reader kwargs, expected outcome, marks)
    "truncated counts (10%)": (truncate(COUNTS, 0.1), {}, "clear", []),
    "truncated counts (99%)": (truncate(COUNTS, 0.99), {}, "clear", []),
    "counts not gzipped": (lambda d: (d / COUNTS).write_text("\tA\n1x1\t3\n"), {}, "clear", []),
    "empty counts file": (write_bytes(COUNTS, b""), {}, "clear", []),
    "counts header only": (write_bytes(COUNTS, gzip.compress(b"\tA\tB\n")), {}, "clear", []),
    "counts comma-separated": (edit(COUNTS, lambda df: df, sep=","), {}, "clear", []),
    "counts: duplicate spot barcode": (edit(COUNTS, lambda df: pd.concat([df, df.iloc[[0]]])), {}, "clear", []),
    "counts: duplicate gene": (edit(COUNTS, lambda df: df.set_axis(["A", "A", "C"], axis=1)), {}, "clear", []),
    "counts: NaN value": (edit(COUNTS, set_cell(1, "A", np.nan)), {}, "clear", []),
    "counts: text value": (edit(COUNTS, set_cell(1, "A", "many")), {}, "clear", []),
    "counts: negative value": (edit(COUNTS, set_cell(1, "A", -2)), {}, "clear", []),
    "counts: no gene column": (edit(COUNTS, lambda df: df.iloc[:, :0]), {}, "clear", []),
    "empty spots file": (write_bytes(SPOTS, b""), {}, "clear", []),
    "spots header only": (
        lambda d: (d / SPOTS).write_text("x\ty\tpixel_x\tpixel_y\n"),
        {},
        "clear",
        [],
    ),
    "truncated spots (90%)": (truncate(SPOTS, 0.9), {}, "clear", []),
    "spots: missing pixel_x": (edit(SPOTS, lambda df: df.drop(columns="pixel_x")), {}, "clear", []),
    "spots: upper-case columns": (edit(SPOTS, lambda df: df.rename(columns=str.upper)), {}, "clear", []),
    "spots: NaN pixel_x": (edit(SPOTS, set_cell(2, "pixel_x", np.nan)), {}, "clear", []),
    "spots: inf pixel_y": (edit(SPOTS, set_cell(2, "pixel_y", np.inf)), {}, "clear", []),
    "spots: NaN array x": (edit(SPOTS, set_cell(2, "x", np.nan)), {}, "clear", []),
    "spots: text array y": (
        edit(SPOTS, set_cell(2, "y", "abc")),
        {},
        "clear",
        [],
    ),
    "spots: text pixel_x": (edit(SPOTS, set_cell(2, "pixel_x", "abc")), {}, "clear", []),
    "spots: duplicate barcode": (edit(SPOTS, lambda df: pd.concat([df, df.iloc[[0]]])), {}, "clear", []),
    "spots: comma-separated": (edit(SPOTS, lambda df: df, sep=","), {}, "ok", []),
    "spots: semicolon-separated": (edit(SPOTS, lambda df: df, sep=";"), {}, "ok", []),
    "spots: pipe-separated": (edit(SPOTS, lambda df: df, sep="|"), {}, "clear", []),
    "spots: CRLF line ends": (
        lambda d: (d / SPOTS).write_bytes((d / SPOTS).read_bytes().replace(b"\n", b"\r\n")),
        {},
        "ok",
        [],
    ),
    "spots: binary garbage": (write_bytes(SPOTS, bytes(range(256)) * 4), {}, "clear", []),
    "spots: one spot": (edit(SPOTS, lambda df: df.iloc[:1]), {}, "clear", []),
    "spots: all at one position": (edit(SPOTS, lambda df: df.assign(pixel_x=100.0, pixel_y=100.0)), {}, "clear", []),
    "spots: outside the image": (edit(SPOTS, set_cell(0, "pixel_x", 1e6)), {}, "clear", []),
    "spots: no id matches counts": (edit(SPOTS, lambda df: df.assign(x=df["x"] + 100)), {}, "clear", []),
    "missing spots file": (lambda d: (d / SPOTS).unlink(), {}, "clear", []),
    "missing image": (lambda d: (d / IMAGE).unlink(), {}, "clear", []),
    "empty image file": (write_bytes(IMAGE, b""), {}, "clear", []),
    "truncated image": (truncate(IMAGE, 0.5), {}, "clear", []),
    "grayscale image": (gray_image, {}, "clear", []),
    "microns_per_pixel=0": (lambda d: None, {"microns_per_pixel": 0}, "clear", []),
    "microns_per_pixel=NaN": (lambda d: None, {"microns_per_pixel": float("nan")}, "clear", []),
    "hires_max_px=0": (lambda d: None, {"hires_max_px": 0}, "clear", []),
    "unknown section": (lambda d: None, {"sections": ["nope"]}, "clear", []),
}


@pytest.fixture(scope="module")
def legacy_base(tmp_path_factory) -> Path:
    return write_legacy_section(tmp_path_factory.mktemp("legacy") / "S1")


def _copy(base: Path, into: Path) -> Path:
    shutil.copytree(base, into)
    return into


@pytest.mark.parametrize(
    ("case", "mutate", "kwargs", "expected"),
    [pytest.param(name, m, kw, exp, marks=marks, id=name) for name, (m, kw, exp, marks) in LEGACY_CASES.items()],
)
def test_legacy_st_odd_inputs(legacy_base, tmp_path, case, mutate, kwargs, expected):
    folder = _copy(legacy_base, tmp_path / "S1")
    mutate(folder)
    assert outcome(lambda: agl.io.read_legacy_st(folder, **kwargs)) == expected, case


def _legacy_mutation(draw):
    kind = draw(st.sampled_from(["truncate", "garbage", "cell", "drop_column", "duplicate", "drop_rows", "sep"]))
    if kind in ("truncate", "garbage"):
        name = draw(st.sampled_from([COUNTS, SPOTS, IMAGE]))
        if kind == "truncate":
            return name, truncate(name, draw(st.floats(0, 1)))
        return name, write_bytes(name, draw(st.binary(max_size=300)))
    name = draw(st.sampled_from([COUNTS, SPOTS]))
    cols = ["A", "B", "C"] if name == COUNTS else ["x", "y", "pixel_x", "pixel_y", "selected"]
    row = draw(st.integers(0, 20))
    if kind == "cell":
        return name, edit(name, set_cell(row, draw(st.sampled_from(cols)), draw(st.sampled_from(ODD_VALUES))))
    if kind == "drop_column":
        col = draw(st.sampled_from(cols))
        return name, edit(name, lambda df: df.drop(columns=col))
    if kind == "duplicate":
        return name, edit(name, lambda df: pd.concat([df, df.iloc[[row % len(df)]]]))
    if kind == "drop_rows":
        n = draw(st.integers(1, 17))
        return name, edit(name, lambda df: df.iloc[n:])
    sep = draw(st.sampled_from([",", ";", " ", "|", "\t"]))
    return name, edit(name, lambda df: df, sep=sep)


@FUZZ
@given(data=st.data())
def test_legacy_st_fuzz(legacy_base, data):
    name, mutate = _legacy_mutation(data.draw)
    load_images = data.draw(st.booleans())
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy(legacy_base, Path(tmp) / "S1")
        mutate(folder)
        try:
            outcome(lambda: agl.io.read_legacy_st(folder, load_images=load_images))
        except tuple(KNOWN_RAW) as e:
            assert name in KNOWN_RAW[type(e)], f"new raw {type(e).__name__} ({e}) after corrupting {name}"


# --- Visium ---------------------------------------------------------------------------------------------------
VISIUM_CASES = {
    "truncated counts h5": (truncate("filtered_feature_bc_matrix.h5", 0.5), "clear"),
    "garbage counts h5": (write_bytes("filtered_feature_bc_matrix.h5", b"garbage" * 100), "clear"),
    "empty positions file": (write_bytes(POSITIONS, b""), "clear"),
    "positions header only": (
        lambda d: (d / POSITIONS).write_text(
            "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n"
        ),
        "clear",
    ),
    "truncated positions": (truncate(POSITIONS, 0.5), "clear"),
    "positions: NaN pixel row": (edit(POSITIONS, set_cell(1, "pxl_row_in_fullres", np.nan)), "clear"),
    "positions: text pixel col": (edit(POSITIONS, set_cell(1, "pxl_col_in_fullres", "abc")), "clear"),
    "positions: missing column": (edit(POSITIONS, lambda df: df.drop(columns="pxl_col_in_fullres")), "clear"),
    "positions: duplicate barcode": (edit(POSITIONS, lambda df: pd.concat([df, df.iloc[[0]]])), "clear"),
    "positions: semicolon-separated": (edit(POSITIONS, lambda df: df, sep=";"), "clear"),
    "scale factors: not JSON": (write_bytes(SCALEFACTORS, b"{oops"), "clear"),
    "scale factors: a list": (write_bytes(SCALEFACTORS, b"[1, 2]"), "clear"),
    "scale factors: NaN": (
        write_bytes(SCALEFACTORS, b'{"tissue_hires_scalef": NaN, "spot_diameter_fullres": 110}'),
        "clear",
    ),
    "truncated hires image": (truncate("spatial/tissue_hires_image.png", 0.5), "clear"),
}


@pytest.fixture(scope="module")
def visium_base(tmp_path_factory) -> Path:
    return write_visium(tmp_path_factory.mktemp("visium") / "outs")


def _read_visium(folder: Path):
    return agl.io.read_visium(folder, fullres_image=folder / "fullres.jpg")


@pytest.mark.parametrize(("mutate", "expected"), list(VISIUM_CASES.values()), ids=list(VISIUM_CASES))
def test_visium_odd_inputs(visium_base, tmp_path, mutate, expected):
    folder = _copy(visium_base, tmp_path / "outs")
    mutate(folder)
    assert outcome(lambda: _read_visium(folder)) == expected


@FUZZ
@given(
    col=st.sampled_from(["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]),
    row=st.integers(0, 5),
    value=st.sampled_from(ODD_VALUES),
    frac=st.one_of(st.none(), st.floats(0, 1)),
)
def test_visium_positions_fuzz(visium_base, col, row, value, frac):
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy(visium_base, Path(tmp) / "outs")
        edit(POSITIONS, set_cell(row, col, value))(folder)
        if frac is not None:
            truncate(POSITIONS, frac)(folder)
        outcome(lambda: _read_visium(folder))


# --- .h5ad (the command line's reader) ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def h5ad_path(tmp_path_factory) -> Path:  # a path, not the bytes: hypothesis prints its arguments on failure
    path = tmp_path_factory.mktemp("h5ad") / "slide.h5ad"
    small_slide(n=40, n_genes=10).write_h5ad(path)
    return path


@FUZZ
@given(frac=st.floats(0, 0.999), flip=st.one_of(st.none(), st.integers(0, 10**6)))
def test_h5ad_truncated_or_flipped(h5ad_path, frac, flip):
    raw = h5ad_path.read_bytes()
    data = bytearray(raw[: int(len(raw) * frac)] if flip is None else raw)
    if flip is not None:
        data[flip % len(data)] ^= 0xFF
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.h5ad"
        path.write_bytes(bytes(data))
        outcome(lambda: cli._read(str(path)), counts=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_h5ad_with_nan_coordinates_is_refused(tmp_path, bad):
    adata = small_slide(n=40, n_genes=10)
    adata.obsm["spatial"][3, 1] = bad
    adata.write_h5ad(tmp_path / "s.h5ad")
    with pytest.raises(ValueError, match="NaN/inf coordinates for 1 spot"):
        cli._read(str(tmp_path / "s.h5ad"))
