"""Write results into an AnnData all at once: on any error (or Ctrl-C) the touched keys are put back as they were."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from anndata import AnnData

__all__ = ["restore_on_error"]

_MISSING = object()


@contextmanager
def restore_on_error(
    adata: AnnData,
    *,
    var: Sequence[str] = (),
    obs: Sequence[str] = (),
    obsm: Sequence[str] = (),
    layers: Sequence[str] = (),
    uns: Sequence[str] = (),
) -> Iterator[None]:
    """Context for the final write block of a tool.

    The named keys are remembered before the block; if the block raises (``KeyboardInterrupt`` included), each is
    restored (or removed when it did not exist) and the error propagates. Nothing is copied but references.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> a = ad.AnnData(np.ones((2, 1)))
    >>> try:
    ...     with restore_on_error(a, var=["x"]):
    ...         a.var["x"] = 1.0
    ...         raise KeyboardInterrupt
    ... except KeyboardInterrupt:
    ...     pass
    >>> "x" in a.var
    False
    """
    saved = {
        name: {k: store.get(k, _MISSING) for k in keys}
        for name, keys, store in (
            ("var", var, adata.var),
            ("obs", obs, adata.obs),
            ("obsm", obsm, adata.obsm),
            ("layers", layers, adata.layers),
            ("uns", uns, adata.uns),
        )
    }
    try:
        yield
    except BaseException:
        for name, values in saved.items():
            store = getattr(adata, name)
            for k, v in values.items():
                if v is _MISSING:
                    if k in store:
                        del store[k]
                else:
                    store[k] = v
        raise
