"""Loggers of the ``logger`` config group, with W&B set up so a dashboard tells the truth.

- Each run folder gets a random W&B id (``wandb_id.txt``), reused when the folder resumes; a new folder,
  or one restarted with ``rerun=restart``, gets a new one (an id derived from the path would append to an
  old run after the folder was deleted, or to another user's run of the same path).
- name = the arm and the seed; group = experiment/scale; job_type = the arm; the overrides are in the run
  config as data (``overrides``), never parsed back from tags; location keys (which may hold a mirror URL
  or an entity) are in none of them.
- A failed or interrupted job finishes its W&B run with a non-zero exit code, so W&B marks it failed and
  ``report --wandb`` leaves it out of the averages.
"""

from __future__ import annotations

import hashlib
import netrc
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import hydra.utils
from omegaconf import DictConfig, OmegaConf

from imagenette_lab.run_identity import redacted, task_overrides

WANDB_ID_FILE = "wandb_id.txt"
_WANDB_FIELD_MAX = 64  # W&B rejects longer job types and tags


def wandb_mode(requested: str) -> str:
    """``auto`` -> online when an API key is configured (env or ``wandb login``'s netrc), else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
        if netrc.netrc().authenticators(host):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def _short(text: str, limit: int = _WANDB_FIELD_MAX) -> str:
    if len(text) <= limit:
        return text
    return f"{text[: limit - 9]}~{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def run_labels(cfg: DictConfig) -> dict[str, Any]:
    """W&B name / group / job_type / tags for this job (no location key in any of them)."""
    overrides = sorted(task_overrides())
    arm = [o for o in overrides if not o.startswith("seed=")] or [f"model={cfg.model.name}"]
    group = f"{cfg.get('experiment_name') or 'adhoc'}/{cfg.get('scale_name') or 'full'}"
    tags = [cfg.get("experiment_name") or "adhoc", cfg.get("scale_name") or "full", str(cfg.model.name),
            *(str(t) for t in cfg.tags)]
    return {
        "name": f"{_short(','.join(arm), 100)} seed={cfg.seed}", "group": _short(group, 128),
        "job_type": _short(",".join(arm)), "tags": [_short(t) for t in dict.fromkeys(tags)],
        "overrides": overrides,
    }


def wandb_run_id(run_dir: Path) -> str:
    """The folder's W&B id: read back on resume, a new random one otherwise."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(6)
    path.write_text(run_id + "\n")
    return run_id


def make_loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    """Instantiate the ``logger`` group (W&B as described in the module docstring)."""
    loggers = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if name != "wandb":
            loggers.append(hydra.utils.instantiate(lcfg))
            continue
        mode = wandb_mode(lcfg.mode)
        if mode == "disabled":
            continue
        labels = run_labels(cfg)
        kwargs = OmegaConf.to_container(lcfg, resolve=True)
        kwargs.pop("mode")
        logger_cls = hydra.utils.get_class(kwargs.pop("_target_"))
        config = redacted(OmegaConf.to_container(cfg, resolve=True))
        config["overrides"] = labels["overrides"]
        loggers.append(
            logger_cls(
                **kwargs, name=labels["name"], group=labels["group"], job_type=labels["job_type"],
                tags=labels["tags"], offline=mode == "offline", id=wandb_run_id(run_dir), resume="allow",
                config=config,
            )
        )
    return loggers


def log_wandb_summary(loggers: list[Any], module: Any, class_names: list[str]) -> None:
    """Per-class accuracy table and confusion matrix of the final validation to W&B."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if not isinstance(lg, WandbLogger):
            continue
        import wandb

        per_class = getattr(module, "last_per_class", {})
        if per_class:
            table = wandb.Table(columns=["class", "val_acc"], data=[[k, v] for k, v in per_class.items()])
            lg.experiment.log({"val/per_class_acc": table})
        confusion = getattr(module, "last_confusion", [])
        if confusion:
            y_true, y_pred = [], []
            for i, row in enumerate(confusion):
                for j, count in enumerate(row):
                    y_true += [i] * count
                    y_pred += [j] * count
            lg.experiment.log(
                {"val/confusion_matrix": wandb.plot.confusion_matrix(y_true=y_true, preds=y_pred, class_names=class_names)}
            )


def finish_wandb(exit_code: int = 0) -> None:
    """``wandb.finish(exit_code)`` after every job; non-zero for failed/interrupted ones, so W&B marks them
    failed and multirun jobs never share a run."""
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish(exit_code=exit_code)
