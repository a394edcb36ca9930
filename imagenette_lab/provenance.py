"""Where a result came from: code revision, package versions, machine, and the command of a sweep.

``code_identity`` is the part of a run's fingerprint that says which code produced it (see
:mod:`imagenette_lab.run_identity`); :class:`SweepProvenance` is a Hydra callback that appends one line per
multirun to ``<sweep dir>/provenance.jsonl`` (command, machine, start, wall time, job statuses), so a plain
``python run.py -m ...`` is recorded exactly as ``make <experiment>`` is. Nothing here is in a library.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROVENANCE_FILE = "provenance.jsonl"  # one JSON line per multirun, in the sweep folder
# Set by `python -m imagenette_lab.report.sweep` (what `make <experiment>` calls) so the record names it.
MAKE_ENV = "IMAGENETTE_LAB_MAKE"
# Packages whose version can change a number of ours (recorded with every attempt, compared on resume).
RESULT_PACKAGES = ("torch", "torchvision", "timm", "lightning", "numpy", "pillow")
OTHER_PACKAGES = ("hydra-core", "omegaconf", "torchmetrics", "wandb")
# Code that can change a result: the package minus the report tool, plus the entry point. Docs, tests,
# results pages and the report tool can change without invalidating finished runs.
_CODE_GLOBS = ("run.py", "imagenette_lab/**/*.py")
_CODE_EXCLUDE = ("imagenette_lab/report/",)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_revision() -> dict[str, Any]:
    """The git commit, whether tracked files differ from it, and a digest of that difference."""
    rev = (_git("rev-parse", "HEAD") or "").strip()
    diff = _git("diff", "HEAD", "--no-color")
    return {
        "git_rev": rev if re.fullmatch(r"[0-9a-f]{40}", rev) else None,
        "git_dirty": bool(diff) if diff is not None else None,
        "git_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
    }


def code_digest(root: Path = PROJECT_ROOT) -> str:
    """sha256 over the path and bytes of every file that can change a result (committed or not)."""
    files = sorted({p for g in _CODE_GLOBS for p in root.glob(g) if p.is_file()})
    h = hashlib.sha256()
    for path in files:
        rel = path.relative_to(root).as_posix()
        if rel.startswith(_CODE_EXCLUDE) or "__pycache__" in rel:
            continue
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def package_versions(names: tuple[str, ...] = RESULT_PACKAGES + OTHER_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def code_identity() -> dict[str, Any]:
    """What the fingerprint compares about the code: the source digest and the numerics packages."""
    versions = package_versions(RESULT_PACKAGES)
    return {"digest": code_digest(), **{k: versions.get(k) for k in RESULT_PACKAGES}}


def machine() -> dict[str, Any]:
    """What a run ran on: CPU model and cores, GPU, OS and the Python/torch versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu, "cores": f"{os.cpu_count()} cores", "gpu": gpu or "no GPU", "os": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
    }


def attempt_record(action: str, **extra: Any) -> dict[str, Any]:
    """One start of a run in its folder: when, where, which code and packages, and what it did."""
    return {
        "started": now_iso(), "action": action, "host": socket.gethostname(), "pid": os.getpid(),
        "command": command_line(), **git_revision(), "code_digest": code_digest(),
        "versions": package_versions(), **extra,
    }


def relative_paths(text: str) -> str:
    """``text`` with this project's absolute location replaced by relative paths (records are shared)."""
    return text.replace(f"{PROJECT_ROOT}/", "").replace(f"{PROJECT_ROOT.parent}/", "../")


def command_line() -> str:
    """This process's command, as run from the project folder, with machine paths made relative."""
    return relative_paths(shlex.join(["python", sys.argv[0], *sys.argv[1:]]))


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class SweepProvenance(Callback):
    """Hydra callback: one ``provenance.jsonl`` line per multirun (command, machine, time, job statuses)."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self._started = ""
        self._statuses: dict[str, int] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._t0, self._started, self._statuses = time.perf_counter(), now_iso(), {}

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        status = "unknown"
        try:
            metrics = Path(str(config.hydra.runtime.output_dir)) / "metrics.json"
            status = json.loads(metrics.read_text()).get("status", "unknown") if metrics.is_file() else "not started"
        except (OSError, ValueError, AttributeError):
            pass
        self._statuses[status] = self._statuses.get(status, 0) + 1

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.sweep.dir))
        record = {
            "experiment": config.get("experiment_name"), "scale": config.get("scale_name"),
            "make": os.environ.get(MAKE_ENV) or None, "command": command_line(),
            "started": self._started, "seconds": round(time.perf_counter() - self._t0, 1),
            "jobs": dict(sorted(self._statuses.items())), "machine": machine(), **git_revision(),
        }
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / PROVENANCE_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
