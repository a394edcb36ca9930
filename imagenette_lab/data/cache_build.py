"""Writing the resize cache of :mod:`imagenette_lab.data.cache`: decode + resize every image of a split
once, in parallel, into a new build folder, publish it atomically and prune what no reader maps any more.

By hand, like the cache itself (no library writes a crash-safe, reader-aware flat uint8 cache). A build
also reports each image's decode outcome, so that a first cached run's verification needs no decode of
its own (:func:`caching_decoder`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from filelock import Timeout
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from imagenette_lab.data._parallel import pmap
from imagenette_lab.data.archives import fsync_path, write_atomic
from imagenette_lab.data.cache import (
    BUILD_PREFIX,
    BUILDING_PREFIX,
    CACHE_VERSION,
    INDEX,
    LEGACY_FILES,
    LOCK,
    META,
    PIXELS,
    POINTER,
    ImageCache,
    cache_dir,
    open_cache,
    published_build,
    source_list,
    try_lock_exclusive,
)
from imagenette_lab.data.sources import file_lock
from imagenette_lab.data.transforms import resized_size
from imagenette_lab.data.verify import (
    DECODE_ERRORS,
    SPLITS,
    DecodeFirst,
    DecodeRecord,
    Row,
    complaint,
    strict_decoding,
)

log = logging.getLogger(__name__)


def load_resized(path: str | Path, resize: int) -> Image.Image:
    """Decode to RGB (grayscale and CMYK JPEGs included) and Resize(shorter side) like the reference."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    return F.resize(rgb, [resize], interpolation=InterpolationMode.BILINEAR, antialias=True)


def header_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file, from its header alone."""
    with Image.open(path) as im:
        return im.height, im.width


def _measure(path: str) -> tuple[int, int] | str:
    """:func:`header_size`, or the decoder's complaint."""
    try:
        return header_size(path)
    except DECODE_ERRORS as err:
        return complaint(err)


def _write_one(job: tuple[str, str, int, int, int, int]) -> str | None:
    """Decode (strictly), resize and write one image; return the decoder's complaint or None."""
    src, pixels, offset, height, width, resize = job
    try:
        with strict_decoding():
            arr = np.asarray(load_resized(src, resize)).transpose(2, 0, 1)
    except DECODE_ERRORS as err:
        return complaint(err)
    if arr.shape != (3, height, width):  # never expected; guards the layout against a decoder surprise
        raise RuntimeError(f"{src} resized to {arr.shape[1:]} but its header promised {(height, width)}")
    with open(pixels, "r+b") as f:
        f.seek(offset)
        f.write(np.ascontiguousarray(arr).tobytes())
    return None


# Reader/pruner coordination, by hand: filelock offers exclusive locks only, and what is needed here is
# a shared lock that lives exactly as long as a memory mapping, which a pruner can test without waiting.

def _remove_build(folder: Path) -> None:
    """Delete an unpublished or superseded build unless a process still has its pixels mapped."""
    try:
        handle = open(folder / PIXELS, "rb")  # noqa: SIM115 (closed below, after the deletion)
    except FileNotFoundError:  # no pixels: nobody can be reading it
        shutil.rmtree(folder, ignore_errors=True)
        return
    with handle:
        if not try_lock_exclusive(handle.fileno()):
            log.debug("keeping %s: a running job still reads it", folder)
            return
        shutil.rmtree(folder, ignore_errors=True)  # under the lock: no reader can map it meanwhile


def _prune(directory: Path, keep: str | None) -> None:
    """Remove crashed builds, unused superseded builds and version-1 files (the builder holds LOCK)."""
    for entry in directory.iterdir():
        name = entry.name
        if name in (POINTER, LOCK, keep):
            continue
        if name in LEGACY_FILES or name.endswith(".tmp"):
            entry.unlink(missing_ok=True)  # an open mapping of an unlinked file stays valid (POSIX)
        elif name.startswith(BUILDING_PREFIX):
            shutil.rmtree(entry, ignore_errors=True)  # left by a crash: only the lock holder builds
        elif name.startswith(BUILD_PREFIX) and entry.is_dir():
            _remove_build(entry)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_build(
    root: Path, relpaths: Sequence[str], directory: Path, resize: int, workers: int | None
) -> tuple[str | None, dict[str, str | None]]:
    """Decode and resize into a new ``build-<id>`` folder, complete and on disk.

    Returns the build's name and the decode outcome of each image (None = decoded); when any image does
    not decode, nothing is kept and the name is None (the outcomes then say which images were decoded).
    """
    sources = source_list(root, relpaths)
    files = [str(root / p) for p in relpaths]
    label = f"{directory.parent.name}/{directory.name}"
    sizes = list(pmap(_measure, files, desc=f"measure {label}", workers=workers))
    if bad := {p: s for p, s in zip(relpaths, sizes, strict=True) if isinstance(s, str)}:
        return None, dict(bad)  # unreadable headers: none of the others was decoded
    shapes = np.array([resized_size(h, w, resize) for h, w in sizes], dtype=np.int64).reshape(-1, 2)
    nbytes = 3 * shapes[:, 0] * shapes[:, 1]
    offsets = np.concatenate([[0], np.cumsum(nbytes)[:-1]]).astype(np.int64)[: len(files)]
    total = int(nbytes.sum())
    name = f"{BUILD_PREFIX}{uuid.uuid4().hex[:12]}"
    tmp = directory / f"{BUILDING_PREFIX}{name}"
    tmp.mkdir()
    try:
        pixels = tmp / PIXELS
        with open(pixels, "wb") as f:
            f.truncate(total)  # sparse until written; every byte is overwritten below
        jobs = [
            (src, str(pixels), int(off), int(h), int(w), resize)
            for src, off, (h, w) in zip(files, offsets, shapes, strict=True)
        ]
        decoded = pmap(_write_one, jobs, desc=f"cache {label}", workers=workers)
        outcomes = dict(zip(relpaths, decoded, strict=True))
        if any(err is not None for err in outcomes.values()):
            shutil.rmtree(tmp, ignore_errors=True)
            return None, outcomes
        fsync_path(pixels)
        index = io.BytesIO()
        np.save(index, np.column_stack([offsets, shapes]).astype(np.int64))
        _fsync_write(tmp / INDEX, index.getvalue())
        meta = {
            "version": CACHE_VERSION,
            "resize": resize,
            "root": str(root.resolve()),
            "nbytes": total,
            "sources": sources,
        }
        _fsync_write(tmp / META, json.dumps(meta).encode())
        fsync_path(tmp)
        os.replace(tmp, directory / name)  # complete and on disk: now it may be seen (not yet used)
        fsync_path(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built cache %s: %d images, %.1f MiB", directory / name, len(files), total / 2**20)
    return name, outcomes


def try_build_cache(
    root: Path, relpaths: Sequence[str], directory: Path, resize: int, workers: int | None = None
) -> tuple[ImageCache | None, dict[str, str | None]]:
    """Return a valid cache of ``relpaths`` (relative to ``root``) at ``resize``, building it if needed.

    Also returns the decode outcome of every image a build decoded (path -> None, or the complaint;
    empty when an existing cache was reused). When an image does not decode, no cache is published and
    the cache is None: the caller leaves the image out and asks again.
    """
    directory = Path(directory)
    cached = open_cache(directory, root, relpaths, resize)
    if cached is None:
        directory.mkdir(parents=True, exist_ok=True)
        with file_lock(directory / LOCK):
            cached = open_cache(directory, root, relpaths, resize, quiet=True)  # built while we waited?
            if cached is None:
                _prune(directory, keep=published_build(directory))
                name, outcomes = _write_build(root, relpaths, directory, resize, workers)
                if name is None:
                    return None, outcomes
                write_atomic(directory / POINTER, json.dumps({"build": name}))  # the one publishing step
                cache = ImageCache(directory / name)
                _prune(directory, keep=name)
                return cache, outcomes
    log.info("reusing cache %s (%d images)", cached.directory, len(cached))
    _tidy(directory)
    return cached, {}


def build_cache(
    root: Path, relpaths: Sequence[str], directory: Path, resize: int, workers: int | None = None
) -> ImageCache:
    """:func:`try_build_cache` for images known to decode: one that does not is an error."""
    cache, outcomes = try_build_cache(root, relpaths, directory, resize, workers)
    if cache is None:
        bad = "\n  ".join(f"{root / p}: {err}" for p, err in outcomes.items() if err is not None)
        raise OSError(f"cannot cache these images:\n  {bad}\nRun prepare_data() to verify the images first.")
    return cache


def caching_decoder(data_dir: Path, resize: int, workers: int | None = None) -> DecodeFirst:
    """A ``decode_first`` for :func:`.verify.verify_dataset`: build each split's resize cache, and take
    its decode outcomes as the verification, so a first cached run decodes every image once, not twice.

    Images already known not to decode stay out of the build. A build that meets a new bad image is not
    published (the datamodule builds again without it: a second decode only where images are corrupt).
    """

    def decode(rows: list[Row], record: DecodeRecord) -> None:
        pending = set(record.todo)
        for split in SPLITS:
            usable = [r.path for r in rows if r.split == split and record.outcome.get(r.path) is None]
            if pending.intersection(usable):
                log.info("decoding %d images of %s/%s once, for the resize cache and the verification",
                         len(usable), record.root.name, split)
                directory = cache_dir(data_dir, record.root, split, resize)
                record.update(try_build_cache(record.root, usable, directory, resize, workers)[1])

    return decode


def _tidy(directory: Path) -> None:
    """Prune what a killed build or a since-finished reader left behind, unless a build runs (no wait)."""
    keep = {POINTER, LOCK, published_build(directory)}
    if all(entry.name in keep for entry in directory.iterdir()):
        return
    lock = file_lock(directory / LOCK)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return
    try:
        _prune(directory, keep=published_build(directory))  # re-read under the lock: a build may just have published
    finally:
        lock.release()
