"""Decode + Resize once into an on-disk uint8 cache, then crop by slicing (``data.pipeline: cached``).

Resize is the only deterministic step of the report's pipeline and, with JPEG decoding, the costly one.
Each split is decoded and resized once (in parallel, with the very same torchvision/PIL resize as the
reference pipeline, so the pixels are identical) into one flat uint8 file of CHW images kept whole at
their own size (nothing assumes squares), plus an index of offsets and shapes. The folder is written
under a temporary name and renamed when complete; ``meta.json`` records the source files (path, size,
mtime) and a cache whose sources changed is rebuilt. One cache per (dataset folder, split, resize), so
a resize sweep gets one cache per size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from imagenette_lab.data._parallel import pmap
from imagenette_lab.data.transforms import center_crop_origin, resized_size

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the on-disk format or the resize rule changes
PIXELS = "pixels.u8"
INDEX = "index.npy"
META = "meta.json"


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


def load_resized(path: str | Path, resize: int) -> Image.Image:
    """Decode to RGB (grayscale and CMYK JPEGs included) and Resize(shorter side) like the reference."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    return F.resize(rgb, [resize], interpolation=InterpolationMode.BILINEAR, antialias=True)


def _header_size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:  # reads the header only
        return im.height, im.width


def _write_one(job: tuple[str, str, int, int, int, int]) -> None:
    src, pixels, offset, height, width, resize = job
    try:
        arr = np.asarray(load_resized(src, resize)).transpose(2, 0, 1)
    except OSError as err:  # name the file: the worker's traceback alone does not
        raise OSError(f"cannot cache {src}: {err}. Run prepare_data() to verify the images first.") from err
    if arr.shape != (3, height, width):  # never expected; guards the layout against a decoder surprise
        raise RuntimeError(f"{src} resized to {arr.shape[1:]} but its header promised {(height, width)}")
    with open(pixels, "r+b") as f:
        f.seek(offset)
        f.write(np.ascontiguousarray(arr).tobytes())


class ImageCache:
    """Read side of a cache: ``image(i)`` is a (3, h, w) uint8 view into a memory-mapped file."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / META).read_text())
        index = np.load(self.directory / INDEX)
        self.offsets = index[:, 0]
        self.shapes = index[:, 1:3]
        # plain Python ints: indexing numpy scalars costs more than the crop itself on the hot path
        self._index: list[tuple[int, int, int]] = [tuple(row) for row in index.tolist()]
        self.relpaths: list[str] = [s[0] for s in self.meta["sources"]]
        self._pixels: np.ndarray | None = None  # mapped lazily in each DataLoader worker

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict:
        # never pickle the mapped pixels into worker processes: each worker maps the file itself
        return {**self.__dict__, "_pixels": None}

    @property
    def pixels(self) -> np.ndarray:
        """The flat uint8 pixel file, mapped read-only."""
        if self._pixels is None:
            mapped = np.memmap(self.directory / PIXELS, dtype=np.uint8, mode="r")
            self._pixels = mapped.view(np.ndarray)  # same mapping, without memmap's per-slice overhead
        return self._pixels

    def shape(self, i: int) -> tuple[int, int]:
        """(h, w) of cached image ``i``."""
        return self._index[i][1], self._index[i][2]

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as a (3, h, w) uint8 view (no copy)."""
        start, h, w = self._index[i]
        return self.pixels[start : start + 3 * h * w].reshape(3, h, w)


def open_cache(directory: Path, root: Path, relpaths: Sequence[str], resize: int) -> ImageCache | None:
    """The cache at ``directory`` if it is complete and matches the current source files, else None."""
    meta_path = directory / META
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("version") != CACHE_VERSION or meta.get("resize") != resize:
        return None
    if meta.get("sources") != source_list(root, relpaths):
        log.info("cache %s is stale (source files changed); rebuilding", directory)
        return None
    return ImageCache(directory)


def build_cache(
    root: Path, relpaths: Sequence[str], directory: Path, resize: int, workers: int | None = None
) -> ImageCache:
    """Return a valid cache of ``relpaths`` (relative to ``root``) at ``resize``, building it if needed."""
    directory = Path(directory)
    cached = open_cache(directory, root, relpaths, resize)
    if cached is not None:
        log.info("reusing cache %s (%d images)", directory, len(cached))
        return cached
    sources = source_list(root, relpaths)
    files = [str(root / p) for p in relpaths]
    sizes = list(pmap(_header_size, files, desc=f"measure {directory.name}", workers=workers))
    shapes = np.array([resized_size(h, w, resize) for h, w in sizes], dtype=np.int64).reshape(-1, 2)
    nbytes = 3 * shapes[:, 0] * shapes[:, 1]
    offsets = np.concatenate([[0], np.cumsum(nbytes)[:-1]]).astype(np.int64)
    total = int(nbytes.sum())

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.building-", dir=directory.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared by a team
    try:
        pixels = tmp / PIXELS
        with open(pixels, "wb") as f:
            f.truncate(total)  # sparse until written; every byte is overwritten below
        jobs = [
            (src, str(pixels), int(off), int(h), int(w), resize)
            for src, off, (h, w) in zip(files, offsets, shapes, strict=True)
        ]
        for _ in pmap(
            _write_one, jobs, desc=f"cache {directory.parent.name}/{directory.name}", workers=workers
        ):
            pass
        np.save(tmp / INDEX, np.column_stack([offsets, shapes]))
        meta = {"version": CACHE_VERSION, "resize": resize, "root": str(root.resolve()), "sources": sources}
        (tmp / META).write_text(json.dumps(meta))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built cache %s: %d images, %.1f MiB", directory, len(files), total / 2**20)
    return ImageCache(directory)


class CachedCropDataset(Dataset):
    """Square uint8 crops sliced out of an :class:`ImageCache`: ``(uint8 (3, crop, crop), label)``.

    With ``random_crop`` the corner is uniform over all valid positions, as ``v2.RandomCrop``; otherwise
    the crop is centred as ``v2.CenterCrop``. Draws come from ``generator`` in the main process (each
    epoch continues the stream, so crops differ between epochs yet repeat for a given seed) and from the
    per-worker seeded global RNG inside DataLoader worker processes (a copied generator would repeat
    the same draws in every worker).
    """

    def __init__(
        self,
        cache: ImageCache,
        labels: Sequence[int],
        crop: int,
        random_crop: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        if len(labels) != len(cache):
            raise ValueError(f"{len(labels)} labels for {len(cache)} cached images")
        small = np.flatnonzero((cache.shapes < crop).any(axis=1)) if len(cache) else []
        if small.size:
            raise ValueError(
                f"cached images smaller than data.crop={crop}: {[cache.relpaths[i] for i in small[:5]]}"
            )
        self.cache = cache
        self.labels = [int(v) for v in labels]
        self.crop = crop
        self.random_crop = random_crop
        self.generator = generator

    def __len__(self) -> int:
        return len(self.cache)

    def origin(self, i: int) -> tuple[int, int]:
        """(top, left) of the crop of image ``i``: drawn like v2.RandomCrop, or centred."""
        h, w = self.cache.shape(i)
        if not self.random_crop:
            return center_crop_origin(h, w, self.crop)
        generator = self.generator if get_worker_info() is None else None
        u = torch.rand(2, generator=generator).tolist()  # one call for both offsets: half the overhead
        return int(u[0] * (h - self.crop + 1)), int(u[1] * (w - self.crop + 1))

    def crop_at(self, i: int, top: int, left: int) -> torch.Tensor:
        """The (3, crop, crop) uint8 crop of image ``i`` with its corner at (top, left)."""
        img = self.cache.image(i)[:, top : top + self.crop, left : left + self.crop]
        return torch.from_numpy(np.ascontiguousarray(img))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.crop_at(i, *self.origin(i)), self.labels[i]
