"""Where the images come from: dataset specs, official URLs, and the order sources are tried in
(the bytes themselves: :mod:`imagenette_lab.data.archives`).

A dataset folder is resolved in this order (each step is logged):

1. ``data.root``: an already-extracted ``<name>/`` folder (``train/``, ``val/``, ``noisy_*.csv``);
2. ``data.archive``: a local official-layout ``.tgz``, extracted once into ``data.data_dir``;
3. the official fast.ai archive for ``data.variant``, downloaded into ``data.data_dir/downloads``
   and checked against its published size and checksum before it is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from imagenette_lab.data.archives import (
    check_archive,
    download_archive,
    extract_archive,
    published_checks,
    write_atomic,
)
from imagenette_lab.data.errors import (
    ArchiveError,
    ChecksumError,
    MissingArchiveError,
)

log = logging.getLogger(__name__)

OFFICIAL_BASE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/"
VARIANTS = ("full", "320", "160")


@dataclass(frozen=True)
class DatasetSpec:
    """What identifies one of the fast.ai ImageNet subsets."""

    name: str
    classes: dict[str, str]  # WordNet id -> human-readable class name
    csv_name: str  # label CSV at the top of the extracted folder
    stem: str  # archive name stem: <stem>.tgz (full size), <stem>-320.tgz, <stem>-160.tgz

    @property
    def wnids(self) -> list[str]:
        """WordNet ids in label order (sorted, as the folders sort)."""
        return sorted(self.classes)

    @property
    def class_names(self) -> list[str]:
        """Human-readable names in label order."""
        return [self.classes[w] for w in self.wnids]

    def archive_name(self, variant: str) -> str:
        """Official archive file name for ``variant`` (full | 320 | 160)."""
        if variant not in VARIANTS:
            raise ValueError(f"data.variant={variant!r} is not one of {', '.join(VARIANTS)}")
        return f"{self.stem}.tgz" if variant == "full" else f"{self.stem}-{variant}.tgz"

    def url(self, variant: str, mirror: str | None = None) -> str:
        """Download URL of ``variant``, from fast.ai's bucket or a mirror with the same file names."""
        base = mirror if mirror else OFFICIAL_BASE_URL
        return base.rstrip("/") + "/" + self.archive_name(variant)


DATASETS: dict[str, DatasetSpec] = {
    "imagenette": DatasetSpec(
        name="imagenette",
        classes={
            "n01440764": "tench",
            "n02102040": "English springer",
            "n02979186": "cassette player",
            "n03000684": "chain saw",
            "n03028079": "church",
            "n03394916": "French horn",
            "n03417042": "garbage truck",
            "n03425413": "gas pump",
            "n03445777": "golf ball",
            "n03888257": "parachute",
        },
        csv_name="noisy_imagenette.csv",
        stem="imagenette2",
    ),
    # Names are ImageNet's for these synsets (fast.ai's README swaps the two terriers).
    "imagewoof": DatasetSpec(
        name="imagewoof",
        classes={
            "n02086240": "Shih-Tzu",
            "n02087394": "Rhodesian ridgeback",
            "n02088364": "beagle",
            "n02089973": "English foxhound",
            "n02093754": "Border terrier",
            "n02096294": "Australian terrier",
            "n02099601": "golden retriever",
            "n02105641": "Old English sheepdog",
            "n02111889": "Samoyed",
            "n02115641": "dingo",
        },
        csv_name="noisy_imagewoof.csv",
        stem="imagewoof2",
    ),
}


# --------------------------------------------------------------------------------------------- resolve
def file_lock(path: Path) -> FileLock:
    """An exclusive inter-process lock on ``path`` (``filelock.FileLock``), used as ``with file_lock(p):``.

    Parallel sweep jobs share ``data_dir``: the first one extracts, verifies and caches while the
    others wait, then find everything ready instead of deleting each other's half-written folders.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


def _stat_key(path: Path) -> dict[str, object]:
    st = path.stat()
    return {"archive": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _identity_tag(key: dict[str, object]) -> str:
    """Short digest of an archive's (path, size, mtime): names the folder a changed archive goes to."""
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def _content_digest(path: Path) -> str:
    """sha256 of the archive's bytes (~0.3 s for the 126 MiB archive): tells a re-copied or touched archive,
    whose date changed, from a changed one. Computed only when the (path, size, mtime) key no longer matches."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _extracted(marker: Path, key: dict[str, object]) -> Path | None:
    """The folder the marker records for this very archive (path, size, mtime), if it is still there."""
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text())
    folder = marker.parent / record.get("folder", "")
    if {k: record.get(k) for k in key} == key and record.get("folder") and folder.is_dir():
        return folder
    return None


def extract_once(archive: Path, data_dir: Path, prepare: bool = True) -> Path:
    """Extract ``archive`` under ``data_dir`` unless an extraction of this very file is already there.

    A small JSON marker beside the folder records which archive (path, size, mtime, sha256) it came from.
    An archive whose path or date changed but whose bytes did not (a shared disk copied again, a
    ``touch``) reuses the folder, so its caches and verification stay valid. A changed archive is
    extracted into a new folder (see :func:`extract_archive`) and the marker is rewritten atomically to
    name it; the old folder is kept, since running jobs may still read it.
    With ``prepare=False`` nothing is extracted (for ``setup()`` on every rank) and a missing
    extraction is an error.
    """
    marker = data_dir / f"{archive.name}.extracted.json"
    key = _stat_key(archive)
    if (folder := _extracted(marker, key)) is not None:
        log.info("reusing %s (extracted from %s)", folder, archive)
        return folder
    if not prepare:
        raise ArchiveError(f"{archive} has not been extracted into {data_dir}; call prepare_data() first.")
    with file_lock(data_dir / f".{archive.name}.extract.lock"):
        if (folder := _extracted(marker, key)) is not None:  # extracted while we waited
            log.info("reusing %s (extracted from %s)", folder, archive)
            return folder
        record = json.loads(marker.read_text()) if marker.is_file() else {}
        previous, digest = record.get("folder"), _content_digest(archive)
        if previous and record.get("sha256") == digest and (data_dir / previous).is_dir():
            write_atomic(marker, json.dumps({**key, "sha256": digest, "folder": previous}))
            log.info(
                "reusing %s: %s has a new path or date but the same bytes (sha256 %s) as the archive "
                "it was extracted from",
                data_dir / previous,
                archive,
                digest[:16],
            )
            return data_dir / previous
        folder = extract_archive(archive, data_dir, tag=_identity_tag(key))
        write_atomic(marker, json.dumps({**key, "sha256": digest, "folder": folder.name}))
    if previous and previous != folder.name and (data_dir / previous).is_dir():
        log.warning(
            "%s is not the archive %s was extracted from (its bytes differ, or the record has no digest of "
            "them): now using %s. %s is "
            "kept for jobs that may still read it; delete it when none does.",
            archive,
            data_dir / previous,
            folder,
            data_dir / previous,
        )
    return folder


def resolve_source(
    spec: DatasetSpec,
    *,
    root: str | Path | None,
    archive: str | Path | None,
    variant: str,
    data_dir: str | Path,
    mirror: str | None = None,
    prepare: bool = True,
) -> Path:
    """Return the extracted dataset folder, fetching/extracting it first when ``prepare``."""
    data_dir = Path(data_dir).expanduser()
    if root is not None:
        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise MissingArchiveError(
                f"data.root={root} is not a folder. Point it at an extracted {spec.stem}-* folder "
                f"(with train/, val/ and {spec.csv_name}), or set data.root=null to use data.archive "
                f"or the official download."
            )
        log.info("data source: extracted folder data.root=%s", folder)
        return folder
    if archive is not None:
        path = Path(archive).expanduser()
        if not path.is_file():
            raise MissingArchiveError(
                f"data.archive={archive} does not exist. Point it at a local official-layout .tgz "
                f"(e.g. {spec.archive_name(variant)}), or set data.archive=null to download "
                f"{spec.url(variant, mirror)}."
            )
        log.info("data source: local archive data.archive=%s", path)
        if prepare:
            check_archive(path, published_checks(path.name), subject=f"data.archive={path}", name=path.name)
        return extract_once(path, data_dir, prepare=prepare)

    url = spec.url(variant, mirror)
    download = data_dir / "downloads" / spec.archive_name(variant)
    log.info("data source: official download %s (data.variant=%s)", url, variant)
    if prepare:
        expected = published_checks(download.name)
        if download.is_file():
            try:
                check_archive(
                    download, expected, subject=f"the earlier download {download}", name=download.name
                )
            except ChecksumError as err:
                log.warning("%s; downloading it again", err)
                download.unlink()
        if not download.is_file():
            download_archive(url, download, expected)
    elif not download.is_file():
        raise ArchiveError(f"{download} has not been downloaded yet; call prepare_data() first.")
    return extract_once(download, data_dir, prepare=prepare)
