"""Train (or evaluate) one model on ImageNette: ``python run.py [overrides]``; sweep with ``-m``.

Examples::

    python run.py                                        # the report's hybrid, report recipe
    python run.py -m model=hybrid,resnet50 act=mish,relu6 seed=1,2,3
    python run.py mode=eval ckpt_path=logs/runs/.../checkpoints/last.ckpt
    python run.py --cfg job                              # print the composed config and exit
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from imagenette_lab.callbacks import (
    EpochCSVLogger,
    RunInterrupted,
    RunRecorder,
    TrainingClock,
    install_signal_handlers,
)
from imagenette_lab.config_checks import resolve_runtime, validate_config
from imagenette_lab.loggers import finish_wandb, log_wandb_summary, make_loggers
from imagenette_lab.models import count_params
from imagenette_lab.provenance import attempt_record
from imagenette_lab.resolvers import register as register_resolvers
from imagenette_lab.run_identity import (
    Plan,
    RunIdentityError,
    data_identity,
    fingerprint,
    load_checkpoint,
    model_signature,
    plan_run,
    redacted,
    task_overrides,
    write_identity,
)
from imagenette_lab.run_lock import RunBusyError, RunLock

# Read by conf/paths and conf/hydra when Hydra composes the config (at main() call time).
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
register_resolvers()
# Rank 0 tells the processes Lightning starts for the other DDP ranks which checkpoint it resumes from.
RESUME_ENV = "IMAGENETTE_LAB_RESUME"

log = logging.getLogger("imagenette_lab")


def save_hydra_files(run_dir: Path, cfg: DictConfig) -> None:
    """What Hydra's ``output_subdir`` would save, written only once this process owns the folder."""
    out = run_dir / ".hydra"
    out.mkdir(exist_ok=True)
    hydra_cfg = HydraConfig.get()
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), out / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, out / "overrides.yaml")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    validate_config(cfg)  # before any data is touched
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if rank_zero_only.rank != 0:  # a DDP rank started by rank 0, which owns the folder
        return run(cfg, run_dir, lead=False)
    try:
        with RunLock(run_dir):
            save_hydra_files(run_dir, cfg)
            return run(cfg, run_dir, lead=True)
    except (RunBusyError, RunIdentityError) as err:
        log.error("%s", err)
        if multirun:
            return None  # the other jobs of the sweep go on
        sys.exit(2)


def run(cfg: DictConfig, run_dir: Path, lead: bool) -> float | None:
    resolve_runtime(cfg)
    log.info("output folder: %s", run_dir)
    train = cfg.mode == "train"
    fp = fingerprint(cfg, data={})
    if lead and train:
        plan_run(run_dir, fp, cfg.rerun)  # refuses a config/code mismatch before the data is prepared
    pl.seed_everything(cfg.seed, workers=True)
    net = instantiate(cfg.model)  # bad flag/model combinations fail here, before any data is touched
    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    fp["data"] = data_identity(datamodule)
    # which archive and normalization a result came from (pages show them); not part of the digest
    fp["data"].update(sizes=datamodule.image_sizes(), normalization=datamodule.normalization)
    plan = Plan("fresh")
    if not train:
        load_checkpoint(Path(cfg.ckpt_path), cfg)
    elif lead:
        plan = plan_run(run_dir, fp, "accept_code" if cfg.rerun == "accept_code" else "strict")
        for note in plan.notes:
            log.warning("%s", note)
        if plan.action == "skip":
            result = json.loads((run_dir / "metrics.json").read_text())
            same = "config and data (code accepted as it is)" if plan.notes else "config, data and code"
            log.info("already completed in %s with the same %s: skipping (val/acc %.4f)",
                     run_dir, same, result["final"].get("val/acc", float("nan")))
            return result["final"].get("val/acc")
        if plan.checkpoint is not None:
            # a damaged last.ckpt is named here, before anything is written; the epochs it holds (written at the end
            # of a training epoch, numbered from 0) are what the run continues from, whatever the logs got to
            plan.epochs_done = int(load_checkpoint(plan.checkpoint, cfg)["epoch"]) + 1
            os.environ[RESUME_ENV] = str(plan.checkpoint)
        else:
            os.environ.pop(RESUME_ENV, None)
    else:
        resume_path = os.environ.get(RESUME_ENV)
        plan = Plan("resume", checkpoint=Path(resume_path)) if resume_path else plan
    resume = plan.checkpoint if train else None

    attempts = [*plan.attempts, attempt_record(plan.action, from_epoch=plan.epochs_done if resume else 0)]
    if lead and train:
        write_identity(run_dir, fp, attempts)
    module = instantiate(
        cfg.module, _convert_="all", net=net, optimizer=instantiate(cfg.optim), scheduler=instantiate(cfg.sched),
        num_classes=cfg.data.num_classes, hparams={"signature": model_signature(cfg)},
    )
    base = {
        "mode": cfg.mode, "run_dir": run_dir.name, "overrides": task_overrides(), "model": cfg.model.name,
        "experiment": cfg.get("experiment_name"), "seed": cfg.seed, "max_epochs": cfg.trainer.max_epochs,
        "params": count_params(net), **attempts[-1], "attempts": attempts, "data": fp["data"],
        "code": fp["code"], "config": redacted(OmegaConf.to_container(cfg, resolve=True)),
    }
    recorder = RunRecorder(run_dir, base)
    trainer = make_trainer(cfg, run_dir, recorder, resume_epoch=plan.epochs_done if resume else None)
    if resume:
        log.info("resuming from %s (%d epochs already done; status was %s)", resume, plan.epochs_done,
                 plan.previous_status)
    return fit_and_record(cfg, trainer, module, datamodule, recorder, resume)


def make_trainer(cfg: DictConfig, run_dir: Path, recorder: RunRecorder, resume_epoch: int | None) -> pl.Trainer:
    # The clock, then the recorder: the epoch's timing is in the recorder's metrics.json of the same epoch, and
    # the recorder's epoch-start hook releases stop signals held since the last epoch end before any callback
    # that does work runs (the clock only reads a timer; Lightning moves the checkpoint callbacks last itself).
    configured = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    clocks = [c for c in configured if isinstance(c, TrainingClock)]
    callbacks = [*clocks, recorder, *(c for c in configured if not isinstance(c, TrainingClock))]
    # trainer.enable_progress_bar / enable_model_summary=false switch the configured callbacks off too.
    callbacks = [c for c in callbacks if not (isinstance(c, ProgressBar) and not cfg.trainer.enable_progress_bar)
                 and not (isinstance(c, ModelSummary) and not cfg.trainer.enable_model_summary)]
    loggers = [EpochCSVLogger(run_dir, resume_epoch=resume_epoch), *make_loggers(cfg, run_dir)]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)


def fit_and_record(cfg: DictConfig, trainer: pl.Trainer, module: Any, datamodule: Any, recorder: RunRecorder,
                   resume: Path | None) -> float | None:
    signals = install_signal_handlers()
    best, last_epoch, exit_code = "", {}, 0
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
        log_wandb_summary(trainer.loggers, module, list(module.class_names))
    except RunInterrupted as stop:
        exit_code = 128 + stop.signum
        log.warning("%s: metrics.json says 'interrupted'; rerun the same command to resume", stop)
        finish_wandb(exit_code)
        signals.restore()
        signals.hand_on(stop.signum)  # submitit (SLURM): checkpoint the job and requeue it
        sys.exit(exit_code)
    except Exception as err:
        exit_code = 1
        log.error("run failed (metrics.json says 'failed'; last.ckpt kept): %s: %s", type(err).__name__, err)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        return None  # a failed job must not stop the rest of an overnight sweep
    finally:
        signals.restore()
        finish_wandb(exit_code)

    recorder.status = "completed"
    result = recorder.snapshot(trainer, module, trainer.current_epoch if cfg.mode == "train" else 0)
    result["last_epoch"] = last_epoch if cfg.mode == "train" else None
    result["evaluated_checkpoint"] = Path(best).name if cfg.mode == "train" else str(cfg.ckpt_path)
    result["class_names"] = list(module.class_names)
    recorder.write(result)
    log.info("val/acc %.4f (best checkpoint) | results: %s", result["final"].get("val/acc", float("nan")),
             recorder.path.parent)
    return result["final"].get("val/acc")


if __name__ == "__main__":
    main()
