"""Decode + Resize once into an on-disk uint8 cache, then crop by slicing (``data.pipeline: cached``).

Resize is the only deterministic step of the report's pipeline and, with JPEG decoding, the costly one.
Each split is decoded and resized once (in parallel, with the very same torchvision/PIL resize as the
reference pipeline, so the pixels are identical) into one flat uint8 file of CHW images kept whole at
their own size (nothing assumes squares), plus an index of offsets and shapes. One cache per (dataset
folder, split, resize), so a resize sweep gets one cache per size; ``meta.json`` records the source
files (path, size, mtime) and a cache whose sources changed is rebuilt.

Safe under concurrency (several jobs share ``data_dir``, and a rebuild may start while others train).
The cache folder ``<split>-<resize>px/`` holds::

    current.json          {"build": "build-<id>"}: the published build, swapped atomically
    build-<id>/           pixels.u8 + index.npy + meta.json, never modified once published
    .building-<id>/       a build in progress (or left by a crash): never read
    .build.lock           one builder at a time

A build writes a new folder, flushes it to disk, renames it into place and only then swaps the pointer,
so a crash at any point leaves the old cache (or none), never a half one. A reader resolves the
pointer once and reads pixels, index and meta from that one immutable folder, so it cannot pair new
pixels with an old index. Old builds are deleted by a later build only when no process still has them
mapped: each reader holds a shared ``flock`` on its ``pixels.u8`` for as long as the mapping lives.

This module is the layout and the read side; :mod:`imagenette_lab.data.cache_build` writes and prunes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

try:  # shared/non-blocking flock: see _lock_shared
    import fcntl
except ImportError:  # Windows: mapped files cannot be deleted there, which protects readers instead
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the on-disk format or the resize rule changes
PIXELS = "pixels.u8"
INDEX = "index.npy"
META = "meta.json"
POINTER = "current.json"
LOCK = ".build.lock"
BUILD_PREFIX = "build-"
BUILDING_PREFIX = ".building-"
LEGACY_FILES = (PIXELS, INDEX, META)  # version 1 kept one build directly in the cache folder


class CacheDamagedError(ValueError):
    """A published build whose files disagree with each other (never written so by this code)."""


def cache_dir(data_dir: Path, root: Path, split: str, resize: int) -> Path:
    """Cache folder for ``split`` of the dataset folder ``root`` resized to ``resize`` px."""
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:8]
    return Path(data_dir) / "cache" / f"{root.name}-{digest}" / f"{split}-{resize}px"


def source_list(root: Path, relpaths: Sequence[str]) -> list[list]:
    """(path, size, mtime_ns) of each source image: what a cache is checked against on reuse."""
    out = []
    for p in relpaths:
        st = (root / p).stat()
        out.append([p, st.st_size, st.st_mtime_ns])
    return out


def _lock_shared(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_SH)


def try_lock_exclusive(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting; False when another process holds a lock on it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _map_pixels(path: Path) -> np.ndarray:
    """Map ``path`` read-only under a shared lock held by the mapping itself (mmap keeps a dup of the fd)."""
    with open(path, "rb") as f:
        _lock_shared(f.fileno())
        st = os.fstat(f.fileno())
        if st.st_nlink == 0:  # pruned between open() and the lock: the caller re-reads the pointer
            raise FileNotFoundError(f"{path} was removed by a newer build")
        if st.st_size == 0:
            return np.empty(0, dtype=np.uint8)
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)


class ImageCache:
    """Read side of one published build: ``image(i)`` is a (3, h, w) uint8 view into the mapped pixels.

    ``directory`` is a ``build-<id>`` folder (see :func:`current_cache`); everything is read from it
    alone, and the pixels are mapped first, so that the folder cannot be pruned while it is read.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._pixels: np.ndarray | None = _map_pixels(self.directory / PIXELS)
        try:
            self.meta = json.loads((self.directory / META).read_text())
            index = np.load(self.directory / INDEX)
            self._check(index)
        except BaseException:
            self._pixels = None  # unmap (and unlock) now, not whenever the traceback is freed
            raise
        self.offsets = index[:, 0]
        self.shapes = index[:, 1:3]
        # plain Python ints: indexing numpy scalars costs more than the crop itself on the hot path
        self._index: list[tuple[int, int, int]] = [tuple(row) for row in index.tolist()]
        self.relpaths: list[str] = [s[0] for s in self.meta["sources"]]

    def _check(self, index: np.ndarray) -> None:
        count = len(self.meta["sources"])
        if index.shape != (count, 3):
            raise CacheDamagedError(
                f"cache build {self.directory}: index of shape {index.shape} for {count} images"
            )
        nbytes = 3 * index[:, 1] * index[:, 2]
        if count and not np.array_equal(index[:, 0], np.concatenate([[0], np.cumsum(nbytes)[:-1]])):
            raise CacheDamagedError(f"cache build {self.directory}: offsets that do not follow the shapes")
        if not self.pixels.size == int(nbytes.sum()) == self.meta.get("nbytes"):
            raise CacheDamagedError(
                f"cache build {self.directory}: {self.pixels.size} pixel bytes where the index needs "
                f"{int(nbytes.sum())}"
            )

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict:
        # never pickle the mapped pixels into spawned worker processes: each maps (and locks) the file
        return {**self.__dict__, "_pixels": None}

    @property
    def pixels(self) -> np.ndarray:
        """The flat uint8 pixel file, mapped read-only."""
        if self._pixels is None:
            self._pixels = _map_pixels(self.directory / PIXELS)
        return self._pixels

    def shape(self, i: int) -> tuple[int, int]:
        """(h, w) of cached image ``i``."""
        return self._index[i][1], self._index[i][2]

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as a (3, h, w) uint8 view (no copy)."""
        start, h, w = self._index[i]
        return self.pixels[start : start + 3 * h * w].reshape(3, h, w)


def published_build(directory: Path) -> str | None:
    """Name of the published build of the cache folder ``directory``, or None when there is none."""
    try:
        name = json.loads((directory / POINTER).read_text()).get("build")
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return None
    return name if isinstance(name, str) and name.startswith(BUILD_PREFIX) else None


def current_cache(directory: Path) -> ImageCache | None:
    """The published build of the cache folder ``directory`` (not checked against the sources), or None."""
    for _ in range(5):  # a build may prune the folder between our reading the pointer and opening it
        name = published_build(directory)
        if name is None:
            return None
        try:
            return ImageCache(directory / name)
        except FileNotFoundError:
            if published_build(directory) == name:  # not a newer build: someone deleted it by hand
                log.warning("cache %s points at the missing build %s; rebuilding", directory, name)
                return None
        except (CacheDamagedError, json.JSONDecodeError, ValueError, KeyError) as err:
            log.warning("%s; rebuilding", err)
            return None
    return None


def open_cache(
    directory: Path, root: Path, relpaths: Sequence[str], resize: int, quiet: bool = False
) -> ImageCache | None:
    """The cache at ``directory`` if it is complete and matches the current source files, else None."""
    cache = current_cache(Path(directory))
    if cache is None or cache.meta.get("version") != CACHE_VERSION or cache.meta.get("resize") != resize:
        return None
    if cache.meta.get("sources") != source_list(root, relpaths):
        if not quiet:
            log.info("cache %s is stale (source files changed); rebuilding", directory)
        return None
    return cache
