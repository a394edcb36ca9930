"""The same runs from W&B: online (``--wandb ENTITY/PROJECT``, the W&B public API fetches them) or from
offline run files (``--wandb-offline FOLDER``, read here: wandb 0.31's Python package ships no reader).

``run.py`` logs each job to W&B with group = experiment/scale, config = the resolved config plus the job's
``overrides`` (as data; tags only label), ``epochs.csv``'s metrics per epoch, and a non-zero exit code when
the job failed or was interrupted; this maps such a W&B run onto :class:`Run` so the report is built
exactly as from folders, with failed runs listed, not averaged.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
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
    overrides = list(config.get("overrides") or [])
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
    filters = {"config.experiment_name": {"$in": list(experiments)}} if experiments else None
    return [
        run_from_wandb(
            f"wandb:{path}/{r.id}", r.state, list(r.tags), r.group, dict(r.config), dict(r.summary_metrics),
            r.scan_history(),
        )
        for r in api.runs(path, filters=filters)
    ]


# ------------------------------------------------------------------------------------------ offline files
_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc32, length, type) records
_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of an offline ``run-<id>.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = 7, b""
    while pos + _HEADER.size <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER.size:  # block trailer too short for a header: zero padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = _HEADER.unpack_from(data, pos)
        pos += _HEADER.size
        chunk, pos = data[pos : pos + length], pos + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _config_items(items: Iterable[Any]) -> dict[str, Any]:
    out = {}
    for item in items:
        value = json.loads(item.value_json)
        out[_item_key(item)] = value["value"] if isinstance(value, dict) and set(value) == {"value"} else value
    return out


def run_from_wandb_file(path: Path) -> Run:
    """A :class:`Run` from an offline W&B run file: its config, history, summary and exit code (a run
    without an exit record died without finishing: ``crashed``)."""
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    group, tags, exit_code = None, [], None
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            group, tags = rec.run.run_group, list(rec.run.tags)
            config.update(_config_items(rec.run.config.update))
        elif kind == "config":
            config.update(_config_items(rec.config.update))
        elif kind == "history":
            history.append({_item_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            summary.update({_item_key(i): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "exit":
            exit_code = rec.exit.exit_code
    # 128 + N is how run.py exits after signal N (preemption, Ctrl-C): interrupted, not broken
    state = ("crashed" if exit_code is None else "finished" if exit_code == 0
             else "killed" if exit_code > 128 else "failed")
    run = run_from_wandb(f"wandb-offline:{path.parent.name}", state, tags, group, config, summary, history)
    run.metrics["exit_code"] = exit_code
    return run


def load_offline_wandb_runs(*folders: str | Path) -> list[Run]:
    """Every offline W&B run file under ``folders`` (e.g. a sweep folder: each job keeps ``wandb/``)."""
    files = sorted({p for f in folders for p in Path(f).rglob("offline-run-*/run-*.wandb")})
    return [run_from_wandb_file(p) for p in files]
