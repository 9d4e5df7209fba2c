"""Shared parameter documentation (docrep): ``@d.dedent`` on a function, ``%(adata)s`` (etc.) in its Parameters."""

from __future__ import annotations

from docrep import DocstringProcessor

__all__ = ["d"]

_adata = """\
adata
    AnnData in the agl-scverse layout (raw counts in ``.X`` or ``layer``, spot centres in full-resolution
    pixels in ``.obsm["spatial"]``, images in ``.uns["spatial"]``)."""
_data = """\
data
    AnnData in the agl-scverse layout, or a SpatialData (its table is used; see
    :func:`agl_scverse.io.from_spatialdata`)."""
_key_added = """\
key_added
    Prefix of every key written (``.var``, ``.obs``, ``.layers``, ``.uns``); see :doc:`/data_layouts`.
    Several runs can live in one AnnData under different prefixes."""
_copy = """\
copy
    Return a modified copy instead of writing into ``adata``."""
_library_key = """\
library_key
    ``.obs`` column telling slides apart. Default: ``"library_id"`` when ``.uns["spatial"]`` holds several
    slides and that column exists, else one slide."""
_spots = """\
spots
    Spots to use: ``None`` (all), a boolean mask, integer positions, spot names, or an ``.obs`` column
    (boolean, or a split column whose ``"train"`` spots are used)."""
_progress = """\
progress
    Show progress bars: ``True``, ``False``, or ``None`` (default) to follow scanpy's verbosity: shown unless
    ``sc.settings.verbosity`` is 0 (``"error"``)."""
_plot_params = """\
ax
    Matplotlib axes to draw into (the figure is then the axes' figure). Default: a new figure.
figsize
    Size of a new figure in inches.
show
    Show the figure; ``None`` follows :attr:`scanpy.settings.autoshow`.
save
    Save the figure as scanpy does (``True``: ``<plot name>.<file_format_figs>`` in ``sc.settings.figdir``; a bare
    name is appended to the plot name there; a path with a folder is written as given). ``None`` follows
    :attr:`scanpy.settings.autosave`.
return_fig
    Return the :class:`~matplotlib.figure.Figure` instead of the axes."""

d = DocstringProcessor(
    adata=_adata,
    data=_data,
    key_added=_key_added,
    copy=_copy,
    library_key=_library_key,
    spots=_spots,
    progress=_progress,
    plot_params=_plot_params,
)
