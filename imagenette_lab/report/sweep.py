"""Run one experiment's sweep, record how it was run, then render its artefact.

``python -m imagenette_lab.report.sweep EXPERIMENT [--scale quick] [--seeds 1,2,3] [-- OVERRIDES...]``
is what ``make <experiment>`` calls. It runs ``run.py -m experiment=EXPERIMENT scale=SCALE ...``, appends one
line to ``<sweep dir>/provenance.jsonl`` (through run.py's Hydra callback: the command, the machine, start
time, wall time, job statuses) which the rendered page quotes, and renders ``<out>/<scale>/<experiment>.md`` even when a job failed (the failure
is then listed on the page). The exit code is run.py's.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from imagenette_lab.provenance import MAKE_ENV, PROJECT_ROOT

from .build import render
from .catalogue import no_cpu_form

CONF_DIR = PROJECT_ROOT / "conf"


def experiments_available() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


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
    ap.add_argument("--scale", default="full", help="full (the report's 224 px recipe) | cpu (its accuracy regime on 2 CPU cores) | quick (smoke scale)")
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

    if args.scale == "cpu" and (why := no_cpu_form(args.experiment)):
        print(f"error: {args.experiment} has no cpu form ({why}; conf/experiment/{args.experiment}.yaml). "
              "Run it with SCALE=quick on a CPU, or SCALE=full on a GPU.", file=sys.stderr)
        return 2
    overrides = [f"experiment={args.experiment}", f"scale={args.scale}", *args.overrides]
    if args.seeds:  # a command-line sweep of a key replaces the experiment's hydra.sweeper.params entry
        overrides.append(f"seed={args.seeds}")
    cmd = [sys.executable, str(PROJECT_ROOT / "run.py"), "-m", *overrides]
    folder = sweep_dir(overrides)
    print(f"[sweep] {shlex.join(cmd)}\n[sweep] results: {folder}", flush=True)
    # run.py's Hydra callback (provenance.SweepProvenance) appends the provenance line; it names the make
    # command when told through the environment.
    env = {**os.environ, **({MAKE_ENV: args.make} if args.make else {})}
    rc = subprocess.call(cmd, cwd=PROJECT_ROOT, env=env)
    if not args.no_render and any(folder.rglob("metrics.json")):
        for path in render([folder], args.out, experiments=[args.experiment]):
            print(f"[sweep] wrote {path}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
