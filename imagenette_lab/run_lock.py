"""One process per run folder: a lock held for the whole run (``filelock``, an OS lock the kernel drops
when its holder dies) plus a small JSON note naming the holder, so a second process on the same folder
exits at once saying who has it. The note is ours; the locking is filelock's.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from filelock import FileLock, Timeout

from imagenette_lab.provenance import command_line, now_iso

log = logging.getLogger("imagenette_lab")

LOCK_FILE = ".run.lock"
HOLDER_FILE = "run.lock.json"


class RunBusyError(RuntimeError):
    """Another live process holds this run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(run_dir):`` owns ``run_dir`` or raises :class:`RunBusyError` naming the holder."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._lock = FileLock(str(self.run_dir / LOCK_FILE), timeout=0)
        self.holder_file = self.run_dir / HOLDER_FILE

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.holder_file.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            h = self.holder() or {}
            raise RunBusyError(
                f"{self.run_dir} is in use by pid {h.get('pid', '?')} on host {h.get('host', '?')} since "
                f"{h.get('started', '?')} ({h.get('command', 'command unknown')}). Only one process may write "
                f"a run folder: wait for it to finish (rerunning then skips or resumes), or run into another "
                f"folder (hydra.run.dir=... / hydra.sweep.dir=...)."
            ) from None
        old = self.holder()
        if old and old.get("host") == socket.gethostname() and not _alive(int(old.get("pid", -1))):
            log.warning("taking over the stale lock of %s: pid %s (started %s) is no longer running",
                        self.run_dir, old.get("pid"), old.get("started"))
        elif old:  # another host, or a reused pid: the OS lock is free, so its holder is gone
            log.warning("taking over the lock of %s left by pid %s on %s (started %s)",
                        self.run_dir, old.get("pid"), old.get("host"), old.get("started"))
        note = {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso(), "command": command_line()}
        tmp = self.holder_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(note) + "\n")
        os.replace(tmp, self.holder_file)
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            self.holder_file.unlink(missing_ok=True)
            self._lock.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
