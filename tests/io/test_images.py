"""Image sources read by region: pyramidal TIFF tiles, the JPEG/PNG memory-mapped cache, arrays, SpatialData."""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from agl_scverse import _images
from agl_scverse._images import (
    ArraySource,
    DecodedFileSource,
    LazyArraySource,
    Level,
    TiffSource,
    TileCache,
    _decoded,
    _tile_cache,
    choose_level,
    open_image,
    tile_cache,
)


def _texture(h, w, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 3) % 256, (yy * 5) % 256, (xx + yy) % 256], axis=-1)
    return (base + rng.integers(0, 20, size=(h, w, 3))).clip(0, 255).astype(np.uint8)


def write_pyramid(path, img, n_levels=3, tile=(64, 64), compression="zlib") -> list[np.ndarray]:
    """A tiled pyramid in SubIFDs (level i = img[::2**i, ::2**i]); returns the levels written."""
    levels = [img[:: 2**i, :: 2**i] for i in range(n_levels)]
    kw = {"tile": tile, "photometric": "rgb", "compression": compression}
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], subifds=n_levels - 1, **kw)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **kw)
    return levels


@pytest.fixture
def pyramid(tmp_path):
    img = _texture(300, 260)
    path = tmp_path / "slide.ome.tif"
    return path, write_pyramid(path, img)


@pytest.fixture(autouse=True)
def _own_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("AGL_SCVERSE_CACHE", str(tmp_path / "cache"))
    tile_cache().clear()
    yield
    tile_cache().clear()


def test_tiff_regions_equal_a_full_decode_at_every_level(pyramid):
    path, levels = pyramid
    src = open_image(path)
    assert isinstance(src, TiffSource) and src.kind == "tiff"
    assert (src.width, src.height) == (260, 300)
    assert [(lv.width, lv.height) for lv in src.levels] == [(260, 300), (130, 150), (65, 75)]
    assert src.levels[1].downsample == pytest.approx(2.0) and src.levels[2].downsample == pytest.approx(4.0)
    full = tifffile.imread(path)
    np.testing.assert_array_equal(full, levels[0])
    np.testing.assert_array_equal(src.read_region(37, 101, 90, 70), full[101:171, 37:127])  # spans 2x3 tiles
    lv1 = tifffile.imread(path, level=1)
    np.testing.assert_array_equal(src.read_region(10, 60, 100, 80, level=1), lv1[60:140, 10:110])
    # a rectangle leaving the image: only the inside part comes back
    part = src.read_region(-5, 140, 20, 30, level=1)
    np.testing.assert_array_equal(part, lv1[140:150, 0:15])
    assert src.read_region(500, 0, 10, 10).shape == (10, 0, 3)  # rows inside, no column inside
    np.testing.assert_array_equal(src.read_level(2), tifffile.imread(path, level=2))
    np.testing.assert_array_equal(np.asarray(src), full)  # array-likeness for code written for arrays
    np.testing.assert_array_equal(src[5:9, 250:270], full[5:9, 250:260])
    with pytest.raises(ValueError, match="level=3"):
        src.read_region(0, 0, 4, 4, level=3)


def test_tiff_source_reads_only_the_tiles_a_region_touches(pyramid):
    path, levels = pyramid
    src = open_image(path)
    cache = tile_cache()
    src.read_region(70, 70, 40, 40)  # inside tile (1, 1) of 64 x 64 tiles
    assert len(cache) == 1 and cache.misses == 1
    src.read_region(80, 80, 10, 10)
    assert cache.hits == 1 and len(cache) == 1  # the neighbour spot is served from the cache
    src.read_region(60, 60, 10, 10)  # touches four tiles, one already decoded
    assert len(cache) == 4


def test_tile_cache_stays_within_its_byte_budget(pyramid, monkeypatch):
    tile = np.zeros((64, 64, 3), dtype=np.uint8)
    small = TileCache(max_bytes=3 * tile.nbytes + 10)
    for i in range(10):
        small.put(i, tile.copy())
        assert small.nbytes <= small.max_bytes
    assert len(small) == 3 and small.get(0) is None and small.get(9) is not None
    small.put("huge", np.zeros(small.max_bytes + 1, dtype=np.uint8))  # larger than the budget: not kept
    assert small.get("huge") is None and small.nbytes <= small.max_bytes
    small.resize(tile.nbytes)
    assert len(small) == 1 and small.nbytes == tile.nbytes
    # the TIFF source honours the process cache's budget while reading the whole image
    monkeypatch.setattr(_tile_cache, "_TILE_CACHE", TileCache(max_bytes=5 * tile.nbytes))
    path, levels = pyramid
    src = open_image(path)
    for y in range(0, 300, 40):
        for x in range(0, 260, 40):
            np.testing.assert_array_equal(src.read_region(x, y, 40, 40), levels[0][y : y + 40, x : x + 40])
            assert tile_cache().nbytes <= tile_cache().max_bytes
    assert len(tile_cache()) >= 5 and tile_cache().nbytes > 4 * tile.nbytes  # full, not over (edge tiles are smaller)


def test_tile_cache_budget_from_environment(monkeypatch):
    monkeypatch.setenv("AGL_SCVERSE_TILE_CACHE_MB", "1.5")
    assert _tile_cache._budget_from_env() == int(1.5 * 2**20)
    monkeypatch.setenv("AGL_SCVERSE_TILE_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="AGL_SCVERSE_TILE_CACHE_MB"):
        _tile_cache._budget_from_env()


def test_tiff_source_pickles_without_handles_and_reopens(pyramid):
    path, levels = pyramid
    src = open_image(path)
    src.read_region(0, 0, 8, 8)
    assert src._arrays is not None
    clone = pickle.loads(pickle.dumps(src))
    assert clone._arrays is None and clone._store is None
    tile_cache().clear()
    np.testing.assert_array_equal(clone.read_region(3, 4, 100, 50, level=1), levels[1][4:54, 3:103])
    # a file changed after opening is not read silently
    write_pyramid(path, _texture(300, 260, seed=1))
    os.utime(path, ns=(src.mtime_ns + 10**9, src.mtime_ns + 10**9))
    with pytest.raises(RuntimeError, match="changed since it was opened"):
        pickle.loads(pickle.dumps(src)).read_region(0, 0, 4, 4)


def test_uint16_and_float_tiffs_are_rescaled_not_clipped(tmp_path):
    img = _texture(128, 128)
    path16 = tmp_path / "deep.tif"
    tifffile.imwrite(path16, img.astype(np.uint16) * 257, photometric="rgb", tile=(64, 64))  # up to 65535
    src = open_image(path16)
    assert src.raw_dtype == np.uint16
    region = src.read_region(0, 0, 128, 128)
    np.testing.assert_array_equal(region, img)  # v * 257 -> v: rescaled
    assert region.max() == 255 and region.min() < 255
    odd = np.array([[[128, 129, 65535]]], dtype=np.uint16)
    np.testing.assert_array_equal(ArraySource(odd).read_region(0, 0, 1, 1), [[[0, 1, 255]]])  # round(v / 257)
    pathf = tmp_path / "float.tif"
    tifffile.imwrite(pathf, img.astype(np.float32) / 255.0, photometric="rgb", tile=(64, 64))
    assert np.abs(open_image(pathf).read_region(0, 0, 128, 128).astype(int) - img).max() <= 1


def test_jpeg_is_decoded_once_into_a_memory_map_and_replaced_files_are_decoded_again(tmp_path, monkeypatch):
    img = _texture(90, 120)
    path = tmp_path / "he.png"
    Image.fromarray(img).save(path)
    calls = []
    decode = DecodedFileSource._decode_to
    monkeypatch.setattr(
        DecodedFileSource, "_decode_to", lambda self, target: (calls.append(target), decode(self, target))
    )
    src = open_image(path)
    assert isinstance(src, DecodedFileSource) and calls == []  # opening reads the header only
    assert (src.width, src.height) == (120, 90)
    np.testing.assert_array_equal(src.read_region(10, 20, 30, 40), img[20:60, 10:40])
    assert len(calls) == 1 and src.cache_path.parent == tmp_path / "cache" and src.cache_path.exists()
    assert isinstance(src._mmap, np.memmap) and not src._mmap.flags.writeable
    again = open_image(path)
    np.testing.assert_array_equal(again.read_region(0, 0, 120, 90), img)
    assert len(calls) == 1  # second open: the cache file is mapped, not decoded again
    assert pickle.loads(pickle.dumps(again))._mmap is None  # no memory map in the pickle
    # replace the file: new content and mtime -> new pixels in the same process
    new = 255 - img
    Image.fromarray(new).save(path)
    os.utime(path, ns=(src.mtime_ns + 10**9, src.mtime_ns + 10**9))
    fresh = open_image(path)
    np.testing.assert_array_equal(fresh.read_region(0, 0, 120, 90), new)
    assert len(calls) == 2 and fresh.cache_path != src.cache_path
    assert not src.cache_path.exists()  # the stale cache file of the old pixels was removed
    assert [p.name for p in (tmp_path / "cache").glob("*.npy")] == [fresh.cache_path.name]


def test_jpeg_cache_folder_defaults_to_the_temp_folder(monkeypatch):
    monkeypatch.delenv("AGL_SCVERSE_CACHE")
    assert _images.cache_dir().parent == Path(tempfile.gettempdir())
    assert _images.cache_dir().name.startswith("agl_scverse_cache")
    monkeypatch.setenv("AGL_SCVERSE_CACHE", "/some/where")
    assert _images.cache_dir() == Path("/some/where")


def test_clear_errors_for_missing_unreadable_and_grayscale_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        open_image(tmp_path / "missing.jpg")
    (tmp_path / "notes.bin").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not an image format"):
        open_image(tmp_path / "notes.bin")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ValueError, match="not a readable TIFF"):
        open_image(tmp_path / "broken.tif")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "gray.png")
    with pytest.raises(ValueError, match="grayscale"):
        open_image(tmp_path / "gray.png")
    tifffile.imwrite(tmp_path / "gray.tif", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="grayscale"):
        open_image(tmp_path / "gray.tif")
    with pytest.raises(ValueError, match="grayscale"):
        open_image(np.zeros((8, 8, 1), dtype=np.uint8))
    with pytest.raises(TypeError, match="expected a file path"):
        open_image(42)


def test_array_and_spatialdata_sources():
    import dask.array as da
    import spatialdata as sd

    img = _texture(96, 80)
    arr = ArraySource(np.concatenate([img, np.full((96, 80, 1), 9, np.uint8)], axis=-1))  # RGBA: alpha dropped
    np.testing.assert_array_equal(arr.read_region(70, -3, 20, 10), img[0:7, 70:80])
    flat = open_image(da.from_array(img.transpose(2, 0, 1), chunks=(3, 32, 32)))  # dask (c, y, x)
    assert isinstance(flat, LazyArraySource) and flat.levels == [Level(80, 96, 1.0)]
    np.testing.assert_array_equal(flat.read_region(5, 6, 30, 40), img[6:46, 5:35])
    tree = sd.models.Image2DModel.parse(img.transpose(2, 0, 1), dims=("c", "y", "x"), scale_factors=[2])
    multi = open_image(tree)  # a SpatialData multiscale image: its levels
    assert [(lv.width, lv.height, lv.downsample) for lv in multi.levels] == [(80, 96, 1.0), (40, 48, 2.0)]
    np.testing.assert_array_equal(multi.read_region(0, 0, 80, 96), img)
    lv1 = np.asarray(tree["scale1"].ds["image"].transpose("y", "x", "c"))
    np.testing.assert_array_equal(multi.read_region(10, 20, 16, 16, level=1), lv1[20:36, 10:26])
    single = open_image(tree["scale0"].ds["image"])  # a DataArray
    np.testing.assert_array_equal(single.read_region(1, 2, 3, 4), img[2:6, 1:4])
    assert pickle.loads(pickle.dumps(multi)).read_region(0, 0, 5, 5).shape == (5, 5, 3)


def test_level_rule_never_coarser_than_the_patch():
    levels = [Level(8000, 8000, 1.0), Level(4000, 4000, 2.0), Level(2000, 2000, 4.0), Level(1000, 1000, 8.0)]
    assert choose_level(levels, 0.25, 0.5) == 1  # a 224 px / 112 µm patch of a 40x scan: the 2x level
    assert choose_level(levels, 0.25, 1.99) == 2  # 8x would be 2.0 µm/px, coarser than 1.99
    assert choose_level(levels, 0.25, 2.0) == 3
    assert choose_level(levels, 0.25, 0.2) == 0  # finer than level 0: level 0 (upsampled)
    odd = [Level(8001, 8001, 1.0), Level(4000, 4000, 2.00025)]  # rounded level size, within the tolerance
    assert choose_level(odd, 0.25, 0.5) == 1


def test_strip_tiffs_are_read_in_bands(tmp_path):
    img = _texture(700, 300)
    tifffile.imwrite(tmp_path / "strips.tif", img, photometric="rgb", compression="zlib", rowsperstrip=8)
    src = open_image(tmp_path / "strips.tif")
    np.testing.assert_array_equal(src.read_region(20, 250, 100, 20), img[250:270, 20:120])  # crosses a band edge
    assert src._chunks == [(256, 300)] and len(tile_cache()) == 2  # bands of 32 strips, not 4 separate strips
    np.testing.assert_array_equal(src.read_region(0, 600, 300, 200), img[600:700])


# ------------------------------------------------------------------------------------------------ trust (issue 20)
def _overwrite_in_place(path: Path, data: bytes) -> None:
    """Rewrite ``path``'s bytes in the same inode and put its modification time back."""
    st = os.stat(path)
    assert len(data) == st.st_size
    with open(path, "r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_ino == st.st_ino


@pytest.mark.parametrize("fmt", ["bmp", "tif"])
def test_an_image_replaced_in_place_with_its_mtime_restored_gives_the_new_pixels(tmp_path, fmt):
    old, new = _texture(64, 80, seed=0), _texture(64, 80, seed=1)[::-1].copy()
    path = tmp_path / f"he.{fmt}"

    def encode(img) -> bytes:
        other = tmp_path / f"tmp.{fmt}"
        if fmt == "tif":
            tifffile.imwrite(other, img, photometric="rgb", tile=(32, 32))  # uncompressed: same size
        else:
            Image.fromarray(img).save(other)
        return other.read_bytes()

    path.write_bytes(encode(old))
    np.testing.assert_array_equal(open_image(path).read_region(0, 0, 80, 64), old)
    _overwrite_in_place(path, encode(new))
    np.testing.assert_array_equal(open_image(path).read_region(0, 0, 80, 64), new)


def test_decoded_cache_is_keyed_by_content_not_by_path(tmp_path, monkeypatch):
    img = _texture(40, 50)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(img).save(a)
    b.write_bytes(a.read_bytes())
    sa, sb = open_image(a), open_image(b)
    assert sa.content_sha256 == sb.content_sha256 == hashlib.sha256(a.read_bytes()).hexdigest()
    _decoded._HASHES.clear()  # another process: the hash recorded for this file identity is read, not recomputed
    fresh = open_image(a)
    monkeypatch.setattr(_decoded, "sha256_file", lambda p: pytest.fail("hashed again"))
    assert fresh.content_sha256 == sa.content_sha256
    assert sa.cache_path.name.split("-")[-1] == sb.cache_path.name.split("-")[-1]


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX owners")
def test_a_cache_folder_of_another_user_or_writable_by_others_is_refused(tmp_path, monkeypatch):
    img = _texture(30, 40)
    path = tmp_path / "he.png"
    Image.fromarray(img).save(path)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    src = open_image(path)
    planted = 255 - img  # pixels someone else put where the decoded copy would be
    np.save(src.cache_path, planted)
    real_uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: real_uid + 1)  # the folder now belongs to "another user"
    with pytest.raises(PermissionError, match=r"belongs to another user .*AGL_SCVERSE_CACHE"):
        src.read_region(0, 0, 40, 30)
    monkeypatch.setattr(os, "geteuid", lambda: real_uid)
    os.chmod(cache, 0o777)
    with pytest.raises(PermissionError, match="can be written by others"):
        open_image(path).read_region(0, 0, 40, 30)


def test_default_cache_folder_is_created_private(tmp_path, monkeypatch):
    monkeypatch.setenv("AGL_SCVERSE_CACHE", str(tmp_path / "deep" / "cache"))
    path = tmp_path / "he.png"
    Image.fromarray(_texture(20, 20)).save(path)
    open_image(path).read_region(0, 0, 5, 5)
    assert (tmp_path / "deep" / "cache").stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(os.name == "nt", reason="POSIX links")
def test_a_lock_link_in_the_cache_never_truncates_the_file_it_points_to(tmp_path):
    path = tmp_path / "he.png"
    Image.fromarray(_texture(30, 40)).save(path)
    victim = tmp_path / "thesis.txt"
    victim.write_text("years of work")
    src = open_image(path)
    _images.private_folder(src.cache_path.parent)
    os.symlink(victim, src.cache_path.with_name(src.cache_path.name + ".lock"))
    with pytest.raises(PermissionError, match="lock"):
        src.read_region(0, 0, 4, 4)
    assert victim.read_text() == "years of work"


@pytest.mark.skipif(os.name == "nt", reason="POSIX links")
def test_a_cache_file_that_is_a_link_is_not_followed(tmp_path):
    path = tmp_path / "he.png"
    Image.fromarray(_texture(30, 40)).save(path)
    src = open_image(path)
    _images.private_folder(src.cache_path.parent)
    elsewhere = tmp_path / "elsewhere.npy"
    np.save(elsewhere, np.zeros((30, 40, 3), np.uint8))
    os.symlink(elsewhere, src.cache_path)
    with pytest.raises(PermissionError, match="is a link"):
        src.read_region(0, 0, 4, 4)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
@pytest.mark.parametrize("name", ["he.png", "he.tif"])
def test_a_fifo_image_path_is_refused_not_read_for_ever(tmp_path, name):
    import threading

    fifo = tmp_path / name
    os.mkfifo(fifo)
    result = []

    def target():
        try:
            open_image(fifo)
        except Exception as err:
            result.append(err)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout=120)  # refusing takes milliseconds; a starved machine may take seconds, a block for ever
    assert not t.is_alive(), "open_image blocked on a FIFO"
    assert isinstance(result[0], ValueError) and "FIFO (named pipe), not a regular image file" in str(result[0])
    with pytest.raises(ValueError, match="character device"):
        open_image("/dev/zero")


def test_decoding_writes_no_memory_map_and_preallocates(tmp_path, monkeypatch):
    """A memory-mapped sparse file turns a full disk into SIGBUS; the copy is written with ordinary writes."""
    path = tmp_path / "he.png"
    img = _texture(50, 60)
    Image.fromarray(img).save(path)
    monkeypatch.setattr(np.lib.format, "open_memmap", lambda *a, **k: pytest.fail("decoded through a memory map"))
    sizes = []
    if hasattr(os, "posix_fallocate"):
        real = os.posix_fallocate
        monkeypatch.setattr(os, "posix_fallocate", lambda fd, off, n: (sizes.append(n), real(fd, off, n))[1])
    src = open_image(path)
    np.testing.assert_array_equal(src.read_region(0, 0, 60, 50), img)
    assert sizes in ([], [src.cache_path.stat().st_size])  # the whole file, header included
    assert np.load(src.cache_path).shape == (50, 60, 3)


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="Linux: RLIMIT_FSIZE")
def test_a_full_disk_while_decoding_is_a_clean_error_with_no_temporary_left(tmp_path):
    """Under a file-size limit (a disk with 200 kB free) decoding a 1 MB image fails with OSError, not SIGBUS."""
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "big.png"
    Image.fromarray(_texture(600, 600)).save(path)
    cache = tmp_path / "cache"
    code = textwrap.dedent(f"""
        import errno, resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        from agl_scverse._images import open_image
        try:
            open_image({str(path)!r}).read_region(0, 0, 10, 10)
        except OSError as err:
            print("OSError", err.errno == errno.EFBIG, err)
    """)
    env = {**os.environ, "AGL_SCVERSE_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("OSError True") and "Could not write the decoded copy" in out.stdout, out.stdout
    assert "nothing was left behind" in out.stdout
    assert [p.name for p in cache.iterdir() if not p.name.endswith((".lock", ".sha256"))] == []


def test_opening_a_large_image_changes_no_process_wide_pil_setting(tmp_path):
    path = tmp_path / "he.jpg"
    Image.fromarray(_texture(40, 40)).save(path)
    before = Image.MAX_IMAGE_PIXELS
    assert before is not None
    src = open_image(path)
    src.read_region(0, 0, 8, 8)
    assert before == Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32])
def test_wide_integer_images_are_read_by_their_value_range(dtype):
    from agl_scverse._spatial import as_rgb

    img = _texture(30, 30)
    deep = img.astype(dtype) * 257  # 16-bit values in a wide integer type
    for src in (ArraySource(deep), LazyArraySource([deep])):
        got = src.read_region(0, 0, 30, 30)
        assert not np.all(got == 255)  # not clipped to white
        np.testing.assert_array_equal(got, img)
    np.testing.assert_array_equal(as_rgb(deep), img)
    np.testing.assert_array_equal(ArraySource(img.astype(dtype)).read_region(0, 0, 30, 30), img)  # 8-bit values


@pytest.mark.parametrize(("values", "match"), [((0, 70000), r"values in \[0, 70000\]"), ((-5, 200), r"\[-5, 200\]")])
def test_integer_images_outside_16_bits_are_refused(values, match):
    from agl_scverse._spatial import as_rgb

    img = np.zeros((4, 4, 3), np.int32)
    img[0, 0, :2] = values
    with pytest.raises(ValueError, match=match + ".*Convert it to uint8 or uint16"):
        ArraySource(img).read_region(0, 0, 4, 4)
    with pytest.raises(ValueError, match="Convert it to uint8 or uint16"):
        as_rgb(img)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or sys.platform != "linux", reason="mounts a tmpfs")
def test_a_really_full_disk_is_an_oserror_not_sigbus(tmp_path):
    """A 300 kB tmpfs as the cache: decoding a 1 MB image used to die of SIGBUS leaving its temporary behind."""
    import subprocess

    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        path = tmp_path / "big.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8)).save(path)
        code = f"from agl_scverse._images import open_image\nopen_image({str(path)!r}).read_region(0, 0, 4, 4)"
        env = {**os.environ, "AGL_SCVERSE_CACHE": str(mnt / "cache")}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 1 and "No space left on device" in out.stderr, (out.returncode, out.stderr[-1500:])
        assert [p.name for p in (mnt / "cache").iterdir() if not p.name.endswith((".lock", ".sha256"))] == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_pruning_keeps_an_entry_rewritten_after_it_looked_stale(tmp_path, monkeypatch):
    """Another process's pruning read an entry's old record (its source image gone), then this process wrote the
    entry afresh: the new decoded copy is kept (checked again under the entry's lock), not deleted under its user."""
    import json

    from agl_scverse._images import _cache_folder as cf

    folder = tmp_path / "cache"
    folder.mkdir()
    npy, meta = folder / "he-0123.npy", folder / "he-0123.json"
    live = tmp_path / "he.png"
    live.write_bytes(b"an image")
    np.save(npy, np.zeros((2, 2, 3), np.uint8))
    meta.write_text(json.dumps({"path": str(tmp_path / "gone.png"), "size": 1, "mtime_ns": 1}))  # stale
    real_stat = os.stat

    def stat(p, *a, **k):
        if str(p) == str(tmp_path / "gone.png"):  # the pruner saw the old record: the writer finishes now
            np.save(npy, np.ones((2, 2, 3), np.uint8))
            st = real_stat(live)
            meta.write_text(json.dumps({"path": str(live), "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
        return real_stat(p, *a, **k)

    monkeypatch.setattr(cf.os, "stat", stat)
    cf.prune_stale(folder)
    monkeypatch.undo()
    assert np.load(npy).min() == 1 and meta.is_file()
    live.unlink()  # now it is stale: pruned, lock file included
    cf.prune_stale(folder)
    assert sorted(p.name for p in folder.iterdir()) == []
