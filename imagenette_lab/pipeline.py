"""Glue used by ``run.py``: config validation, runtime defaults, loggers, resume and results.

Everything here runs before data is touched, so a bad value fails in seconds and names its key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import netrc
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import hydra.utils
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from imagenette_lab.callbacks import METRICS_FILE

log = logging.getLogger("imagenette_lab")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Override keys that only say where things are; they never change a result, so they are left out of run
# folder names, W&B job types and the checkpoint compatibility check.
LOCATION_KEYS = ("data.archive", "data.root", "data.data_dir", "paths.", "hydra.", "logger.", "ckpt_path")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and how to fix it."""


# ------------------------------------------------------------------------------------------ config
def _check(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: {why}")


def validate_config(cfg: DictConfig) -> None:
    """Range and compatibility checks Hydra's struct mode cannot do (typos are already caught there)."""
    _check(cfg.mode in ("train", "eval"), "mode", cfg.mode, "use mode=train or mode=eval")
    if cfg.mode == "eval":
        _check(cfg.ckpt_path is not None, "ckpt_path", cfg.ckpt_path, "mode=eval needs ckpt_path=PATH/TO.ckpt")
        _check(Path(str(cfg.ckpt_path)).is_file(), "ckpt_path", cfg.ckpt_path, "no such checkpoint file")
    for key in ("lr", "max_lr"):
        if key in cfg.optim:
            _check(cfg.optim[key] > 0, f"optim.{key}", cfg.optim[key], "the learning rate must be > 0")
    if "max_lr" in cfg.sched.scheduler:
        _check(cfg.sched.scheduler.max_lr > 0, "sched.scheduler.max_lr", cfg.sched.scheduler.max_lr, "must be > 0")
    _check(cfg.optim.get("weight_decay", 0) >= 0, "optim.weight_decay", cfg.optim.get("weight_decay"), "must be >= 0")
    for key in ("drop_rate", "block_drop_rate"):
        if key in cfg.model:
            v = cfg.model[key]
            _check(0 <= v < 1, f"model.{key}", v, "a dropout probability must be in [0, 1)")
    _check(cfg.data.batch_size >= 1, "data.batch_size", cfg.data.batch_size, "must be >= 1")
    _check(cfg.trainer.max_epochs >= 1, "trainer.max_epochs", cfg.trainer.max_epochs, "must be >= 1")
    _check(cfg.sched.interval in ("epoch", "step"), "sched.interval", cfg.sched.interval, "use epoch or step")
    accel = cfg.trainer.accelerator
    _check(accel in ("auto", "cpu", "gpu", "cuda"), "trainer.accelerator", accel, "use auto, cpu or gpu")
    if accel in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accel} but no CUDA GPU is visible; use trainer=cpu (or trainer.accelerator=auto)"
        )
    on_gpu = accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available())
    if cfg.trainer.sync_batchnorm and not on_gpu:
        raise ConfigError("trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm is CUDA-only); "
                          "set trainer.sync_batchnorm=false for CPU runs")
    precision = cfg.trainer.precision
    if precision is not None:
        valid = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
        _check(str(precision) in valid, "trainer.precision", precision, f"use one of {', '.join(valid)}")
        if not on_gpu and str(precision) in ("16-mixed", "16-true"):
            raise ConfigError(
                f"trainer.precision={precision} is not supported on CPU; use 32-true or bf16-mixed "
                "(or leave trainer.precision=null to pick the best for the device)"
            )
        if on_gpu and "bf16" in str(precision) and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"trainer.precision={precision}: this GPU has no bf16; use 16-mixed or 32-true")


def resolve_runtime(cfg: DictConfig) -> None:
    """Fill device-dependent defaults: bf16-mixed, cudnn benchmark, channels_last and fused optimizers on a
    GPU; 32-true and plain kernels on CPU."""
    accel = cfg.trainer.accelerator
    on_gpu = accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available())
    with open_dict(cfg):
        if cfg.trainer.precision is None:
            cfg.trainer.precision = "bf16-mixed" if on_gpu else "32-true"
        if cfg.trainer.benchmark is None:
            cfg.trainer.benchmark = on_gpu
        if cfg.trainer.channels_last is None:
            cfg.trainer.channels_last = on_gpu
        if cfg.optim.get("fused", False) is None:
            cfg.optim.fused = on_gpu  # one CUDA kernel for the whole update; not available on CPU
    if on_gpu:
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts


# ------------------------------------------------------------------------------------------ naming
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


def task_overrides() -> list[str]:
    """This job's ``key=value`` overrides (swept values included), without location-only keys."""
    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(LOCATION_KEYS)]


def sweep_identity(cfg: DictConfig) -> dict[str, str]:
    """W&B grouping: group = experiment or sweep folder; job_type = the arm (overrides minus seed)."""
    overrides = sorted(task_overrides())
    arm = [o for o in overrides if not o.startswith("seed=")]
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        group = cfg.get("experiment_name") or Path(HydraConfig.get().sweep.dir).name
    else:
        group = cfg.get("experiment_name") or "single-runs"
    return {"group": str(group), "job_type": ",".join(arm)[:60] or "default", "tags": overrides}


def git_revision() -> dict[str, Any]:
    """The code's git commit and whether the tree had uncommitted changes."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return {"git_rev": rev if re.fullmatch(r"[0-9a-f]{40}", rev) else None, "git_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"git_rev": None, "git_dirty": None}


# ------------------------------------------------------------------------------------------ loggers
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


def make_loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    """Instantiate the ``logger`` group; W&B gets the resolved config, sweep grouping and a stable id so a
    resumed run continues the same W&B run."""
    from hydra.utils import instantiate

    loggers = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if name != "wandb":
            loggers.append(instantiate(lcfg))
            continue
        mode = wandb_mode(lcfg.mode)
        if mode == "disabled":
            continue
        ident = sweep_identity(cfg)
        id_file = run_dir / "wandb_id.txt"
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = hashlib.sha1(f"{run_dir.resolve()}".encode()).hexdigest()[:12]
            id_file.write_text(run_id + "\n")
        kwargs = OmegaConf.to_container(lcfg, resolve=True)
        kwargs.pop("mode")
        logger_cls = hydra.utils.get_class(kwargs.pop("_target_"))
        loggers.append(
            logger_cls(
                **kwargs,
                name=f"{cfg.name}:{ident['job_type']}" if ident["job_type"] != "default" else cfg.name,
                group=ident["group"],
                job_type=ident["job_type"],
                tags=[t[:64] for t in [*ident["tags"], *cfg.tags]],
                offline=mode == "offline",
                id=run_id,
                resume="allow",
                config=OmegaConf.to_container(cfg, resolve=True),
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


def finish_wandb() -> None:
    """``wandb.finish()`` after every job, failed or interrupted ones too, so multirun jobs never share a run."""
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


# ------------------------------------------------------------------------------------------ resume
def previous_status(run_dir: Path) -> str | None:
    """Status recorded by an earlier attempt in this folder (None when there was none)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, json.JSONDecodeError):
        return "unreadable"


def model_signature(cfg: DictConfig) -> dict[str, Any]:
    """What a checkpoint must match to be resumed or evaluated with this config."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("_target_", None)
    return {"model": model, "dataset": cfg.data.dataset, "num_classes": int(cfg.data.num_classes)}


def check_checkpoint(path: Path, cfg: DictConfig) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) and refuse one made for another model/config."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: say which
        raise ConfigError(f"checkpoint {path} cannot be loaded safely ({type(err).__name__}: {err})") from err
    saved = (ckpt.get("hyper_parameters") or {}).get("signature")
    if saved is None:
        raise ConfigError(f"checkpoint {path} was not written by imagenette_lab (no model signature in it)")
    want = model_signature(cfg)
    diffs = _diff(saved, want)
    if diffs:
        raise ConfigError(
            f"checkpoint {path} does not match this config: "
            + "; ".join(f"{k}: checkpoint has {a!r}, config has {b!r}" for k, a, b in diffs)
            + ". Use the same model/data overrides as the run that wrote it, or another run folder."
        )
    return ckpt


def _diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]


class OutputDirCheck(Callback):
    """Hydra callback: refuse to start when ``paths.log_dir`` cannot be written, before Hydra creates the
    run folder inside it (otherwise the first sign is a traceback from deep inside Hydra).

    Hydra turns exceptions raised by callbacks into warnings, so this exits with the message instead.
    """

    def _check(self, config: DictConfig) -> None:
        target = Path(str(OmegaConf.select(config, "paths.log_dir")))
        try:
            target.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target):
                pass
        except OSError as err:
            raise SystemExit(
                f"error: output folder paths.log_dir={target} is not writable ({type(err).__name__}: "
                f"{err.strerror}); set paths.log_dir=... (or hydra.run.dir / hydra.sweep.dir) to a writable folder"
            ) from err

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)
