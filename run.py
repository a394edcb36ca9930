"""Train (or evaluate) one model on ImageNette: ``python run.py [overrides]``; sweep with ``-m``.

Examples::

    python run.py                                        # the report's hybrid, report recipe
    python run.py -m model=hybrid,resnet50 act=mish,relu6 seed=1,2,3
    python run.py mode=eval ckpt_path=logs/runs/.../checkpoints/last.ckpt
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from omegaconf import DictConfig, OmegaConf

from imagenette_lab import pipeline as P
from imagenette_lab.callbacks import EpochCSVLogger, RunInterrupted, RunRecorder, install_signal_handlers
from imagenette_lab.models import count_params
from imagenette_lab.resolvers import register as register_resolvers

# Read by conf/paths and conf/hydra when Hydra composes the config (at main() call time).
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
register_resolvers()

log = logging.getLogger("imagenette_lab")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    P.validate_config(cfg)  # before any data is touched
    P.resolve_runtime(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    log.info("output folder: %s", run_dir)
    status = P.previous_status(run_dir)
    last_ckpt = run_dir / "checkpoints" / "last.ckpt"
    if cfg.mode == "train" and status == "completed":
        log.info("already completed in %s: skipping (delete metrics.json or use another folder to rerun)", run_dir)
        return json.loads((run_dir / "metrics.json").read_text())["best"]["val/acc"]
    resume = last_ckpt if cfg.mode == "train" and last_ckpt.is_file() else None
    ckpt = P.check_checkpoint(resume or Path(cfg.ckpt_path), cfg) if resume or cfg.mode == "eval" else None
    pl.seed_everything(cfg.seed, workers=True)

    net = instantiate(cfg.model)  # bad flag/model combinations fail here, before any data is touched
    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    module = instantiate(
        cfg.module, _convert_="all", net=net, optimizer=instantiate(cfg.optim), scheduler=instantiate(cfg.sched),
        num_classes=cfg.data.num_classes, hparams={"signature": P.model_signature(cfg)},
    )
    base = {
        "mode": cfg.mode, "run_dir": str(run_dir), "overrides": P.task_overrides(), "model": cfg.model.name,
        "experiment": cfg.get("experiment_name"), "seed": cfg.seed, "max_epochs": cfg.trainer.max_epochs,
        "params": count_params(net), **P.git_revision(), "config": OmegaConf.to_container(cfg, resolve=True),
    }
    recorder = RunRecorder(run_dir, base)
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()] + [recorder]
    # trainer.enable_progress_bar / enable_model_summary=false switch the configured callbacks off too.
    callbacks = [c for c in callbacks if not (isinstance(c, ProgressBar) and not cfg.trainer.enable_progress_bar)
                 and not (isinstance(c, ModelSummary) and not cfg.trainer.enable_model_summary)]
    resume_epoch = ckpt["epoch"] + 1 if resume else None  # epochs finished before the interruption
    loggers = [EpochCSVLogger(run_dir, resume_epoch=resume_epoch), *P.make_loggers(cfg, run_dir)]
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in ("compile", "channels_last"):  # LightningModule settings kept in the trainer group
        trainer_cfg.pop(key)
    trainer: pl.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers)
    if resume:
        log.info("resuming from %s (%d epochs already done; status was %s)", resume, resume_epoch, status)

    restore_signals = install_signal_handlers()
    best, last_epoch = "", {}
    try:
        if cfg.mode == "train":
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
            last_epoch = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.endswith("_step")}
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            # Re-validate the best checkpoint for the final numbers; not an epoch, so not in epochs.csv.
            trainer.loggers = [lg for lg in trainer.loggers if not isinstance(lg, EpochCSVLogger)]
            trainer.validate(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        else:
            trainer.validate(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        P.log_wandb_summary(trainer.loggers, module, list(module.class_names))
    except RunInterrupted as stop:
        log.warning("%s: metrics.json says 'interrupted'; rerun the same command to resume", stop)
        sys.exit(128 + stop.signum)
    except Exception as err:
        log.error("run failed (metrics.json says 'failed'; last.ckpt kept): %s: %s", type(err).__name__, err)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        return None  # a failed job must not stop the rest of an overnight sweep
    finally:
        restore_signals()
        P.finish_wandb()

    recorder.status = "completed"
    result = recorder.snapshot(trainer, module, trainer.current_epoch if cfg.mode == "train" else 0)
    result["last_epoch"] = last_epoch if cfg.mode == "train" else None
    result["evaluated_checkpoint"] = Path(best).name if cfg.mode == "train" else str(cfg.ckpt_path)
    result["class_names"] = list(module.class_names)
    recorder.write(result)
    log.info("val/acc %.4f (best checkpoint) | results: %s", result["final"].get("val/acc", float("nan")), run_dir)
    return result["final"].get("val/acc")


if __name__ == "__main__":
    main()
