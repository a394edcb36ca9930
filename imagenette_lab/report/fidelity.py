"""Where a page's numbers come from and where they depart from the report: the data a result came from,
how the sweep was run (``provenance.jsonl``) and the departures every page shares.

A result's archive matters as much as its config: the offline ``imagenette2-224.tgz`` stores every image
squashed to 224×224 (aspect ratio lost), so a resize above 224 px only upsamples it, whereas the official
archives keep the originals' shape. Each page therefore names the archive (file name only: never a path of
the machine), the extracted folder, the image counts and data digest that ``run.py`` records in each
``metrics.json`` (its ``data`` block), the stored image sizes (measured, when recorded, else the known
facts of the archive below) and what they imply for the swept resizes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagenette_lab.provenance import PROJECT_ROOT, PROVENANCE_FILE  # provenance: one JSON line per multirun

from .runs import Run


@dataclass(frozen=True)
class ArchiveFacts:
    """What is known of a published archive's images, before any run measures them."""

    stored: str  # how its images are stored
    square_px: int | None = None  # every image squashed to this square side (px); None = aspect ratio kept


# Keyed by the archive's stem (= its top folder). The official ones are fast.ai's; the others are the offline
# copies in ../shared/datasets (their README.md says how they were made).
ARCHIVES: dict[str, ArchiveFacts] = {
    "imagenette2": ArchiveFacts("official full-size originals, aspect ratio kept (typically 200-500 px a side)"),
    "imagenette2-320": ArchiveFacts("official, shorter side 320 px, aspect ratio kept"),
    "imagenette2-160": ArchiveFacts("official, shorter side 160 px, aspect ratio kept"),
    "imagenette2-224": ArchiveFacts("third-party copy: every image squashed to 224×224, aspect ratio lost", 224),
    "imagenette2-224-mini": ArchiveFacts("300-image test subset of the 224×224 squashed copy", 224),
    "imagenette2-128": ArchiveFacts(
        "third-party copy: every image squashed to 128×128 (bicubic) and re-encoded at JPEG quality 72", 128
    ),
    "imagewoof2": ArchiveFacts("official full-size originals, aspect ratio kept"),
    "imagewoof2-320": ArchiveFacts("official, shorter side 320 px, aspect ratio kept"),
    "imagewoof2-160": ArchiveFacts("official, shorter side 160 px, aspect ratio kept"),
}
_EXTRACTION_ID = re.compile(r"\.[0-9a-f]{6,}$")  # a changed archive is extracted to <name>.<id>/
_ABS_PATH = re.compile(r"(?<![\w.~-])/[^\s'\",;]+")


def no_machine_paths(text: str) -> str:
    """``text`` with absolute paths made relative to the project (``../shared/...``) or, outside the
    project's parent folder, cut to ``…/<file name>``: committed pages never show a machine's paths."""
    parent = PROJECT_ROOT.parent

    def fix(match: re.Match[str]) -> str:
        path = Path(match.group(0))
        if path == PROJECT_ROOT or PROJECT_ROOT in path.parents:
            return path.relative_to(PROJECT_ROOT).as_posix() or "."
        if parent in path.parents:
            return "../" + path.relative_to(parent).as_posix()
        return f"…/{path.name}"

    return _ABS_PATH.sub(fix, text)


def source_of(run: Run) -> str:
    """Where a run's images came from, without machine paths: the archive's file name, the folder given as
    ``data.root``, or the official download of ``data.variant``."""
    archive, root = run.config("data.archive"), run.config("data.root")
    if archive:
        return f"archive `{Path(str(archive)).name}`"
    if root:
        return f"folder `{Path(str(root)).name}` (data.root)"
    variant = str(run.config("data.variant") or "320")
    dataset = str(run.config("data.dataset") or "imagenette")
    return f"official download `{dataset}2{'' if variant == 'full' else '-' + variant}.tgz`"


def facts_of(run: Run) -> ArchiveFacts | None:
    """The known facts of the run's archive, by its extracted folder's name (or the archive's file name)."""
    folder = str((run.metrics.get("data") or {}).get("folder") or "")
    archive = Path(str(run.config("data.archive") or "")).name.removesuffix(".tgz").removesuffix(".tar.gz")
    for name in (_EXTRACTION_ID.sub("", folder), archive):
        if name in ARCHIVES:
            return ARCHIVES[name]
    return None


def _sizes(sizes: dict[str, Any]) -> str:
    parts = []
    for split, s in sizes.items():
        (h0, w0), (h1, w1) = s.get("min", (0, 0)), s.get("max", (0, 0))
        shape = f"{h0}×{w0}" if (h0, w0) == (h1, w1) else f"{h0}-{h1} × {w0}-{w1}"
        parts.append(f"{split} {shape} px (h×w, {s.get('square', 0):.0%} square)")
    return "; ".join(parts)


def _largest_resize(runs: Sequence[Run]) -> int:
    sizes = [int(r.config("data.resize") or 0) for r in runs]
    return max(sizes, default=0)


def data_lines(runs: Sequence[Run]) -> list[str]:
    """One Markdown bullet per distinct data source of ``runs``: archive, folder, counts, digest, stored
    image sizes, and what they imply for the resizes this page swept."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.status != "missing":
            groups.setdefault((source_of(run), str((run.metrics.get("data") or {}).get("digest", "?"))), []).append(run)
    lines = []
    for (source, digest), group in groups.items():
        data = next((r.metrics.get("data") for r in group if r.metrics.get("data")), None) or {}
        images = data.get("images") or {}
        counts = " / ".join(f"{n:,} {split}" for split, n in images.items()) or "image counts not recorded"
        facts = facts_of(group[0])
        measured = data.get("sizes")
        stored = _sizes(measured) if measured else (facts.stored if facts else "stored sizes not recorded")
        line = (f"- **Data:** {source} → folder `{data.get('folder', '?')}`, {counts} images, data digest "
                f"`{digest}`; stored images: {stored}")
        side = facts.square_px if facts else None
        if measured and all(s.get("square") == 1.0 and s.get("min") == s.get("max") for s in measured.values()):
            side = int(next(iter(measured.values()))["max"][0])
        largest = _largest_resize(group)
        if side and largest > side:
            line += (f". Every resize above {side} px (this page goes up to {largest} px) upsamples the stored "
                     "pixels, and their aspect ratio is already lost")
        elif side:
            line += ". Aspect ratios are already lost in this copy: not comparable with the official images"
        lines.append(line + ".")
    return lines


def common_departures(runs: Sequence[Run], scale: str) -> list[str]:
    """The departures every page shares, read from the runs' configs."""
    done = [r for r in runs if r.completed] or list(runs)
    epochs = sorted({int(r.config("trainer.max_epochs") or 0) for r in done} - {0})
    shown = ", ".join(map(str, epochs)) or "?"
    own = "" if scale == "full" else f"; the {scale} scale sets its own"
    out = [f"**Epochs:** {shown}. The report never states its epoch count: the full scale's 30 epochs are our "
           f"assumption{own}."]
    models = sorted({f"{r.config('model.name')} (width {r.config('model.width') or 1.0})" for r in done
                     if r.config("scale_name") == "cpu"})
    if models:  # the CPU scale's stand-in (conf/scale/cpu.yaml): not an architecture of the report
        out.append(f"**Model:** {', '.join(models)} stands in for the experiment's own architecture, which cannot "
                   "reach 80 % in 20 minutes on 2 CPU cores; ResNet-18 is not in the report.")
    progressive = sorted({r.config("data.progressive.start") for r in done} - {None})
    if progressive:
        out.append(f"**Progressive resizing:** training images start at {', '.join(map(str, progressive))} px and "
                   "grow to the crop size (`data.progressive`); the report trained at one size.")
    if any(r.config("data.val_crop") == "center" for r in done):
        out.append("**Validation crops** are centred (`data.val_crop=center`); the report used RandomCrop on the "
                   "validation images too, which makes its validation accuracy itself a random variable.")
    if any(r.config("data.normalize") == "dataset" for r in done) and not any(
        (r.metrics.get("data") or {}).get("normalization") for r in done
    ):
        out.append("`data.normalize=dataset` runs used the training split's own mean/std (logged in each run's "
                   "`run.log`), not the `data.mean`/`data.std` values their config shows.")
    return out


# ------------------------------------------------------------------------------------------ provenance
def read_provenance(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """The ``provenance.jsonl`` lines of the sweep folders these runs live in."""
    out: list[dict[str, Any]] = []
    for folder in sorted({Path(r.source.split(" (")[0]).parent for r in runs if r.status != "missing"}
                         | {Path(r.source.split(" (")[0]) for r in runs if r.status == "missing"}):
        path = folder / PROVENANCE_FILE
        if path.is_file():
            out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def fmt_seconds(seconds: float | None) -> str:
    """``h:mm:ss``, or ``—`` when unknown."""
    if seconds is None or math.isnan(seconds):
        return "—"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def provenance_lines(prov: Sequence[dict[str, Any]]) -> list[str]:
    """One Markdown bullet per multirun (make command, start, wall time, job statuses, machine), machine
    paths in the recorded commands made relative (:func:`no_machine_paths`)."""
    lines = []
    for p in prov:
        machine = p.get("machine") or {}
        where = ", ".join(str(machine[k]) for k in ("cpu", "cores", "gpu", "os") if machine.get(k))
        if "jobs" in p:
            ended = "jobs " + ", ".join(f"{n} {status}" for status, n in p["jobs"].items())
        else:  # lines written before the Hydra callback recorded job statuses
            ended = f"exit code {p.get('returncode')}"
        command = no_machine_paths(str(p.get("make") or p.get("command")))
        lines.append(f"- `{command}` — {p.get('started', '?')}, took {fmt_seconds(p.get('seconds'))} "
                     f"(h:mm:ss), {ended}; machine: {where or 'unknown'}")
        if p.get("make") and p.get("command"):
            lines.append(f"  - ran: `{no_machine_paths(str(p['command']))}`")
    return lines
