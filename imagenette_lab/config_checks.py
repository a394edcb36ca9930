"""Config checks that Hydra's struct mode cannot do, and device-dependent defaults.

Everything here runs before data is touched, so a bad value fails in seconds and names its key.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from imagenette_lab.run_identity import RERUN_POLICIES


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and how to fix it."""



def _check(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: {why}")


def validate_config(cfg: DictConfig) -> None:
    """Range and compatibility checks Hydra's struct mode cannot do (typos are already caught there)."""
    _check(cfg.mode in ("train", "eval"), "mode", cfg.mode, "use mode=train or mode=eval")
    _check(cfg.rerun in RERUN_POLICIES, "rerun", cfg.rerun, f"use one of {', '.join(RERUN_POLICIES)}")
    seed = cfg.seed
    _check(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32, "seed", seed,
           "use an integer in [0, 2**32) (numpy and torch seed range)")
    if cfg.mode == "eval":
        _check(cfg.ckpt_path is not None, "ckpt_path", cfg.ckpt_path, "mode=eval needs ckpt_path=PATH/TO.ckpt")
        _check(Path(str(cfg.ckpt_path)).is_file(), "ckpt_path", cfg.ckpt_path, "no such checkpoint file")
    for key in ("lr", "max_lr"):
        if key in cfg.optim:
            _check(cfg.optim[key] > 0, f"optim.{key}", cfg.optim[key], "the learning rate must be > 0")
    if "max_lr" in cfg.sched.scheduler:
        _check(cfg.sched.scheduler.max_lr > 0, "sched.scheduler.max_lr", cfg.sched.scheduler.max_lr, "must be > 0")
    _check(cfg.optim.get("weight_decay", 0) >= 0, "optim.weight_decay", cfg.optim.get("weight_decay"), "must be >= 0")
    # model flags (drop_rate, act, ...) are checked by create_model, which run.py calls before any data
    # also checked by the datamodule; here because a resolver (batch_scaled_lr) reads it before that exists
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
        if cfg.module.channels_last is None:
            cfg.module.channels_last = on_gpu
        if cfg.optim.get("fused", False) is None:
            cfg.optim.fused = on_gpu  # one kernel for the whole update; on CPU it exists too but measured 1.02x (BENCHMARKS.md)
    if on_gpu:
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts


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
