"""What a run folder holds and whether this command may skip, resume or start it.

A run folder is named after its overrides (so the same command lands in the same folder), minus the
*location keys*: overrides that only say where things are or how they are shown. That one list,
:data:`LOCATION_KEYS`, is used for folder names (``conf/hydra/default.yaml`` calls :func:`job_dirname`),
W&B job types, the report's arm grouping and the fingerprint. Written by hand: no library keeps this.

The folder records a *fingerprint* (``identity.json``): the resolved config minus location keys, the
data's identity (a digest of the verified file list and sizes, not of its path) and the code's identity
(source digest and numerics package versions). A rerun skips a completed run and resumes an unfinished
one only when the fingerprint matches; otherwise it refuses before touching anything, naming each
differing key with both values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from imagenette_lab.callbacks import EPOCHS_FILE, METRICS_FILE, atomic_write_text, read_epochs_csv
from imagenette_lab.provenance import PROJECT_ROOT, code_identity, now_iso

log = logging.getLogger("imagenette_lab")

# Keys (and their sub-keys, and config groups of that name) that never change a result: where the data,
# logs and checkpoints are, how progress is shown and logged, labels. The data's *content* is in the
# fingerprint; its location is not.
LOCATION_KEYS = (
    "data.archive", "data.root", "data.data_dir", "data.mirror", "paths", "hydra", "logger", "ckpt_path",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "callbacks.progress_bar",
    "callbacks.model_summary", "callbacks.clock", "name", "tags", "experiment_name", "rerun",
)
# Location keys that may hold a credential or an account name: never written to names, tags or pages.
SECRET_KEYS = ("data.mirror", "logger.wandb.entity")
IDENTITY_FILE = "identity.json"
SUPERSEDED_DIR = ".superseded"  # rerun=restart moves earlier results here (the report skips it)
RERUN_POLICIES = ("strict", "accept_code", "restart")


class RunIdentityError(RuntimeError):
    """This folder holds another run (or an unusable one); the message says what differs and what to do."""


# ------------------------------------------------------------------------------------------ keys
def override_key(override: str) -> str:
    """``+a.b=1`` -> ``a.b``; ``hydra/launcher=x`` -> ``hydra/launcher``."""
    return override.lstrip("+~").split("=", 1)[0]


def is_location_key(key: str) -> bool:
    key = key.lstrip("+~")
    return any(key == k or key.startswith((f"{k}.", f"{k}/")) for k in LOCATION_KEYS)


def result_overrides(overrides: Iterable[str]) -> list[str]:
    """Overrides that can change a result (location keys dropped), in the given order."""
    return [o for o in overrides if not is_location_key(override_key(o))]


def task_overrides() -> list[str]:
    """This job's result-changing ``key=value`` overrides (swept values included)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return result_overrides(HydraConfig.get().overrides.task)


def safe_dirname(overrides: str, max_len: int = 120) -> str:
    """A folder name for an override string (``a=1,b=2`` -> ``a-1+b-2``) that is safe on file systems
    and in Hydra overrides; long ones are shortened with a hash."""
    # "=" and "," would need quoting when the path is passed back as an override (ckpt_path=...).
    name = overrides.replace("=", "-").replace(",", "+")
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name) or "default"
    if len(name) > max_len:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: max_len - 11]}_{digest}"
    return name


def job_dirname(overrides: Sequence[str], mode: str = "train", ckpt_path: str | None = None) -> str:
    """Resolver ``${job_dirname:...}``: a job's folder name from its overrides (sorted, location keys
    dropped). An evaluation is named after the checkpoint it evaluates, never after a training folder."""
    kept = sorted(o for o in result_overrides(overrides) if override_key(o) != "mode")
    if mode != "eval":
        return safe_dirname(",".join(kept))
    ckpt = Path(str(ckpt_path))
    digest = hashlib.sha1(str(ckpt.expanduser().resolve()).encode()).hexdigest()[:8]
    # checkpoint name and path digest first, so a long training folder name cannot truncate them away
    source = f"-of-{ckpt.parent.parent.name}" if ckpt.parent.name == "checkpoints" else ""
    return safe_dirname(",".join([f"eval-{ckpt.stem}-{digest}{source}", *kept]))


# ------------------------------------------------------------------------------------------ fingerprint
def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are leaves)."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def redacted(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a resolved config with secret-bearing values replaced (for metrics.json and W&B)."""
    out = json.loads(json.dumps(config, default=str))
    for key in SECRET_KEYS:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(leaf) is not None:
            node[leaf] = "<redacted>"
    return out


SCALES = frozenset(p.stem for p in (PROJECT_ROOT / "conf" / "scale").glob("*.yaml"))


def without_scale_tables(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``flat`` without per-scale lookup tables (a top-level key whose keys are all scale names, e.g.
    ``hybrid_width.quick``): a run reads one entry into a real key (``model.width``), which the identity keeps,
    so adding a scale to a table does not make the runs of other scales look different."""
    children: dict[str, set[str]] = {}
    for key in flat:
        top, _, rest = key.partition(".")
        children.setdefault(top, set()).add(rest)
    tables = {top for top, rest in children.items() if rest and rest <= SCALES}
    return {k: v for k, v in flat.items() if k.partition(".")[0] not in tables}


def config_identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as dotted keys, location keys, ``mode`` and per-scale lookup tables dropped."""
    flat = without_scale_tables(flatten(OmegaConf.to_container(cfg, resolve=True)))
    return {k: v for k, v in sorted(flat.items()) if not is_location_key(k) and k != "mode"}


def data_identity(datamodule: Any) -> dict[str, Any]:
    """The data a run sees, independent of where it lives: the verified image list with file sizes and
    the label CSV's bytes (after ``prepare_data()`` and ``setup()``)."""
    verified = datamodule.verified
    root = Path(verified.root)
    h = hashlib.sha256()
    counts: dict[str, int] = {}
    for row in sorted(verified.rows, key=lambda r: r.path):
        if row.path in verified.unreadable:
            continue
        h.update(f"{row.path}\0{(root / row.path).stat().st_size}\n".encode())
        counts[row.split] = counts.get(row.split, 0) + 1
    csvs = sorted(root.glob("*.csv"))
    for csv_path in csvs:
        h.update(csv_path.name.encode() + b"\0" + csv_path.read_bytes())
    # ``folder`` is recorded for the report (which archive a page came from); only ``digest`` is compared.
    return {"digest": h.hexdigest()[:16], "folder": root.name, "images": counts}


def fingerprint(cfg: DictConfig, data: dict[str, Any]) -> dict[str, Any]:
    return {"config": config_identity(cfg), "data": data, "code": code_identity()}


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str) -> list[tuple[str, Any, Any]]:
    return [(f"{prefix}{k}", old.get(k, "<absent>"), new.get(k, "<absent>"))
            for k in sorted(set(old) | set(new)) if old.get(k, "<absent>") != new.get(k, "<absent>")]


# Config keys added after run folders already existed: an older folder's identity lacks them, and what its
# code did then equals the value given here (a function of that folder's config). A rerun whose value
# equals it is the same run; any other value is a difference like any other.
KEYS_ADDED_LATER: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "data.train_fraction": lambda c: 1.0,  # the whole training split
    "data.normalize": lambda c: "imagenet",  # data.mean/std as given
    # was always on without BatchNorm, in every model with residual branches (GoogLeNet has none)
    "model.zero_init_last": lambda c: c.get("model.norm") == "none" and c.get("model.name") != "googlenet",
    "data.prefetch_batches": lambda c: None,  # auto (the batches are the same either way)
    "model.width": lambda c: 1.0,  # models without a multiplier had no key (conf/model/_base.yaml has it now)
    "data.progressive.start": lambda c: None,  # off: every epoch at data.crop
    "data.progressive.epochs": lambda c: [0, 0],
    "data.progressive.step": lambda c: 8,
    "stand_in_width": lambda c: 0.5 if c.get("scale_name") == "cpu" else None,  # written out once per scale
    # when last.ckpt is written never changes a result (it was after validation, so never mid-run in make train)
    "callbacks.last_checkpoint.save_on_train_epoch_end": lambda c: True,
}


# Config keys that left the identity after folders recorded them: moved to the module group (whose keys,
# interpolated from them then, older folders also hold) or now a location key (the clock's thresholds).
KEYS_RETIRED = ("trainer.compile", "trainer.channels_last", "module.acc_thresholds")


def with_keys_added_later(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """``old`` (a folder's dotted config keys) with the keys it predates and ``new`` has, filled in as its
    code behaved, and without the retired keys ``new`` no longer has."""
    filled = {k: v for k, v in old.items() if k in new or k not in KEYS_RETIRED}
    for key, then in KEYS_ADDED_LATER.items():
        if key in new and key not in filled:
            filled[key] = then(filled)
    return filled


def compare(old: Mapping[str, Any], new: Mapping[str, Any], policy: str) -> list[tuple[str, Any, Any]]:
    """Differences that forbid skipping/resuming (``trainer.max_epochs`` is checked by the caller)."""
    new_config = without_scale_tables(new.get("config", {}))
    old_config = without_scale_tables(old.get("config", {}))  # folders written before tables were dropped
    diffs = _differences(with_keys_added_later(old_config, new_config), new_config, "")
    diffs = [d for d in diffs if d[0] != "trainer.max_epochs"]
    if new.get("data"):  # empty while the data is not prepared yet (the early, config-only check)
        # The content digest only: the extracted folder's name changes whenever the archive file is copied
        # or touched (a new mtime is extracted into a new folder), while the images stay the same.
        diffs += _differences({"digest": old.get("data", {}).get("digest")}, {"digest": new["data"].get("digest")},
                              "data ")
    if policy != "accept_code":
        diffs += _differences(old.get("code", {}), new.get("code", {}), "code ")
    return diffs


# ------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    """What this start does in its folder: ``fresh``, ``resume`` (from ``checkpoint``) or ``skip``."""

    action: str
    checkpoint: Path | None = None
    epochs_done: int = 0
    previous_status: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunIdentityError(f"{path} is unreadable ({err}); move the folder away or rerun with "
                               "rerun=restart (keeps it under .superseded/)") from err


def finished_epochs(path: Path) -> list[int]:
    """The epochs of an ``epochs.csv`` that logged an epoch-level value. Before the logger kept step-level logs
    out, an interrupted epoch left a row holding only its step count: that epoch did not finish."""
    return [r["epoch"] for r in read_epochs_csv(path)
            if any(v == v for k, v in r.items() if k not in ("epoch", "step"))]  # v == v: not NaN


def _how_to_proceed(run_dir: Path) -> str:
    return (f"To keep both, run into another folder (hydra.run.dir=... for a single run, hydra.sweep.dir=... "
            f"for a sweep). To start over here, add rerun=restart: the old results are moved to "
            f"{run_dir / SUPERSEDED_DIR}/<time>/, not deleted.")


def plan_run(run_dir: Path, new: dict[str, Any], policy: str) -> Plan:
    """Decide skip / resume / fresh for ``run_dir``, or raise :class:`RunIdentityError` before anything in
    it is touched."""
    if policy not in RERUN_POLICIES:
        raise RunIdentityError(f"rerun={policy!r} is invalid: use one of {', '.join(RERUN_POLICIES)}")
    identity = _read_json(run_dir / IDENTITY_FILE)
    metrics = _read_json(run_dir / METRICS_FILE) or {}
    last = run_dir / "checkpoints" / "last.ckpt"
    epochs_done = max([int(metrics.get("epochs_completed") or 0), *finished_epochs(run_dir / EPOCHS_FILE)],
                      default=0)
    has_results = bool(metrics) or epochs_done > 0 or (run_dir / "checkpoints").is_dir()
    if policy == "restart" and (identity or has_results):
        aside = set_aside(run_dir)
        return Plan("fresh", notes=[f"rerun=restart: earlier results moved to {aside}"])
    if identity is None:
        if has_results:
            raise RunIdentityError(
                f"{run_dir} holds results but no {IDENTITY_FILE} (written before runs recorded their "
                f"identity), so it cannot tell whether they belong to this config. " + _how_to_proceed(run_dir))
        return Plan("fresh")
    old = identity["fingerprint"]
    diffs = compare(old, new, policy)
    if diffs:
        listing = "\n".join(f"  - {k}: folder has {a!r}, this command has {b!r}" for k, a, b in diffs)
        raise RunIdentityError(
            f"{run_dir} holds a run of a different configuration, so it is neither skipped nor resumed:\n"
            f"{listing}\n" + _how_to_proceed(run_dir)
            + (" A code-only change can be accepted with rerun=accept_code." if all(k.startswith("code ")
                                                                                  for k, _, _ in diffs) else ""))
    plan = Plan("fresh", epochs_done=epochs_done, previous_status=metrics.get("status"),
                attempts=list(identity.get("attempts", [])))
    if policy == "accept_code" and _differences(old.get("code", {}), new.get("code", {}), ""):
        plan.notes.append("rerun=accept_code: the code differs from the earlier attempt's (both are recorded)")
    old_epochs = old.get("config", {}).get("trainer.max_epochs")
    new_epochs = new["config"].get("trainer.max_epochs")
    if old_epochs is not None and new_epochs is not None and new_epochs < old_epochs and epochs_done > new_epochs:
        raise RunIdentityError(
            f"{run_dir} already ran {epochs_done} epochs; trainer.max_epochs={new_epochs} is lower "
            f"(the folder's run has {old_epochs}). " + _how_to_proceed(run_dir))
    if metrics.get("status") == "completed" and new_epochs == old_epochs:
        plan.action = "skip"
        return plan
    if epochs_done == 0:
        return plan  # nothing finished before the stop: start again from the first epoch
    if not last.is_file():
        raise RunIdentityError(
            f"{run_dir} records {epochs_done} finished epoch(s) (status {metrics.get('status')!r}) but has no "
            f"{last.relative_to(run_dir)} to resume from, so continuing would silently start over. "
            + _how_to_proceed(run_dir))
    plan.action, plan.checkpoint = "resume", last
    if new_epochs != old_epochs:
        plan.notes.append(
            f"trainer.max_epochs raised from {old_epochs} to {new_epochs}: extending the run from epoch "
            f"{epochs_done}; schedules that depend on the epoch count (cosine_full, onecycle) differ from a "
            "run started with the new value")
    return plan


def set_aside(run_dir: Path) -> Path:
    """Move everything a run wrote (not Hydra's logs/config of this start) under ``.superseded/<time>/``."""
    aside = run_dir / SUPERSEDED_DIR / now_iso().replace(":", "")
    aside.mkdir(parents=True, exist_ok=True)
    for item in run_dir.iterdir():
        if item.name not in {SUPERSEDED_DIR, ".hydra", "run.log", ".run.lock", "run.lock.json"}:
            shutil.move(str(item), aside / item.name)
    return aside


def write_identity(run_dir: Path, fp: dict[str, Any], attempts: list[dict[str, Any]]) -> None:
    atomic_write_text(run_dir / IDENTITY_FILE,
                      json.dumps({"fingerprint": fp, "attempts": attempts}, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------------ checkpoints
def model_signature(cfg: DictConfig) -> dict[str, Any]:
    """What a checkpoint must match to be evaluated with this config (saved in its hyperparameters)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("_target_", None)
    return {"model": model, "dataset": cfg.data.dataset, "num_classes": int(cfg.data.num_classes)}


def load_checkpoint(path: Path, cfg: DictConfig) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) and refuse a corrupt one or one of another model."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: say which, and what to do
        raise RunIdentityError(
            f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}). It is damaged or not a "
            f"checkpoint of this package: delete it and rerun with rerun=restart to start over (earlier "
            f"results are kept aside), or point ckpt_path at a good file.") from err
    saved = (ckpt.get("hyper_parameters") or {}).get("signature")
    if saved is None:
        raise RunIdentityError(f"checkpoint {path} was not written by imagenette_lab (no model signature in it)")
    diffs = _differences(flatten(saved), flatten(model_signature(cfg)), "")
    if diffs:
        raise RunIdentityError(
            f"checkpoint {path} does not match this config: "
            + "; ".join(f"{k}: checkpoint has {a!r}, config has {b!r}" for k, a, b in diffs)
            + ". Use the same model/data overrides as the run that wrote it, or another run folder.")
    return ckpt
