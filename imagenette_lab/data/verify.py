"""Verification of an extracted dataset folder before any training starts.

Two checks, both reporting *everything* wrong at once rather than the first problem:

* layout: ``train/`` and ``val/`` hold exactly the expected class folders, none empty, and the files
  on disk match the label CSV row for row (missing and extra files are listed with per-class counts);
* readability: every image decodes completely (a truncated JPEG is caught here, not mid-epoch).

Decoding 13k JPEGs takes a while, so the outcome per file is kept in a small JSON record keyed by
(size, mtime); a later run only decodes files that changed. On a first cached run the resize cache
build is the decode (``decode_first``): each image is decoded once, not once here and once there.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFile

from imagenette_lab.data._parallel import pmap
from imagenette_lab.data.archives import write_atomic
from imagenette_lab.data.errors import LayoutError
from imagenette_lab.data.sources import DATASETS, DatasetSpec

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
NOISE_LEVELS = (0, 1, 5, 25, 50)  # percent of flipped training labels published in the CSV
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")  # compared lower-case
LIST_LIMIT = 50  # paths shown per problem in an error message; the count is always exact
RECORD_VERSION = 1


@dataclass(frozen=True)
class Row:
    """One image: its CSV row, checked against the folder it sits in."""

    path: str  # relative POSIX path, e.g. train/n01440764/n01440764_10026.JPEG
    split: str  # train | val
    wnid: str  # class folder = clean label
    noisy: dict[int, str] = field(hash=False)  # label-noise percent -> WordNet id from noisy_labels_<N>


@dataclass
class VerifiedDataset:
    """Result of :func:`verify_dataset`: the rows of both splits and the images that failed to decode."""

    root: Path
    rows: list[Row]
    unreadable: dict[str, str]  # relative path -> decoder error

    def split(self, name: str) -> list[Row]:
        """Rows of ``name`` (train | val), sorted by path."""
        return [r for r in self.rows if r.split == name]


def _listing(paths: list[str]) -> str:
    shown = "\n  ".join(paths[:LIST_LIMIT])
    more = f"\n  ... and {len(paths) - LIST_LIMIT} more" if len(paths) > LIST_LIMIT else ""
    return f"\n  {shown}{more}"


def read_label_csv(csv_path: Path, spec: DatasetSpec) -> list[Row]:
    """Parse the official ``noisy_*.csv``; every problem in it is reported together."""
    wanted = ["path", *(f"noisy_labels_{n}" for n in NOISE_LEVELS), "is_valid"]
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing_cols = [c for c in wanted if c not in (reader.fieldnames or [])]
        if missing_cols:
            raise LayoutError(
                f"{csv_path} lacks the column(s) {missing_cols} (it has {reader.fieldnames}). Use the "
                f"official {spec.csv_name} that ships inside the archive."
            )
        rows, problems = [], []
        for line, rec in enumerate(reader, start=2):
            parts = rec["path"].split("/")
            split = "val" if rec["is_valid"] == "True" else "train" if rec["is_valid"] == "False" else None
            noisy = {n: rec[f"noisy_labels_{n}"] for n in NOISE_LEVELS}
            if len(parts) != 3 or parts[0] not in SPLITS:
                problems.append(f"line {line}: path {rec['path']!r} is not <train|val>/<wnid>/<file>")
            elif split != parts[0]:
                problems.append(f"line {line}: is_valid={rec['is_valid']!r} but the path is in {parts[0]}/")
            elif parts[1] != noisy[0]:
                problems.append(f"line {line}: noisy_labels_0={noisy[0]} but the file is in {parts[1]}/")
            elif unknown := sorted({w for w in noisy.values() if w not in spec.classes}):
                problems.append(f"line {line}: label(s) {unknown} are not {spec.name} classes")
            else:
                rows.append(Row(path=rec["path"], split=split, wnid=parts[1], noisy=noisy))
    if problems:
        raise LayoutError(
            f"{csv_path} has {len(problems)} bad row(s); restore the official {spec.csv_name} "
            f"(re-extract the archive):" + _listing(problems)
        )
    return sorted(rows, key=lambda r: r.path)


def scan_files(root: Path) -> list[str]:
    """Relative paths of all image files under ``root/train`` and ``root/val``."""
    found = []
    for split in SPLITS:
        for dirpath, _, names in os.walk(root / split):
            rel = Path(dirpath).relative_to(root).as_posix()
            found.extend(f"{rel}/{n}" for n in names if n.lower().endswith(IMAGE_SUFFIXES))
    return sorted(found)


def check_layout(root: Path, spec: DatasetSpec, num_classes: int) -> list[Row]:
    """Check class folders and files against the label CSV; return the CSV rows (sorted by path)."""
    csv_path = root / spec.csv_name
    need = [root / s for s in SPLITS if not (root / s).is_dir()]
    if need:
        raise LayoutError(
            f"{root} is not an official {spec.name} folder: missing {', '.join(map(str, need))}. Expected "
            f"train/<wnid>/*.JPEG, val/<wnid>/*.JPEG and {spec.csv_name}; re-extract the official archive "
            f"or point data.root at the folder that contains them."
        )
    files = scan_files(root)
    per_folder = Counter(p.rsplit("/", 1)[0] for p in files)
    problems, other = [], None
    for split in SPLITS:
        folders = sorted(d.name for d in (root / split).iterdir() if d.is_dir())
        for candidate in DATASETS.values():
            if candidate.name != spec.name and set(folders) == set(candidate.classes):
                other = candidate.name
        if len(folders) != num_classes:
            problems.append(f"{split}/ has {len(folders)} class folders but data.num_classes={num_classes}")
        if unknown := [w for w in folders if w not in spec.classes]:
            problems.append(f"{split}/ has folders {unknown} that are not {spec.name} classes")
        if absent := [w for w in spec.wnids if w not in folders]:
            problems.append(f"{split}/ lacks the class folders {absent}")
        if empty := [f"{split}/{w}" for w in folders if per_folder[f"{split}/{w}"] == 0]:
            problems.append(f"empty class folder(s) {empty}: they hold no images")
    if problems:
        hint = f" (these are {other} folders: set data={other})" if other else ""
        raise LayoutError(
            f"{root} fails the {spec.name} class-folder check{hint}; re-extract the official archive:"
            + _listing(problems)
        )

    if not csv_path.is_file():
        raise LayoutError(
            f"{root} lacks its label file {csv_path.name}; re-extract the official archive (the CSV ships "
            f"inside it) or copy the official {spec.csv_name} next to train/ and val/."
        )
    rows = read_label_csv(csv_path, spec)
    listed = {r.path for r in rows}
    on_disk = set(files)
    missing, extra = sorted(listed - on_disk), sorted(on_disk - listed)
    if missing or extra:
        expected = Counter(r.path.rsplit("/", 1)[0] for r in rows)
        counts = [
            f"{k}: {expected[k]} in the CSV, {per_folder[k]} on disk"
            for k in sorted(set(expected) | set(per_folder))
            if expected[k] != per_folder[k]
        ]
        raise LayoutError(
            f"{root} disagrees with {spec.csv_name}: {len(missing)} file(s) listed in the CSV are missing "
            f"and {len(extra)} file(s) on disk are not in the CSV. Re-extract the archive (delete {root} "
            f"and its .extracted.json marker) or restore the official CSV.\nCounts per split/class:"
            + _listing(counts)
            + ("\nMissing:" + _listing(missing) if missing else "")
            + ("\nExtra:" + _listing(extra) if extra else "")
        )
    return rows


@contextmanager
def strict_decoding() -> Iterator[None]:
    """Pillow decodes truncated files silently when another library set this flag; force strictness."""
    previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what a bad file raises


def complaint(err: BaseException) -> str:
    """The decoder's complaint as recorded and shown to the user."""
    return f"{type(err).__name__}: {err}"


def probe_image(path: str) -> str | None:
    """Decode ``path`` completely; return the decoder's complaint, or None when the image is fine."""
    try:
        with strict_decoding(), Image.open(path) as im:
            im.load()
            if im.width < 1 or im.height < 1:
                return "empty image"
    except DECODE_ERRORS as err:
        return complaint(err)
    return None


def _record_path(record_dir: Path, root: Path) -> Path:
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    return record_dir / f"{root.name}-{digest}.json"


class DecodeRecord:
    """Decode outcomes of one dataset folder's images, remembered per file by (size, mtime).

    ``outcome`` maps each relative path whose outcome is known to None (decodes) or the decoder's
    complaint; ``todo`` lists the files never decoded or changed since. Whoever decodes them (the plain
    probe below, or a cache build: :func:`imagenette_lab.data.cache_build.caching_decoder`) reports
    through :meth:`update`; :meth:`save` writes the record for the next run.
    """

    def __init__(self, root: Path, relpaths: list[str], record_dir: Path) -> None:
        self.root, self.relpaths, self.path = root, relpaths, _record_path(record_dir, root)
        old: dict[str, list] = {}
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            if data.get("version") == RECORD_VERSION and data.get("root") == str(root.resolve()):
                old = data["files"]
        self.stats = {}
        for p in relpaths:
            st = (root / p).stat()
            self.stats[p] = (st.st_size, st.st_mtime_ns)
        self.outcome: dict[str, str | None] = {
            p: old[p][2] for p, s in self.stats.items() if p in old and tuple(old[p][:2]) == s
        }
        self._dirty = set(old) != set(self.stats)

    @property
    def todo(self) -> list[str]:
        """Files whose decode outcome is not known yet, in path order."""
        return [p for p in self.relpaths if p not in self.outcome]

    def update(self, outcomes: dict[str, str | None]) -> None:
        """Record decode outcomes (None = decodes, else the complaint) of files of this folder."""
        self.outcome.update(outcomes)
        self._dirty = True

    def save(self) -> None:
        """Write the known outcomes when they changed (atomically: a crash never leaves a torn record)."""
        if self._dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            files = {p: [*self.stats[p], self.outcome[p]] for p in self.relpaths if p in self.outcome}
            record = {"version": RECORD_VERSION, "root": str(self.root.resolve()), "files": files}
            write_atomic(self.path, json.dumps(record))
            self._dirty = False

    def unreadable(self) -> dict[str, str]:
        """Relative path -> decoder complaint, for every file known not to decode."""
        return {p: err for p, err in self.outcome.items() if err is not None}


def find_unreadable(
    record: DecodeRecord, workers: int | None = None, known: str = "unchanged since the last verification"
) -> dict[str, str]:
    """Decode every image of ``record`` whose outcome is unknown; save it; return path -> complaint.
    ``known`` says, in the log, why no image is left to decode."""
    root, todo = record.root, record.todo
    if todo:
        log.info("decoding %d of %d images under %s", len(todo), len(record.relpaths), root)
        results = pmap(
            probe_image, [str(root / p) for p in todo], desc=f"verify {root.name}", workers=workers
        )
        record.update(dict(zip(todo, results, strict=True)))
    else:
        log.info("all %d images under %s %s", len(record.relpaths), root, known)
    record.save()
    return record.unreadable()


# A decoder that runs before the plain probe: it receives the checked rows and a record whose ``todo`` is
# not empty, decodes what it can and reports through ``record.update`` (see DecodeRecord).
DecodeFirst = Callable[[list[Row], DecodeRecord], None]


def verify_dataset(
    root: Path,
    spec: DatasetSpec,
    num_classes: int,
    record_dir: Path,
    workers: int | None = None,
    decode_first: DecodeFirst | None = None,
) -> VerifiedDataset:
    """Layout check, then a full decode of every image (remembered per file); see the module docstring.

    ``decode_first``, when given and some image has no known outcome, decodes first (the resize cache
    build decodes every image anyway: its outcomes make a second decode here unnecessary).
    """
    rows = check_layout(root, spec, num_classes)
    record = DecodeRecord(root, [r.path for r in rows], record_dir)
    known = "unchanged since the last verification"
    if decode_first is not None and record.todo:
        decode_first(rows, record)
        record.save()
        known = "decoded by the resize cache build"
    unreadable = find_unreadable(record, workers, known)
    counts = Counter(r.split for r in rows)
    log.info(
        "verified %s: %d train + %d val images, %d unreadable",
        root,
        counts["train"],
        counts["val"],
        len(unreadable),
    )
    return VerifiedDataset(root=root, rows=rows, unreadable=unreadable)
