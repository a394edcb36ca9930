"""Archives on disk: published fingerprints, download, safe extraction, and durable writes.

Split out of :mod:`imagenette_lab.data.sources` (which decides *where* a dataset comes from); this module
only moves and checks bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm.auto import tqdm

from imagenette_lab.data.errors import (
    ArchiveError,
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
)

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # bytes read/written per step while downloading or hashing


@dataclass(frozen=True)
class ArchiveCheck:
    """fast.ai's published fingerprint of an archive: its size and the md5 of its first MiB.

    This is the format of fastai's ``download_checks.py`` (computed by ``fastdownload.path_stats``);
    the size catches truncated downloads, the head md5 catches a different file under the same name.
    """

    size: int  # bytes
    md5_head: str  # hex md5 of the first 2**20 bytes

    @classmethod
    def of(cls, path: Path) -> ArchiveCheck:
        """Fingerprint a local file the same way."""
        with open(path, "rb") as f:
            head = f.read(CHUNK_BYTES)
        return cls(size=os.path.getsize(path), md5_head=hashlib.md5(head).hexdigest())


# Published checks, from fastai/fastai ``fastai/data/download_checks.py`` (current) and the earlier
# ``fastai/data/checks.txt``: the archives were re-uploaded once, so both published fingerprints are
# accepted (an old download is still the official data).
_PUBLISHED_CHECKS: dict[str, tuple[ArchiveCheck, ...]] = {
    "imagenette2.tgz": (
        ArchiveCheck(1557161267, "2c774ecb40005b35d7937d50f5d42336"),
        ArchiveCheck(1556914727, "5103dc075392e9e6a7bc92653a88c3cd"),
    ),
    "imagenette2-320.tgz": (
        ArchiveCheck(341663724, "1f1f74f133caff120e575856659b87a2"),
        ArchiveCheck(341553947, "55496feff4562875a3246d819d094b2b"),
    ),
    "imagenette2-160.tgz": (
        ArchiveCheck(99003388, "c475f8f7617a200ba35b9facc48443c3"),
        ArchiveCheck(98948031, "e28cd4207d545c64f2372bcb64753d01"),
    ),
    "imagewoof2.tgz": (
        ArchiveCheck(1343715595, "2cc1c1e36e20cb6fd24ffb978edcb487"),
        ArchiveCheck(1343482285, "7314775a4af7c979910455baec7e6c46"),
    ),
    "imagewoof2-320.tgz": (
        ArchiveCheck(328387740, "7a1fd92672a559a85de76e4810a20c21"),
        ArchiveCheck(328288506, "e24c62362b2594f2d1f3ce5f9e7ee18d"),
    ),
    "imagewoof2-160.tgz": (
        ArchiveCheck(92612825, "3559b194123981a540b87132dbda412f"),
        ArchiveCheck(92560471, "8cd8964848106c00af3c087330af9057"),
    ),
}


def published_checks(file_name: str) -> tuple[ArchiveCheck, ...]:
    """Published fingerprints for an official archive file name (empty for anything else)."""
    return _PUBLISHED_CHECKS.get(file_name, ())


def check_archive(path: Path, expected: tuple[ArchiveCheck, ...], subject: str, name: str) -> None:
    """Raise :class:`ChecksumError` unless ``path`` matches one of ``expected`` (no-op when empty).

    ``subject`` says what the file is in the error message, ``name`` which official archive it claims to be.
    """
    if not expected:
        return
    got = ArchiveCheck.of(path)
    if got in expected:
        return
    want = " or ".join(f"{c.size} bytes / md5(first MiB) {c.md5_head}" for c in expected)
    raise ChecksumError(
        f"{subject} does not match the published checksum of {name}: got {got.size} bytes / "
        f"md5(first MiB) {got.md5_head}, expected {want}. The file is incomplete or not the official "
        f"release: delete it and download again, or point data.archive=PATH at a good copy."
    )


# --------------------------------------------------------------------------------------------- disk
def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (folders: a no-op on Windows, which cannot open them)."""
    if os.name == "nt" and path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Put every file and folder under ``root`` on disk (before the folder is renamed into sight).

    One ``os.sync()`` where it exists: an ``fsync`` per file of a 13k-image dataset costs several times
    the extraction itself, a single sync a fraction of it.
    """
    if hasattr(os, "sync"):
        os.sync()
        return
    for dirpath, _, names in os.walk(root):
        for path in (Path(dirpath) / name for name in names):
            if not path.is_symlink():  # a link's target is fsynced as the file it is
                fsync_path(path)
        fsync_path(Path(dirpath))


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader (or a crash) sees the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


# --------------------------------------------------------------------------------------------- download
def download_archive(url: str, dest: Path, expected: tuple[ArchiveCheck, ...] = ()) -> Path:
    """Download ``url`` to ``dest`` through a temporary file, renamed only once complete and verified.

    Written by hand because ``torchvision.datasets.utils.download_url`` writes straight to the final
    path, so an interrupted download would look like a finished one.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:  # timeout in seconds
                    length = response.headers.get("Content-Length")
                    total = int(length) if length else None
                    received = 0
                    with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                        while chunk := response.read(CHUNK_BYTES):
                            out.write(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
            except (urllib.error.URLError, OSError, ValueError) as err:
                raise DownloadError(
                    f"downloading {url} failed ({err}). Without internet access, download it elsewhere and "
                    f"pass the local copy with data.archive=PATH."
                ) from err
            out.flush()
            os.fsync(out.fileno())  # on disk before the rename below makes it look complete
            if total is not None and received != total:
                raise DownloadError(
                    f"downloading {url} stopped after {received} of {total} bytes. Try again, or pass a "
                    f"local copy with data.archive=PATH."
                )
        check_archive(tmp, expected, subject=f"the file downloaded from {url}", name=dest.name)
        tmp.chmod(0o644)  # mkstemp makes it owner-only; a finished download is an ordinary file
        os.replace(tmp, dest)
        fsync_path(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("downloaded %s -> %s", url, dest)
    return dest


# --------------------------------------------------------------------------------------------- extract
def _normalized_parts(name: str) -> tuple[str, ...]:
    """Path parts of a member name without leading ``./`` (tar tools write both forms)."""
    parts = PurePosixPath(name).parts
    while parts and parts[0] == ".":
        parts = parts[1:]
    return parts


def unsafe_members(members: list[tarfile.TarInfo], dest: Path) -> list[str]:
    """Members that would be written (or link) outside ``dest``, or are device files.

    ``tarfile``'s ``filter="data"`` refuses these too, but one at a time and mid-extraction; listing
    them all first means nothing is written from a hostile archive and the error names every culprit.
    """
    root = os.path.abspath(dest)

    def outside(path: str) -> bool:
        return os.path.commonpath([root, os.path.abspath(path)]) != root

    bad = []
    for m in members:
        target = os.path.join(root, m.name)
        if os.path.isabs(m.name) or outside(target):
            bad.append(f"{m.name} (outside the target folder)")
        elif m.issym() and outside(os.path.join(os.path.dirname(target), m.linkname)):
            bad.append(f"{m.name} -> {m.linkname} (symlink leaving the target folder)")
        elif m.islnk() and outside(os.path.join(root, m.linkname)):
            bad.append(f"{m.name} -> {m.linkname} (hard link leaving the target folder)")
        elif m.isdev():
            bad.append(f"{m.name} (device or fifo)")
    return bad


@contextlib.contextmanager
def _open_tar(archive: Path) -> Iterator[tuple[tarfile.TarFile, BinaryIO]]:
    with open(archive, "rb") as raw:
        try:
            # not a with-statement: opening is the step that fails on a non-archive; closed below
            tar = tarfile.open(fileobj=raw, mode="r:*")  # noqa: SIM115
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise ArchiveError(
                f"{archive} is not a readable tar archive ({err}). Point data.archive=PATH at an "
                f"official-layout .tgz such as imagenette2-320.tgz."
            ) from err
        with tar:
            yield tar, raw


def _truncated(archive: Path, err: BaseException) -> ArchiveError:
    return ArchiveError(
        f"{archive} is truncated or corrupt ({type(err).__name__}: {err}). Delete it and download it "
        f"again, or point data.archive=PATH at a complete copy."
    )


def extract_archive(archive: Path, dest_parent: Path, tag: str | None = None) -> Path:
    """Extract an official-layout archive into ``dest_parent/<top folder>`` and return that folder.

    Members are listed and checked first; extraction goes to a temporary sibling folder, is flushed to
    disk and renamed into place only when complete, so a crash never leaves a half-extracted dataset
    behind. An existing folder is never replaced (other jobs may be reading it): when ``<top>`` is
    taken, the archive goes to ``<top>.<tag>`` instead (``tag`` names the archive's identity), and an
    existing ``<top>.<tag>`` is an earlier complete extraction of that very archive, returned as it is.
    """
    dest_parent.mkdir(parents=True, exist_ok=True)
    size = archive.stat().st_size
    with _open_tar(archive) as (tar, raw):
        members: list[tarfile.TarInfo] = []
        try:
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"scan {archive.name}") as bar:
                for member in tar:
                    members.append(member)
                    bar.update(raw.tell() - bar.n)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise _truncated(archive, err) from err

        # checked against a stand-in for the (not yet created) extraction folder inside dest_parent
        bad = unsafe_members(members, dest_parent / ".extract-target")
        if bad:
            raise UnsafeArchiveError(
                f"{archive} has {len(bad)} member(s) that would land outside the extraction folder; "
                f"nothing was extracted. Use an official archive. Offending members: " + "; ".join(bad),
                bad,
            )
        tops = {parts[0] for m in members if (parts := _normalized_parts(m.name))}
        if len(tops) != 1:
            raise ArchiveError(
                f"{archive} must hold exactly one top folder (like imagenette2-320/ with train/, val/ and "
                f"the label CSV) but its top level is {sorted(tops)}. Repack it in the official layout."
            )
        top = tops.pop()
        final = dest_parent / top
        if final.exists():
            if tag is None:
                raise ArchiveError(
                    f"{final} already exists and is not replaced (a job may be reading it); delete it "
                    f"when no job uses it, or extract into another folder."
                )
            final = dest_parent / f"{top}.{tag}"
            if final.is_dir():
                log.info("reusing %s, an earlier complete extraction of %s", final, archive)
                return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{top}.extracting-", dir=dest_parent))
        try:
            try:
                tar.extractall(tmp, members=tqdm(members, desc=f"extract {archive.name}"), filter="data")
            except (tarfile.TarError, EOFError, zlib.error) as err:
                raise _truncated(archive, err) from err
            fsync_tree(tmp / top)  # the rename below must never publish files still in the page cache
            # os.replace of a folder onto an existing non-empty one fails: nothing is ever overwritten
            os.replace(tmp / top, final)
            fsync_path(dest_parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("extracted %s -> %s (%d members)", archive, final, len(members))
    return final
