"""Run one experiment's sweep, record how it was run, then render its artefact.

``python -m imagenette_lab.report.sweep EXPERIMENT [--scale quick] [--seeds 1,2,3] [-- OVERRIDES...]``
is what ``make <experiment>`` calls. It runs ``run.py -m experiment=EXPERIMENT scale=SCALE ...``, appends one
line to ``<sweep dir>/provenance.jsonl`` (the command, the machine, start time, wall time, exit code) which
the rendered page quotes, and renders ``<out>/<scale>/<experiment>.md`` even when a job failed (the failure
is then listed on the page). The exit code is run.py's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from imagenette_lab.pipeline import PROJECT_ROOT, git_revision

from .build import PROVENANCE_FILE, render

CONF_DIR = PROJECT_ROOT / "conf"


def experiments_available() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def machine() -> dict[str, Any]:
    """What the sweep ran on: CPU model and cores, GPU, OS and library versions."""
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


def sweep_dir(overrides: list[str]) -> Path:
    """The folder Hydra will write this multirun to (``hydra.sweep.dir`` of the composed config)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))
    parsed = OverridesParser.create().parse_overrides(overrides)
    single = [o.input_line for o in parsed if not o.is_sweep_override() and o.input_line]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=single, return_hydra_config=True)
    return Path(str(cfg.hydra.sweep.dir)).resolve()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m imagenette_lab.report.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", help=f"one of: {', '.join(experiments_available())}")
    ap.add_argument("--scale", default="full", help="full (the report's 224 px recipe) | quick (2-core CPU)")
    ap.add_argument("--seeds", default="", help="comma-separated seeds (default: the experiment's, 1,2,3)")
    ap.add_argument("--out", default=str(PROJECT_ROOT / "docs" / "results"), help="where artefacts are rendered")
    ap.add_argument("--no-render", action="store_true", help="only run the sweep")
    ap.add_argument("--make", default="", help="the make command line that started this (recorded)")
    ap.add_argument("overrides", nargs="*", help="extra run.py overrides (also after --), e.g. trainer=cpu")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # everything after -- goes to run.py
    args = ap.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    args.overrides += extra
    if args.experiment not in experiments_available():
        ap.error(f"unknown experiment {args.experiment!r}; choose one of {', '.join(experiments_available())}")

    overrides = [f"experiment={args.experiment}", f"scale={args.scale}", *args.overrides]
    if args.seeds:  # a command-line sweep of a key replaces the experiment's hydra.sweeper.params entry
        overrides.append(f"seed={args.seeds}")
    cmd = [sys.executable, str(PROJECT_ROOT / "run.py"), "-m", *overrides]
    folder = sweep_dir(overrides)
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    print(f"[sweep] {shlex.join(cmd)}\n[sweep] results: {folder}", flush=True)
    rc = subprocess.call(cmd, cwd=PROJECT_ROOT)
    record = {
        "experiment": args.experiment, "scale": args.scale, "make": args.make or None,
        "command": shlex.join(["python", "run.py", "-m", *overrides]),
        "started": started.isoformat(timespec="seconds"), "seconds": round(time.perf_counter() - t0, 1),
        "returncode": rc, "machine": machine(), **git_revision(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / PROVENANCE_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
    if not args.no_render and any(folder.rglob("metrics.json")):
        for path in render([folder], args.out, experiments=[args.experiment]):
            print(f"[sweep] wrote {path}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
