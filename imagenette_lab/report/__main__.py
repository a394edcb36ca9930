"""``python -m imagenette_lab.report SWEEP_DIR... [--out DIR] [--wandb ENTITY/PROJECT] [--wandb-offline DIR]
[--experiment NAME] [--claims | --claims-only]``:
render every experiment found (offline from run folders, or from W&B) to ``DIR/<scale>/<experiment>.md``
and, with ``--claims``, every claim of the report with its verdicts to ``DIR/CLAIMS.md``."""

from __future__ import annotations

import argparse
import sys

from .build import build_reports, render
from .runs import load_runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m imagenette_lab.report", description=__doc__.split(":", 1)[1].strip())
    ap.add_argument("sweep_dirs", nargs="*", help="sweep folders, e.g. logs/multiruns/table1/quick or logs/multiruns")
    ap.add_argument("--out", default="docs/results", help="output folder; artefacts go to OUT/<scale>/")
    ap.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read the runs logged to this W&B project")
    ap.add_argument("--wandb-offline", metavar="FOLDER", action="append", default=[],
                    help="read the offline W&B run files under FOLDER instead of the run folders (repeatable)")
    ap.add_argument("--experiment", action="append", default=[], help="only these experiments (repeatable)")
    ap.add_argument("--check", action="store_true", help="print the tables only, write nothing")
    ap.add_argument("--claims", action="store_true",
                    help="also write OUT/CLAIMS.md from every run loaded (give it all the sweeps, e.g. logs/multiruns)")
    ap.add_argument("--claims-only", action="store_true", help="write OUT/CLAIMS.md only, no pages")
    args = ap.parse_args(argv)
    if not args.sweep_dirs and not args.wandb and not args.wandb_offline:
        ap.error("give at least one SWEEP_DIR (e.g. logs/multiruns), --wandb ENTITY/PROJECT or --wandb-offline DIR")
    try:
        if args.check:
            runs = [r for r in load_runs(*args.sweep_dirs)
                    if not args.experiment or r.experiment in args.experiment]
            for report in build_reports(runs):
                print(f"\n## {report.experiment} ({report.scale})\n\n{report.tables['accuracy'].markdown()}")
            return 0
        for path in render(args.sweep_dirs, args.out, args.wandb, args.experiment, args.wandb_offline,
                           claims=args.claims or args.claims_only, pages=not args.claims_only):
            print(path)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
