"""What the data module measures about a dataset: the training subset (``data.train_fraction``), the
per-channel mean/std of the training split (``data.normalize=dataset``) and the stored image sizes.

Written by hand: the subset is ten lines of numpy (scikit-learn's ``train_test_split(stratify=...)`` would
pull in a dependency for one call, and its subsets of different sizes do not nest), and no library computes
channel statistics over this project's resize cache. Results that cost a pass over the images are kept in
small JSON files beside the resize cache, keyed by the source files (path, size, mtime), so they are
computed once per dataset folder and recomputed only when its files change.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imagenette_lab.data._parallel import pmap
from imagenette_lab.data.archives import write_atomic
from imagenette_lab.data.cache import ImageCache, source_list
from imagenette_lab.data.cache_build import header_size, load_resized
from imagenette_lab.data.sources import file_lock

log = logging.getLogger(__name__)

STATS_VERSION = 1  # bump when the statistic or its file format changes
SUBSET_ENTROPY = 0x5B5E7  # mixed with the run's seed: the subset's draws are independent of every other stream


# ------------------------------------------------------------------------------------------ subset
def stratified_subset(classes: Sequence[str], fraction: float, seed: int) -> list[int]:
    """Indices (sorted) of a seeded, class-stratified ``fraction`` of the items whose classes are ``classes``.

    Each class keeps ``round(fraction * its count)`` items (at least one), the first ones of a seeded
    permutation of that class, so for one seed a smaller fraction is a subset of a larger one.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(
            f"data.train_fraction={fraction!r} must be in (0, 1]: the fraction of each class's training images used"
        )
    rng = np.random.default_rng([seed, SUBSET_ENTROPY])
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(classes):
        by_class.setdefault(c, []).append(i)
    keep: list[int] = []
    for c in sorted(by_class):
        members = np.asarray(by_class[c])
        k = max(1, round(fraction * len(members)))
        keep += members[rng.permutation(len(members))[:k]].tolist()
    return sorted(keep)


# ------------------------------------------------------------------------------------------ cached results
def _sources_digest(root: Path, relpaths: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(source_list(root, relpaths)).encode()).hexdigest()[:16]


def _cached(path: Path, digest: str, compute: Any) -> dict[str, Any]:
    """The record at ``path`` when it was computed from the same sources, else ``compute()`` written there
    (atomically, one writer at a time: parallel jobs sharing ``data_dir`` compute it once)."""

    def read() -> dict[str, Any] | None:
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return rec if rec.get("version") == STATS_VERSION and rec.get("sources") == digest else None

    if (rec := read()) is not None:
        return rec
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".lock")):
        if (rec := read()) is not None:  # computed while we waited
            return rec
        rec = {"version": STATS_VERSION, "sources": digest, **compute()}
        write_atomic(path, json.dumps(rec))
    return rec


# ------------------------------------------------------------------------------------------ mean / std
def _pixel_sums(image: np.ndarray) -> np.ndarray:
    """(3, 2) float64: per channel, the sum and the sum of squares of a (3, h, w) uint8 image in [0, 1]."""
    x = image.reshape(3, -1).astype(np.float64) / 255.0
    return np.stack([x.sum(axis=1), np.square(x).sum(axis=1)], axis=1)


def _resized_sums(job: tuple[str, int]) -> tuple[np.ndarray, int]:
    path, resize = job
    arr = np.asarray(load_resized(path, resize)).transpose(2, 0, 1)
    return _pixel_sums(arr), arr.shape[1] * arr.shape[2]


def channel_stats(
    root: Path, relpaths: Sequence[str], resize: int, record: Path, cache: ImageCache | None = None
) -> dict[str, Any]:
    """Per-channel mean and std (of [0, 1] pixels, pooled over every pixel) of ``relpaths`` after the
    report's Resize(``resize``, shorter side), i.e. of the images the crops are cut from.

    Read from ``cache`` when given (its pixels are those of :func:`load_resized`), else decoded and resized
    in parallel; kept in ``record``. Returns ``{"mean": [3], "std": [3], "images": n, "resize": px}``.
    """

    def compute() -> dict[str, Any]:
        log.info("computing the per-channel mean/std of %d training images at %d px", len(relpaths), resize)
        if cache is not None and cache.relpaths == list(relpaths):
            parts = [(_pixel_sums(cache.image(i)), int(np.prod(cache.shape(i)))) for i in range(len(cache))]
        else:
            parts = list(pmap(_resized_sums, [(str(root / p), resize) for p in relpaths], desc="channel stats"))
        sums = np.sum([s for s, _ in parts], axis=0)
        count = sum(n for _, n in parts)
        mean = sums[:, 0] / count
        std = np.sqrt(np.maximum(sums[:, 1] / count - mean**2, 0.0))
        return {"mean": mean.tolist(), "std": std.tolist(), "images": len(relpaths), "resize": resize}

    return _cached(record, _sources_digest(root, relpaths) + f"-{resize}px", compute)


# ------------------------------------------------------------------------------------------ image sizes
def image_sizes(root: Path, splits: dict[str, Sequence[str]], record: Path) -> dict[str, Any]:
    """Stored image sizes per split, from the file headers: ``{split: {"images": n, "min": [h, w],
    "max": [h, w], "square": fraction of square images}}`` (kept in ``record``)."""
    everything = [p for paths in splits.values() for p in paths]

    def compute() -> dict[str, Any]:
        sizes = dict(zip(everything, pmap(header_size, [str(root / p) for p in everything], desc="image sizes"),
                         strict=True))
        out: dict[str, Any] = {}
        for split, paths in splits.items():
            hw = np.array([sizes[p] for p in paths], dtype=np.int64).reshape(-1, 2)
            if not len(hw):
                continue
            out[split] = {"images": len(hw), "min": hw.min(axis=0).tolist(), "max": hw.max(axis=0).tolist(),
                          "square": float(np.mean(hw[:, 0] == hw[:, 1]))}
        return {"sizes": out}

    return _cached(record, _sources_digest(root, everything), compute)["sizes"]
