"""The resize cache under concurrency and crashes: real processes, real images (the mini archive).

Two versions of half the mini validation split alternate on disk (the second has ten images re-cut to other
sizes, so every later offset moves): a reader that paired one version's pixels with the other's index,
or read a half-written build, would see bytes that match neither version's reference. The references
are computed here, image by image, with the reference resize; the cache code is only under test.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tqdm.auto import tqdm

from imagenette_lab.data import cache_build as builder
from imagenette_lab.data.cache import LOCK, POINTER, ImageCache, current_cache, open_cache
from imagenette_lab.data.cache_build import build_cache, load_resized

RESIZE = 64  # px: small, so that a build takes a fraction of a second on one core
CHANGED = 10  # images re-cut in the second version
FORK = multiprocessing.get_context("fork")


class Versions:
    """Two versions of the mini validation split and, for each, the pixels a correct cache holds."""

    def __init__(self, root: Path, stash: Path) -> None:
        self.root = root
        # half the validation split (5 images per class): enough to race, quick to rebuild
        self.relpaths = sorted(p.relative_to(root).as_posix() for p in root.glob("val/*/*.JPEG"))[::2]
        changed = self.relpaths[5 : 5 + 3 * CHANGED : 3]
        for version in ("a", "b"):
            for k, rel in enumerate(changed):
                dest = stash / version / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                image = Image.open(root / rel).convert("RGB")
                if version == "b":  # another size and aspect ratio
                    image = image.crop((0, 0, 224 - 9 * k, 120 + 7 * k))
                image.save(dest, quality=90)
        self.stash, self.changed = stash, changed
        self.pixels: dict[str, np.ndarray] = {}
        self.index: dict[str, np.ndarray] = {}
        for version in ("a", "b"):
            self.apply(version)
            arrays = [
                np.asarray(load_resized(root / rel, RESIZE)).transpose(2, 0, 1) for rel in self.relpaths
            ]
            sizes = [a.size for a in arrays]
            offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            self.pixels[version] = np.concatenate([a.ravel() for a in arrays])
            self.index[version] = np.array([[o, *a.shape[1:]] for o, a in zip(offsets, arrays, strict=True)])
        assert not np.array_equal(self.index["a"][-1], self.index["b"][-1])  # the layouts really differ

    def apply(self, version: str) -> None:
        """Put ``version`` of the changed images in place, each file replaced atomically."""
        for rel in self.changed:
            tmp = self.root / f"{rel}.tmp"
            shutil.copyfile(self.stash / version / rel, tmp)
            os.replace(tmp, self.root / rel)

    def which(self, cache: ImageCache) -> str | None:
        """The version whose exact pixels and index ``cache`` holds, or None (a mixed or half cache)."""
        for version in ("a", "b"):
            index = np.column_stack([cache.offsets, cache.shapes])
            if np.array_equal(index, self.index[version]) and np.array_equal(
                cache.pixels, self.pixels[version]
            ):
                return version
        return None


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory, mini_root: Path) -> Versions:
    """Shared by the tests of this module: each one puts the version it starts from in place."""
    base = tmp_path_factory.mktemp("versions")
    root = base / mini_root.name
    shutil.copytree(mini_root, root)
    return Versions(root, base / "stash")


def _rebuild_repeatedly(versions: Versions, slot: Path, rounds: int) -> None:
    for r in range(rounds):
        versions.apply("ab"[(r + 1) % 2])
        build_cache(versions.root, versions.relpaths, slot, RESIZE, workers=1)


def _read_until(
    versions: Versions, slot: Path, ready: EventType, done: Path, report: multiprocessing.Queue
) -> None:
    held = current_cache(slot)  # kept open for the whole run, as a training job keeps its cache
    ready.set()
    seen: dict[str, str | None] = {}
    missing = 0
    while not done.exists():
        cache = current_cache(slot)
        if cache is None:
            missing += 1
            continue
        seen.setdefault(cache.directory.name, versions.which(cache))
        if versions.which(cache) != seen[cache.directory.name]:
            seen[cache.directory.name] = "changed under the reader"
    report.put((seen, missing, held.directory.name, held.directory.is_dir(), versions.which(held)))


@pytest.mark.timeout(300)  # s: a deadlock fails the test instead of hanging the suite
def test_reader_never_sees_a_mixed_or_missing_cache_while_another_process_rebuilds(
    tmp_path: Path, versions: Versions
) -> None:
    slot = tmp_path / "cache" / "val-64px"
    versions.apply("a")
    first = build_cache(versions.root, versions.relpaths, slot, RESIZE, workers=1)
    assert versions.which(first) == "a"
    first_name = first.directory.name
    del first
    ready, done, report = FORK.Event(), tmp_path / "done", FORK.Queue()
    reader = FORK.Process(target=_read_until, args=(versions, slot, ready, done, report))
    reader.start()
    assert ready.wait(timeout=60)  # the reader holds the first build before the rebuilds start
    writer = FORK.Process(target=_rebuild_repeatedly, args=(versions, slot, 8))
    writer.start()
    writer.join(timeout=300)
    done.touch()
    seen, missing, held, held_exists, held_version = report.get(timeout=120)
    reader.join(timeout=60)
    assert writer.exitcode == 0 and reader.exitcode == 0
    assert missing == 0  # a published cache never disappears from under a reader, not even for an instant
    bad = {name: v for name, v in seen.items() if v not in ("a", "b")}
    assert bad == {}, f"builds seen mixed, half-written or changing: {bad}"
    assert len(seen) >= 4 and set(seen.values()) == {"a", "b"}  # really raced against several rebuilds
    # the build the reader kept mapped was not pruned, and still holds its own version's pixels
    assert held == first_name and held_exists and held_version == "a"
    # the last build is the writer's (version "a" after 8 rounds) and the reader's old builds are gone now
    final = open_cache(slot, versions.root, versions.relpaths, RESIZE)
    assert final is not None and versions.which(final) == "a"
    del final
    gc.collect()
    versions.apply("b")
    last = build_cache(versions.root, versions.relpaths, slot, RESIZE, workers=1)
    assert {p.name for p in slot.iterdir()} - {LOCK} == {POINTER, last.directory.name}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at(point: str) -> None:
    """Patch the build (in this child process only) to die by SIGKILL at ``point``."""
    m = builder
    if point == "mid-pixels":
        original_write, calls = m._write_one, []

        def write_some(job: tuple) -> None:
            calls.append(job)
            if len(calls) == 50:
                _die()
            original_write(job)

        m._write_one = write_some
    elif point == "before-meta":
        original_fsync_write = m._fsync_write

        def write_until_meta(path: Path, data: bytes) -> None:
            if path.name == m.META:
                _die()
            original_fsync_write(path, data)

        m._fsync_write = write_until_meta
    elif point in ("before-pointer", "after-pointer"):
        original_atomic: Callable[[Path, str], None] = m.write_atomic

        def swap(path: Path, text: str) -> None:
            if point == "after-pointer":
                original_atomic(path, text)
            _die()

        m.write_atomic = swap
    elif point == "mid-prune":  # half of a superseded build deleted
        original_remove = m._remove_build

        def remove_half(folder: Path) -> None:
            if (folder / m.META).exists() and m.published_build(folder.parent) != folder.name:
                (folder / m.META).unlink()
                _die()
            original_remove(folder)

        m._remove_build = remove_half


def _build(versions: Versions, slot: Path, point: str | None) -> None:
    # A private progress-bar lock: tqdm's default one is shared with the parent through fork, and a
    # builder killed while holding it would leave the parent waiting for it forever.
    tqdm.set_lock(threading.RLock())
    if point is not None:
        _kill_at(point)
    build_cache(versions.root, versions.relpaths, slot, RESIZE, workers=1)


@pytest.mark.timeout(120)  # s: a deadlock fails the test instead of hanging the suite
@pytest.mark.parametrize(
    ("point", "prior"),
    [
        ("mid-pixels", True),
        ("before-meta", True),
        ("before-pointer", True),
        ("after-pointer", True),
        ("mid-prune", True),
        ("mid-pixels", False),
        ("random", True),
    ],
)
def test_killed_build_leaves_the_old_cache_or_none(
    tmp_path: Path, versions: Versions, point: str, prior: bool
) -> None:
    slot = tmp_path / "cache" / "val-64px"
    old_name = None
    if prior:
        versions.apply("a")
        old = build_cache(versions.root, versions.relpaths, slot, RESIZE, workers=1)
        old_name = old.directory.name
        del old
        gc.collect()
    versions.apply("b")
    delays = [0.03, 0.1, 0.2] if point == "random" else [None]
    for delay in delays:  # "random": the parent kills the builder after a delay, wherever it is then
        child = FORK.Process(target=_build, args=(versions, slot, point if delay is None else None))
        child.start()
        if delay is not None:
            time.sleep(delay)
            os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=120)
        assert child.exitcode in ((-signal.SIGKILL,) if delay is None else (-signal.SIGKILL, 0))

        # whatever is published is one complete version: the old one, the new one, or nothing at all
        published = current_cache(slot)
        if published is None:
            assert not prior
        else:
            version = versions.which(published)
            assert version is not None
            if point in ("after-pointer", "mid-prune"):
                assert version == "b"
            elif point != "random":
                assert version == "a" and published.directory.name == old_name
        # and only a complete build of the current sources passes the check
        valid = open_cache(slot, versions.root, versions.relpaths, RESIZE)
        assert valid is None or versions.which(valid) == "b"
        del published, valid
        gc.collect()

    # the next build recovers and clears every leftover of the crash
    fresh = build_cache(versions.root, versions.relpaths, slot, RESIZE, workers=1)
    assert versions.which(fresh) == "b"
    assert {p.name for p in slot.iterdir()} - {LOCK} == {POINTER, fresh.directory.name}
