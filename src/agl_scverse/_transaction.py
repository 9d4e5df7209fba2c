"""Write results into an AnnData all at once, only into keys the package owns, restored on error."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from anndata import AnnData

from agl_scverse import _constants as consts

__all__ = ["check_owned", "restore_on_error"]

_MISSING = object()
_STORES = ("var", "obs", "obsm", "layers", "uns")


def _recorded(adata: AnnData) -> dict[str, set[str]]:
    """The keys the package's ``.uns`` entries record as written, per store."""
    out: dict[str, set[str]] = {name: set() for name in _STORES}
    for value in adata.uns.values():
        rec = value.get(consts.OWNED_FIELD) if isinstance(value, Mapping) else None
        if isinstance(rec, Mapping):
            for name, keys in rec.items():
                if name in out:
                    out[name].update(str(k) for k in (keys if not isinstance(keys, str) else [keys]))
    return out


def check_owned(adata: AnnData, **written: Sequence[str]) -> None:
    """Raise ``ValueError`` naming every key of ``written`` (``var=[...]``, ``uns=[...]``, ...) the package does not own."""
    reserved = [f".uns[{k!r}]" for k in written.get("uns", ()) if k in consts.RESERVED_UNS]
    if reserved:
        raise ValueError(
            f"key_added would write {', '.join(reserved)}, which belongs to scanpy / squidpy / spatialdata (images, "
            "scale factors, ...); refusing to replace it. Choose another key_added (e.g. the default 'agl')."
        )
    recorded = None
    foreign = []
    for name in _STORES:
        store = getattr(adata, name)
        present = store.columns if name in ("var", "obs") else store
        for key in written.get(name, ()):
            if key not in present or str(key).startswith(consts.OWN_PREFIXES):
                continue
            if name == "uns" and isinstance(store[key], Mapping) and consts.OWNED_FIELD in store[key]:
                continue
            recorded = _recorded(adata) if recorded is None else recorded
            if key not in recorded[name]:
                foreign.append(f".{name}[{key!r}]")
    if foreign:
        raise ValueError(
            f"{', '.join(foreign)} already exist{'s' if len(foreign) == 1 else ''} and {'was' if len(foreign) == 1 else 'were'} "
            "not written by agl-scverse; refusing to replace data that is not ours. Choose another key_added, or "
            "delete them first if they are yours to lose."
        )


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
    """Context for the final write block of a tool: the named keys are restored (or removed) if it raises."""
    written = {"var": var, "obs": obs, "obsm": obsm, "layers": layers, "uns": uns}
    check_owned(adata, **written)
    saved = {name: {k: getattr(adata, name).get(k, _MISSING) for k in keys} for name, keys in written.items()}
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
    stamp = {name: [str(k) for k in keys] for name, keys in written.items() if len(keys)}
    for key in uns:
        entry = adata.uns.get(key)
        if isinstance(entry, dict):
            old = entry.get(consts.OWNED_FIELD)
            merged = {n: list(v) for n, v in old.items()} if isinstance(old, Mapping) else {}
            for n, keys in stamp.items():
                merged[n] = list(dict.fromkeys([*(str(k) for k in merged.get(n, [])), *keys]))
            adata.uns[key] = {**entry, consts.OWNED_FIELD: merged}
