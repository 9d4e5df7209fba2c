"""Saved model directories under bad inputs: overwrite safety, crash recovery, integrity, schema, paths, shapes.

Every refusal must be a clear error naming the path or field, with nothing on disk (or in the AnnData) changed.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import assert_unchanged, small_slide, snapshot
from torch import nn

import agl_scverse as agl
from agl_scverse import _modeldir as mdir
from agl_scverse.model import AGLModel, EmbeddingHead, FinetuneNet, register_encoder
from agl_scverse.model import _agl_model as ckpt
from agl_scverse.model._schema import FORMAT_VERSION, SUPPORTED_FORMATS, config_digest

SRC = Path(agl.__file__).resolve().parents[1]


def _model(seed: int = 0, n_in: int = 4) -> AGLModel:
    torch.manual_seed(seed)
    net = EmbeddingHead(n_in, 3, hidden=(5,))
    cfg = {
        "genes": ["g0", "g1", "g2"], "roles": ["target", "target", "auxiliary"], "weights": [1.0, 1.0, 0.7],
        "method": "dkgsb", "mode": "embedding", "transform": "log1p", "prior": "hvg", "k": 1, "prior_ranks": [0.0],
        "threshold": 0.5, "embedding_key": "X_emb",
        "encoder": {"encoder": "resnet18", "recorded": True, "patch_px": 32, "patch_um": 112.0},
    }  # fmt: skip
    return AGLModel(net, cfg)


X = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root`` (hidden ones too): file bytes, None for folders."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _cfg(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _write_cfg(path: Path, cfg) -> None:
    (path / "config.json").write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)


def _reseal(path: Path, cfg: dict) -> None:
    """Write ``cfg`` with a digest that matches it: a consistent model, so only the later checks can object."""
    cfg = {k: v for k, v in cfg.items() if k != "digest"}
    _write_cfg(path, {**cfg, "digest": config_digest(cfg)})


# ------------------------------------------------------------------------------------------ 1. overwrite safety
def _foreign_folder(p: Path) -> None:
    p.mkdir()
    (p / "notes.txt").write_text("my notes")
    (p / "sub").mkdir()
    (p / "sub" / "data.csv").write_text("a,b\n1,2\n")


def _model_plus_extra(p: Path) -> None:
    _model(1).save(p)
    (p / "README.md").write_text("keep me")


def _foreign_config(p: Path) -> None:
    p.mkdir()
    (p / "config.json").write_text('{"learning_rate": 0.1}')
    (p / "model.safetensors").write_bytes(b"someone else's weights")


def _weights_only(p: Path) -> None:
    p.mkdir()
    (p / "model.safetensors").write_bytes(b"weights")


def _config_not_json(p: Path) -> None:
    p.mkdir()
    (p / "config.json").write_text("not json")


def _model_with_subfolder(p: Path) -> None:
    _model(1).save(p)
    (p / "model.safetensors").unlink()
    (p / "model.safetensors").mkdir()
    (p / "model.safetensors" / "x").write_text("x")


def _a_file(p: Path) -> None:
    p.write_text("a file, not a folder")


def _link_to_model(p: Path) -> None:
    _model(1).save(p.parent / "real")
    p.symlink_to(p.parent / "real", target_is_directory=True)


REFUSED = [
    pytest.param(
        _foreign_folder,
        "other than config.json and model.safetensors: notes.txt, sub.*holds notes.txt, sub/",
        id="folder-with-notes-and-sub",
    ),
    pytest.param(_model_plus_extra, "README.md", id="model-plus-extra-file"),
    pytest.param(_foreign_config, "not an AGL model config", id="foreign-config-json"),
    pytest.param(_weights_only, "not an AGL model config", id="weights-without-config"),
    pytest.param(_config_not_json, "not an AGL model config", id="config-not-json"),
    pytest.param(_model_with_subfolder, "model.safetensors is a folder", id="weights-name-is-a-folder"),
    pytest.param(_a_file, "is a file", id="a-file"),
    pytest.param(_link_to_model, "symbolic link", id="symlink-to-a-model"),
]


@pytest.mark.parametrize(("prepare", "match"), REFUSED)
def test_overwrite_refuses_what_is_not_our_model(tmp_path, prepare, match):
    target = tmp_path / "m"
    prepare(target)
    before = _tree(tmp_path)
    with pytest.raises(FileExistsError, match=match) as err:
        _model().save(target, overwrite=True)
    assert str(target) in str(err.value)
    assert _tree(tmp_path) == before
    with pytest.raises(FileExistsError, match=match):  # without overwrite: the same reason, not "pass overwrite"
        _model().save(target)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("prepare", [_foreign_folder, _a_file], ids=["folder", "file"])
def test_agl_fit_refuses_a_foreign_save_dir_before_training(tmp_path, prepare, monkeypatch):
    import agl_scverse.tl._fit as fit_mod

    prepare(tmp_path / "m")
    before = _tree(tmp_path)
    monkeypatch.setattr(fit_mod, "train_network", lambda *a, **k: pytest.fail("trained before refusing"))
    adata = small_slide()
    snap = snapshot(adata)
    with pytest.raises(FileExistsError, match="not overwriting"):
        agl.tl.agl_fit(adata, method="pgl", embedding_key="X_emb", n_targets=3, min_cells=1, progress=False,
                       save_dir=tmp_path / "m", overwrite=True)  # fmt: skip
    assert _tree(tmp_path) == before
    assert_unchanged(adata, snap)


@pytest.mark.parametrize("existing", ["absent", "empty-folder", "our-model"])
def test_overwrite_replaces_our_model_or_nothing(tmp_path, existing):
    target = tmp_path / "m"
    if existing == "empty-folder":
        target.mkdir()
    elif existing == "our-model":
        _model(1).save(target)
    new = _model(2)
    new.save(target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    np.testing.assert_array_equal(AGLModel.load(target).predict(X), new.predict(X))


# ------------------------------------------------------------------------------------------ 2. crash recovery
class _Died(BaseException):
    """The process died: no handler runs any more file operation."""


def _crash_at_rename(monkeypatch, n: int) -> None:
    """os.rename works for the first ``n - 1`` calls, then the process 'dies' (every later call fails too)."""
    real, calls = os.rename, []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) >= n:
            raise _Died
        real(a, b)

    monkeypatch.setattr(mdir.os, "rename", rename)
    monkeypatch.setattr(mdir.shutil, "rmtree", lambda *a, **k: None)  # a dead process cleans nothing up


def _warnings(monkeypatch) -> list[str]:
    got: list[str] = []
    monkeypatch.setattr(mdir.logg, "warning", lambda msg, *a, **k: got.append(msg))
    return got


def test_death_between_the_two_renames_is_recovered_by_load(tmp_path, monkeypatch):
    target = tmp_path / "m"
    old = _model(1)
    old.save(target)
    _crash_at_rename(monkeypatch, 2)  # path -> .old done, .tmp -> path never happens
    with pytest.raises(_Died):
        _model(2).save(target, overwrite=True)
    monkeypatch.undo()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "m" not in names and any(".m.old-" in n for n in names) and any(".m.tmp-" in n for n in names)
    warned = _warnings(monkeypatch)
    loaded = AGLModel.load(target)  # the save did not finish: the previous model comes back
    np.testing.assert_array_equal(loaded.predict(X), old.predict(X))
    assert len(warned) == 1 and "interrupted save" in warned[0] and "previous" in warned[0]
    _model(3).save(target, overwrite=True)  # the next save removes the stale temporary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_complete_temporary_of_a_first_save_is_restored(tmp_path, monkeypatch):
    target = tmp_path / "m"
    new = _model(2)
    _crash_at_rename(monkeypatch, 1)  # died just before the only rename
    with pytest.raises(_Died):
        new.save(target)
    monkeypatch.undo()
    assert [p.name[:7] for p in tmp_path.iterdir()] == [".m.tmp-"]
    warned = _warnings(monkeypatch)
    np.testing.assert_array_equal(AGLModel.load(target).predict(X), new.predict(X))
    assert "completely written new" in warned[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_damaged_leftovers_are_not_restored_and_are_cleaned_by_the_next_save(tmp_path):
    target = tmp_path / "m"
    _model(1).save(tmp_path / "src")
    (tmp_path / "src").rename(tmp_path / ".m.old-abcd1234")
    w = tmp_path / ".m.old-abcd1234" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    (tmp_path / ".m.tmp-zzzz9999").mkdir()  # a half-written temporary
    (tmp_path / ".m.tmp-zzzz9999" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".m2.tmp-abcd1234").mkdir()  # another model's temporary: not ours to touch
    (tmp_path / ".m.tmp-short").mkdir()  # not a name save() makes
    before = _tree(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a saved AGL model"):
        AGLModel.load(target)
    assert _tree(tmp_path) == before
    _model(2).save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.tmp-short", ".m2.tmp-abcd1234", "m"]


def test_stale_leftovers_beside_an_intact_model_are_removed_on_save(tmp_path):
    target = tmp_path / "m"
    _model(1).save(target)
    _model(1).save(tmp_path / "x")
    (tmp_path / "x").rename(tmp_path / ".m.old-aaaa1111")  # intact, but path holds a model: stale
    assert AGLModel.load(target).predict(X).shape == (7, 3)
    assert (tmp_path / ".m.old-aaaa1111").exists()  # load does not clean up
    _model(2).save(target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced descriptors")
def test_files_and_directories_are_fsynced(tmp_path, monkeypatch):
    real, synced = os.fsync, []

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(mdir.os, "fsync", fsync)
    target = tmp_path / "m"
    _model(1).save(target)
    _model(2).save(target, overwrite=True)
    tmp_files = [s for s in synced if "/.m.tmp-" in s]
    assert {Path(s).name for s in tmp_files} >= {"config.json", "model.safetensors"}
    assert any(Path(s).name.startswith(".m.tmp-") for s in tmp_files)  # the temporary folder itself
    assert synced.count(str(tmp_path)) >= 2  # the parent, after the renames


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from agl_scverse.model import AGLModel, EmbeddingHead
    from agl_scverse import _modeldir

    target, kill_after = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(2)
    cfg = {"genes": ["g0", "g1", "g2"], "roles": ["target", "target", "auxiliary"], "weights": [1.0, 1.0, 0.7]}
    model = AGLModel(EmbeddingHead(4, 3, hidden=(5,)), cfg)
    real, calls = os.rename, []

    def rename(a, b):
        calls.append(a)
        if len(calls) > kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        real(a, b)

    _modeldir.os.rename = rename
    model.save(target, overwrite=True)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize(
    ("existing", "kill_after", "restored"),
    [("old", 1, "previous"), ("none", 0, "completely written new")],
    ids=["killed-between-renames", "killed-before-first-rename"],
)
def test_sigkilled_save_is_recovered(tmp_path, monkeypatch, existing, kill_after, restored):
    target = tmp_path / "m"
    old = _model(1)
    if existing == "old":
        old.save(target)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(target), str(kill_after)], env=env, timeout=300,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not target.exists()
    warned = _warnings(monkeypatch)
    loaded = AGLModel.load(target)
    assert restored in warned[0]
    if existing == "old":
        np.testing.assert_array_equal(loaded.predict(X), old.predict(X))
    _model(3).save(target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ------------------------------------------------------------------------------------------ 3. integrity, schema
@pytest.fixture
def saved(tmp_path) -> Path:
    return _model(1).save(tmp_path / "m")


def test_config_records_format_version_and_weights_sha256(saved):
    cfg = _cfg(saved)
    assert cfg["format_version"] == FORMAT_VERSION == 4
    assert cfg["weights_sha256"] == hashlib.sha256((saved / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("where", ["header", "tensor data", "last byte"])
def test_one_flipped_byte_in_the_weights_is_refused(saved, where):
    w = saved / "model.safetensors"
    data = bytearray(w.read_bytes())
    pos = {"header": 20, "tensor data": len(data) // 2 + 40, "last byte": len(data) - 1}[where]
    data[pos] ^= 0x01
    w.write_bytes(bytes(data))
    before = _tree(saved.parent)
    with pytest.raises(ValueError, match="damaged or was changed.*weights_sha256"):
        AGLModel.load(saved)
    assert _tree(saved.parent) == before


def _set(path: str, value):
    """A change of one config field (``a.b`` for a nested one); ``...`` deletes it."""

    def change(cfg):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        if value is ...:
            del node[last]
        else:
            node[last] = value
        return cfg

    return change


BAD_CONFIGS = [
    ("format_version", 99, r"'format_version' is 99; this agl-scverse reads format versions \[1, 2, 3, 4\]"),
    ("format_version", "3", "'format_version'"),
    ("format_version", True, "'format_version'"),
    ("weights_sha256", ..., "'weights_sha256' must be a sha256"),
    ("weights_sha256", "xyz", "'weights_sha256' must be a sha256"),
    ("genes", "g0", "'genes' must be a list"),
    ("genes", [], "'genes' is empty"),
    ("genes", ["g0", "g1", "g0"], r"'genes' lists \['g0'\] more than once"),
    ("genes", ["g0", 1, "g2"], r"'genes\[1\]' must be a non-empty string"),
    ("genes", ["g0", "g1", "g2", "g3"], "'roles' has 3 entries but the model has 4"),
    ("roles", ["target", "target"], "'roles' has 2 entries but the model has 3"),
    ("roles", ["target", "boss", "auxiliary"], r"'roles\[1\]' must be one of \['target', 'auxiliary'\]"),
    ("roles", ["auxiliary", "target", "target"], "'roles' must list the targets first"),
    ("roles", ["auxiliary"] * 3, "'roles' names no target"),
    ("weights", [1.0, 1.0], "'weights' has 2 entries"),
    ("weights", [1.0, 1.0, 2.0], r"'weights\[2\]' must be a finite number in \[0.0, 1.0\]"),
    ("weights", [1.0, 1.0, float("nan")], r"'weights\[2\]'"),
    ("weights", [1.0, 1.0, "0.7"], r"'weights\[2\]'"),
    ("prior_ranks", [0.0, 1.0], "'prior_ranks' has 2 entries but the model has 1 auxiliary"),
    ("prior_scores", ["high"], r"'prior_scores\[0\]'"),
    ("k", 99, "'k' must be an integer in"),
    ("k", True, "'k' must be an integer"),
    ("method", "best", "'method' must be one of"),
    ("mode", "other", "'mode' must be one of"),
    ("mode", "finetune", "'mode' is 'finetune' but the network is of kind 'embedding'"),
    ("transform", "log2", "'transform' must be one of"),
    ("prior", "magic", "'prior' must be one of"),
    ("embedding_key", 5, "'embedding_key' must be a non-empty string"),
    ("threshold", "high", "'threshold' must be a finite number"),
    ("net", ..., "'net' must be a dict"),
    ("net.kind", "transformer", "'net.kind' must be one of"),
    ("net.n_out", 4, "'net.n_out' is 4 but the config lists 3 genes"),
    ("net.n_in", 0, "'net.n_in' must be an integer in"),
    ("net.n_in", 4.0, "'net.n_in' must be an integer"),
    ("net.hidden", "5", "'net.hidden' must be a list"),
    ("net.hidden", [-5], r"'net.hidden\[0\]' must be an integer"),
    ("net.dropout", 2.0, "'net.dropout' must be a finite number"),
    ("encoder", "resnet18", "'encoder' must be a dict"),
    ("encoder.encoder", 3, "'encoder.encoder' must be a non-empty string"),
    ("encoder.weights_sha256", "abc", "'encoder.weights_sha256' must be a sha256"),
    ("encoder.weights_path", 5, "'encoder.weights_path' must be a non-empty string"),
    ("encoder.patch_px", -1, "'encoder.patch_px' must be an integer"),
    ("encoder.patch_um", 0, "'encoder.patch_um' must be a finite number"),
    ("hyperparameters", [1], "'hyperparameters' must be a dict"),
    # bounded values: a named refusal, not "Storage size calculation overflowed" while building the network
    ("net.n_in", 2**62, r"'net.n_in' must be an integer in \[1, 16777216\]"),
    ("net.hidden", [2**40], r"'net.hidden\[0\]' must be an integer in \[1, 16777216\]"),
    ("net.hidden", [5] * 65, "'net.hidden' names 65 hidden layers, more than 64"),
    ("net.n_out", 2**62, r"'net.n_out' must be an integer in \[1, 16777216\]"),
    # no file a config names is opened: timm arguments that open files or download are refused
    ("encoder.encoder_kwargs", '{"checkpoint_path": "/etc/hostname"}', "names 'checkpoint_path', a timm argument"),
    ("encoder.encoder_kwargs", '{"pretrained_cfg_overlay": {"file": "/x"}}', "names 'pretrained_cfg_overlay'"),
    ("digest", ..., "'digest' must map every field"),
    ("digest", {"genes": "zz"}, "'digest' must map every field"),
]


@pytest.mark.parametrize(("field", "value", "match"), BAD_CONFIGS, ids=[f"{f}={v!r}" for f, v, _ in BAD_CONFIGS])
def test_bad_config_field_is_refused_naming_it(saved, field, value, match):
    _write_cfg(saved, _set(field, value)(_cfg(saved)))
    before = _tree(saved.parent)
    with pytest.raises(ValueError, match=match) as err:
        AGLModel.load(saved)
    assert "config.json" in str(err.value) and "refusing to load" in str(err.value)
    assert _tree(saved.parent) == before


@pytest.mark.parametrize(("text", "match"), [("[1, 2]", "must hold a JSON object"), ("{oops", "not valid JSON")])
def test_config_that_is_not_a_json_object_is_refused(saved, text, match):
    _write_cfg(saved, text)
    with pytest.raises(ValueError, match=match):
        AGLModel.load(saved)


def test_invalid_in_memory_config_is_refused_on_save_writing_nothing(tmp_path):
    model = _model()
    model.config["transform"] = "sqrt"
    with pytest.raises(ValueError, match="'transform' must be one of.*refusing to save"):
        model.save(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("version", [1, 2])
def test_old_formats_without_sha256_still_load_with_a_warning(saved, monkeypatch, version):
    cfg = _cfg(saved)
    del cfg["weights_sha256"]
    cfg["format_version"] = version
    if version == 1:
        cfg["encoder"]["name"] = cfg["encoder"].pop("encoder")
    _write_cfg(saved, cfg)
    warned = []
    monkeypatch.setattr(ckpt.logg, "warning", lambda msg, *a, **k: warned.append(msg))
    loaded = AGLModel.load(saved)
    np.testing.assert_array_equal(loaded.predict(X), _model(1).predict(X))
    assert loaded.config["encoder"]["encoder"] == "resnet18"
    assert len(warned) == 1 and "records no sha256" in warned[0]
    assert set(SUPPORTED_FORMATS) == {1, 2, 3, 4}


def test_format_1_config_without_format_version_key_loads(saved):
    cfg = _cfg(saved)
    del cfg["weights_sha256"], cfg["format_version"]
    _write_cfg(saved, cfg)
    assert AGLModel.load(saved).genes == ["g0", "g1", "g2"]


# ------------------------------------------------------------------------------------------ 4. recorded paths
def _slide_model(tmp_path: Path, weights_path: str) -> tuple:
    """A model of small_slide's first genes whose encoder record names ``weights_path``; a slide without X_emb."""
    adata = small_slide(seed=3)
    torch.manual_seed(0)
    cfg = {
        "genes": ["g0", "g1", "g2"], "roles": ["target", "target", "target"], "embedding_key": "X_emb",
        "encoder": {"encoder": "resnet18", "recorded": True, "weights_sha256": "ab" * 32,
                    "weights_path": weights_path, "patch_px": 32, "patch_um": 112.0},
    }  # fmt: skip
    model = AGLModel(EmbeddingHead(12, 3, hidden=()), cfg)
    path = model.save(tmp_path / "m")
    del adata.obsm["X_emb"]
    return adata, path


def test_predict_never_opens_the_encoder_path_recorded_in_a_model(tmp_path, monkeypatch):
    import agl_scverse.encoders._record as enc_mod  # rebuild_encoder checks the weights file

    adata, path = _slide_model(tmp_path, "/etc/hostname")
    real_open, opened = builtins.open, []

    def spy(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(enc_mod, "weights_sha256", lambda p: opened.append(str(p)) or "0" * 64)
    snap = snapshot(adata)
    with pytest.raises(FileNotFoundError, match=r"recorded as '/etc/hostname'\). Pass weights="):
        agl.tl.agl_predict(adata, path)
    with pytest.raises(FileNotFoundError, match=r"Pass weights="):
        agl.tl.predict_anndata(adata, path)
    assert "/etc/hostname" not in opened
    assert_unchanged(adata, snap)


def test_user_given_encoder_weights_are_checked_against_the_recorded_sha256(tmp_path):
    adata, path = _slide_model(tmp_path, str(tmp_path / "w.pth"))
    other = tmp_path / "other.pth"
    other.write_bytes(b"not the training weights")
    snap = snapshot(adata)
    with pytest.raises(ValueError, match="differs from the one the model was trained with"):
        agl.tl.agl_predict(adata, path, weights=other)
    assert_unchanged(adata, snap)


def test_finetuned_model_needs_no_encoder_file(tmp_path):
    register_encoder("h9a_tiny_conv", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                     overwrite=True)  # fmt: skip
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    cfg = {
        "genes": ["a", "b"], "roles": ["target", "auxiliary"], "mode": "finetune",
        "encoder": {"encoder": "h9a_tiny_conv", "recorded": True, "weights_sha256": "cd" * 32,
                    "weights_path": str(tmp_path / "gone.pth"), "patch_px": 16, "patch_um": 112.0},
    }  # fmt: skip
    model = AGLModel(FinetuneNet(backbone, 4, 2), cfg)
    path = model.save(tmp_path / "ft")
    patches = np.random.default_rng(0).integers(0, 255, size=(5, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(AGLModel.load(path).predict(patches), model.predict(patches))
    # the head's shape is checked against the file before anything is built for real
    cfg = _cfg(path)
    cfg["net"]["n_features"] = 8
    _reseal(path, cfg)
    with pytest.raises(ValueError, match=r"'out.weight' is \[2, 4\] float32 in the file, the config implies \[2, 8\]"):
        AGLModel.load(path)


def test_saved_models_record_no_module_path(tmp_path):
    """Modules may move (the engine was split into encoders / train / model): nothing saved may name one."""
    register_encoder("h21_tiny_conv", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                     overwrite=True)  # fmt: skip
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    cfg = {
        "genes": ["a", "b"], "roles": ["target", "auxiliary"], "mode": "finetune",
        "encoder": {"encoder": "h21_tiny_conv", "recorded": True, "patch_px": 16, "patch_um": 112.0},
    }  # fmt: skip
    for name, model in {"embedding": _model(), "finetune": AGLModel(FinetuneNet(backbone, 4, 2), cfg)}.items():
        path = model.save(tmp_path / name)
        for file in sorted(path.iterdir()):
            data = file.read_bytes()
            assert b"agl_scverse" not in data and b"__main__" not in data, file
        # and a saved model loads by name, not by a pickled class
        assert type(AGLModel.load(path).net) is type(model.net)


# ------------------------------------------------------------------------------------------ 5. shapes
def _rewrite_weights(path: Path, change) -> None:
    """Replace the weights with ``change(state)`` and record their sha256, so only the shape check can object."""
    from safetensors.torch import load_file, save_file

    state = change(load_file(str(path / "model.safetensors")))
    save_file(state, str(path / "model.safetensors"))
    cfg = _cfg(path)
    cfg["weights_sha256"] = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    _reseal(path, cfg)


def test_huge_hidden_in_config_is_refused_before_allocating(saved, monkeypatch):
    cfg = _cfg(saved)
    cfg["net"]["hidden"] = [16000, 16000]
    _reseal(saved, cfg)
    built_on = []
    real = ckpt.build_network

    def spy(config):
        net = real(config)
        built_on.append(next(net.parameters()).device.type)
        return net

    monkeypatch.setattr(ckpt, "build_network", spy)
    with pytest.raises(ValueError, match=r"'trunk.0.weight' is \[5, 4\] float32 in the file, the config implies "
                                         r"\[16000, 4\]"):  # fmt: skip
        AGLModel.load(saved)
    assert built_on == ["meta"]  # only the shape-only network was made


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: {**s, "extra.weight": torch.zeros(2)}, r"unexpected tensor 'extra.weight' \[2\]"),
        (lambda s: {k: v for k, v in s.items() if k != "out.bias"}, r"missing tensor 'out.bias' \[3\]"),
        (lambda s: {**s, "out.weight": s["out.weight"].double()}, r"'out.weight' is \[3, 5\] float64"),
        (lambda s: {**s, "x_mean": torch.zeros(6)}, r"'x_mean' is \[6\] float32 in the file, the config implies \[4\]"),
    ],
    ids=["extra-tensor", "missing-tensor", "wrong-dtype", "wrong-input-width"],
)
def test_weights_that_do_not_match_the_config_are_refused(saved, change, match):
    _rewrite_weights(saved, change)
    before = _tree(saved.parent)
    with pytest.raises(ValueError, match=match):
        AGLModel.load(saved)
    assert _tree(saved.parent) == before


def test_weights_file_that_is_not_safetensors_is_refused(saved):
    (saved / "model.safetensors").write_bytes(b"\xff" * 64)
    cfg = _cfg(saved)
    cfg["weights_sha256"] = hashlib.sha256(b"\xff" * 64).hexdigest()
    _reseal(saved, cfg)
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        AGLModel.load(saved)


# ------------------------------------------------------------------------------------------ permissions
@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_model_has_the_permissions_of_new_files(tmp_path, umask):
    """A saved model is 0755 / 0644 under umask 0022 (not the 0700 of its temporary folder), and follows the umask."""
    old = os.umask(umask)
    try:
        path = _model().save(tmp_path / "m")
        _model(1).save(path, overwrite=True)  # the replacing save too
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask
    for name in mdir.MODEL_FILES:
        assert (path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# ------------------------------------------------------------------------------------------ 6. the whole model
@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: {**c, "genes": [c["genes"][1], c["genes"][0], c["genes"][2]]}, "'genes' (changed)"),
        (lambda c: {**c, "genes": c["genes"][::-1], "roles": c["roles"]}, "'genes' (changed)"),
        (lambda c: {**c, "transform": "log1p_cpm"}, "'transform' (changed)"),
        (lambda c: {**c, "weights": [1.0, 1.0, 0.2]}, "'weights' (changed)"),
        (lambda c: {**c, "embedding_key": "X_other"}, "'embedding_key' (changed)"),
        (lambda c: {k: v for k, v in c.items() if k != "prior"}, "'prior' (removed)"),
    ],
    ids=["two-genes-swapped", "genes-reversed", "transform", "weights", "embedding-key", "field-removed"],
)
def test_a_config_changed_after_save_is_refused_naming_the_field(saved, change, field):
    """A config edited after save (valid on its own) no longer matches the digest recorded at save."""
    cfg = change(_cfg(saved))
    if cfg["genes"][0] == "g2":  # reversed: keep the roles valid (targets first) so only the digest objects
        cfg["roles"] = ["target", "target", "auxiliary"]
    _write_cfg(saved, cfg)
    before = _tree(saved.parent)
    with pytest.raises(ValueError, match=f"was changed after the model was saved: field {re.escape(field)}"):
        AGLModel.load(saved)
    assert _tree(saved.parent) == before


def test_digest_covers_every_field_and_the_weights(saved):
    cfg = _cfg(saved)
    assert set(cfg["digest"]) == set(cfg) - {"digest"} and "weights_sha256" in cfg["digest"]
    assert config_digest({k: v for k, v in cfg.items() if k != "digest"}) == cfg["digest"]


def test_nan_weight_with_recomputed_checksums_is_refused_naming_the_tensor(saved):
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved / "model.safetensors"))
    state["out.weight"][1, 2] = float("nan")
    save_file(state, str(saved / "model.safetensors"))
    cfg = _cfg(saved)
    cfg["weights_sha256"] = hashlib.sha256((saved / "model.safetensors").read_bytes()).hexdigest()
    _reseal(saved, cfg)  # every checksum agrees: only the finite-value check can object
    with pytest.raises(ValueError, match="NaN or infinite values in tensor 'out.weight'"):
        AGLModel.load(saved)


def test_infinite_clipping_bounds_are_allowed_but_a_nan_network_is_not_saved(tmp_path):
    model = _model()  # an untrained head: out_lo / out_hi are -inf / inf (unbounded)
    assert torch.isinf(model.net.out_lo).all()
    np.testing.assert_array_equal(AGLModel.load(model.save(tmp_path / "a")).predict(X), model.predict(X))
    with torch.no_grad():
        model.net.out.bias[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values in tensor 'out.bias'; refusing to save"):
        model.save(tmp_path / "b")
    assert not (tmp_path / "b").exists() and not mdir.leftovers(tmp_path / "b")


def test_deeply_nested_config_is_refused_without_recursion_error(saved):
    cfg = _cfg(saved)
    text = json.dumps(cfg)[:-1] + ', "hyperparameters": {"x": ' + "[" * 100000 + "]" * 100000 + "}}"
    _write_cfg(saved, text)
    with pytest.raises(ValueError, match="nests lists / objects deeper than 32 levels"):
        AGLModel.load(saved)


def test_nested_but_shallow_strings_with_brackets_load(saved):
    cfg = _cfg(saved)
    cfg["hyperparameters"] = {"note": "[" * 100 + "{" * 100 + '\\"'}
    _reseal(saved, cfg)
    assert AGLModel.load(saved).config["hyperparameters"]["note"].startswith("[[[")


# ------------------------------------------------------------------------------------------ 7. one generation
def _tagged_model(tag: float) -> AGLModel:
    """A same-shape model whose config and weights both carry ``tag`` (so a mixed pair is visible)."""
    model = _model(0)
    with torch.no_grad():
        model.net.out.bias.fill_(tag)
    model.config["threshold"] = tag
    return model


def _writer(path: str, tag: float, n: int, errors) -> None:
    torch.set_num_threads(1)
    model = _tagged_model(tag)
    for _ in range(n):
        try:
            model.save(path, overwrite=True)
        except Exception as err:
            errors.put(f"writer {tag}: {type(err).__name__}: {err}")


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_load_racing_saves_sees_one_generation_and_two_writers_take_turns(tmp_path):
    """Two processes save different same-shape models to one path while this one loads: every load pairs a
    config with its own weights, and neither writer fails on the other's temporary."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    path = str(tmp_path / "m")
    _tagged_model(1.0).save(path)
    errors = ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(path, tag, 25, errors)) for tag in (1.0, 2.0)]
    for w in writers:
        w.start()
    loads = mixed = 0
    try:
        while any(w.is_alive() for w in writers) or loads < 20:
            m = AGLModel.load(path)
            loads += 1
            mixed += float(m.net.out.bias[0].detach()) != m.config["threshold"]
            if loads > 2000:
                break
    finally:
        for w in writers:
            w.join(timeout=300)  # 25 saves take seconds; a starved machine may take far longer, a hang for ever
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == [] and all(w.exitcode == 0 for w in writers)
    assert loads >= 20 and mixed == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no leftover temporaries


def test_load_decides_no_model_under_the_writers_lock(tmp_path, monkeypatch):
    """A save that starts its swap the moment the loader leaves the lock (the folder briefly gone) is not taken for
    "no model here": the loader reads the next generation (CI saw this race as a FileNotFoundError)."""
    import contextlib

    path = tmp_path / "m"
    _tagged_model(1.0).save(path)
    aside = tmp_path / "aside"
    os.rename(path, aside)  # a save is between its two renames when load starts
    exits = []

    @contextlib.contextmanager
    def racing_lock(p):
        if aside.exists():
            os.rename(aside, p)  # that save finishes
        yield
        if not exits:
            os.rename(p, aside)  # the next save takes the lock at once and moves the folder out
        exits.append(1)

    monkeypatch.setattr(ckpt, "writer_lock", racing_lock)
    m = AGLModel.load(path)
    assert m.config["threshold"] == 1.0 and len(exits) == 2


def test_load_still_reads_a_model_that_saves_keep_replacing(tmp_path, monkeypatch):
    """Saves that swap the folder during every lock-free read (a reader preempted at the wrong moment each time)
    do not make load fail: its last try reads while holding the writers' lock, when no save can swap."""
    import contextlib

    path = tmp_path / "m"
    _tagged_model(1.0).save(path)
    held, reads = [], []

    @contextlib.contextmanager
    def lock(p):
        assert not held, "the writers' lock taken twice by one reader (flock would deadlock)"
        held.append(p)
        try:
            yield
        finally:
            held.pop()

    real = ckpt._read_generation

    def read(p):
        reads.append(bool(held))
        if not held:
            raise FileNotFoundError(f"{p / 'config.json'} (a save moved the folder away)")
        return real(p)

    monkeypatch.setattr(ckpt, "writer_lock", lock)
    monkeypatch.setattr(ckpt, "_read_generation", read)
    m = AGLModel.load(path)
    assert m.config["threshold"] == 1.0
    assert reads == [False] * (ckpt.LOAD_ATTEMPTS - 1) + [True]


def test_load_reads_the_weights_once(saved, monkeypatch):
    """The checked bytes are the loaded bytes: nothing opens the weights file a second time by name."""
    import safetensors.torch as st

    monkeypatch.setattr(st, "load_file", lambda *a, **k: pytest.fail("weights re-read by path"))
    real_open, opened = os.open, []

    def spy(p, *a, **k):
        opened.append(str(p))
        return real_open(p, *a, **k)

    monkeypatch.setattr(os, "open", spy)
    AGLModel.load(saved)
    assert sum(p.endswith("model.safetensors") for p in opened) == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_fifo_in_place_of_a_model_file_is_refused_not_read_for_ever(saved):
    (saved / "model.safetensors").unlink()
    os.mkfifo(saved / "model.safetensors")
    with pytest.raises((ValueError, FileNotFoundError), match="not a regular file|not a saved AGL model"):
        AGLModel.load(saved)
    with pytest.raises(ValueError, match="model.safetensors is not a regular file"):
        ckpt.read_config(saved)
