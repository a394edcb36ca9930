"""The same runs from W&B (``--wandb ENTITY/PROJECT``), for users who logged online.

``run.py`` logs each job to W&B with group = experiment, tags = the job's overrides and config = the full
resolved config, and ``epochs.csv``'s metrics per epoch; this maps such a W&B run onto :class:`Run` so the
report is built exactly as from folders. The W&B public API does the fetching.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .runs import Run, parse_overrides

# W&B run state -> metrics.json status
_STATES = {"finished": "completed", "running": "running", "crashed": "failed", "failed": "failed", "killed": "interrupted"}
_FINAL_PREFIXES = ("val/", "train/", "time/", "lr")


def epochs_from_history(history: Iterable[Mapping[str, Any]]) -> list[dict[str, float]]:
    """W&B history rows -> ``epochs.csv``-like rows: merged per (0-based) ``epoch``, ``*_step`` values
    dropped, ``*_epoch`` suffixes removed, 1-based ``epoch``. The evaluation after training (val metrics
    only, no training loss) is not an epoch and is left out."""
    merged: dict[int, dict[str, float]] = {}
    for row in history:
        if row.get("epoch") is None:
            continue
        epoch = int(row["epoch"]) + 1
        out = merged.setdefault(epoch, {"epoch": epoch})
        for key, value in row.items():
            if key.startswith("_") or key == "epoch" or key.endswith("_step") or not isinstance(value, int | float):
                continue
            out[key.removesuffix("_epoch")] = float(value)
    return [merged[e] for e in sorted(merged) if "train/loss" in merged[e]]


def run_from_wandb(
    source: str,
    state: str,
    tags: Sequence[str],
    group: str | None,
    config: Mapping[str, Any],
    summary: Mapping[str, Any],
    history: Iterable[Mapping[str, Any]],
) -> Run:
    """A :class:`Run` from the parts of a W&B run (the public API's ``state``, ``tags``, ``group``,
    ``config``, ``summary`` and ``scan_history()``)."""
    overrides = [t for t in tags if "=" in t]
    parsed = parse_overrides(overrides)
    epochs = epochs_from_history(history)
    final = {k: float(v) for k, v in summary.items() if k.startswith(_FINAL_PREFIXES) and isinstance(v, int | float)}
    per_class = {k.removeprefix("val/acc_"): v for k, v in final.items()
                 if k.startswith("val/acc_") and k != "val/acc_best"}
    metrics = {
        "status": _STATES.get(state, state),
        "overrides": overrides,
        "experiment": parsed.get("experiment") or config.get("experiment_name") or group,
        "seed": config.get("seed"),
        "config": dict(config),
        "final": {k: v for k, v in final.items() if not k.startswith("val/acc_") or k == "val/acc_best"},
        "per_class_acc": per_class,
        "class_names": list(per_class),
        "epochs_completed": len(epochs),
        "max_epochs": (config.get("trainer") or {}).get("max_epochs"),
    }
    return Run(
        source, metrics["status"], str(metrics["experiment"]), str(parsed.get("scale") or config.get("scale_name", "full")),
        parsed, metrics, epochs,
    )


def load_wandb_runs(path: str, experiments: Sequence[str] = ()) -> list[Run]:
    """Every run of W&B project ``ENTITY/PROJECT`` (only the groups in ``experiments`` when given)."""
    if path.count("/") != 1:
        raise ValueError(f"--wandb {path!r}: expected ENTITY/PROJECT, e.g. my-team/imagenette_lab")
    import wandb

    api = wandb.Api()
    filters = {"group": {"$in": list(experiments)}} if experiments else None
    return [
        run_from_wandb(
            f"wandb:{path}/{r.id}", r.state, list(r.tags), r.group, dict(r.config), dict(r.summary_metrics),
            r.scan_history(),
        )
        for r in api.runs(path, filters=filters)
    ]
