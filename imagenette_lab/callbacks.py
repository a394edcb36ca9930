"""Run bookkeeping written by hand (no library keeps these): the per-epoch CSV, ``metrics.json`` and
preemption signals.

- :class:`EpochCSVLogger` is a Lightning logger that keeps one row per epoch in ``<run>/epochs.csv``,
  rewritten atomically, so a resumed run continues the same file (Lightning's CSVLogger starts a new
  version folder on every start).
- :class:`RunRecorder` writes ``<run>/metrics.json`` at every epoch (status ``running``), on failure
  (``failed``) and on SIGTERM/SIGINT (``interrupted``); ``run.py`` writes the final ``completed`` one.
- :class:`TrainingClock` times epochs and training throughput and records time-to-accuracy; its record
  goes into checkpoints, so a resumed run continues the clock. (Lightning's ``Timer`` callback measures
  stage durations but neither images/s nor the first epoch that reaches an accuracy.)
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

METRICS_FILE = "metrics.json"
EPOCHS_FILE = "epochs.csv"


class RunInterrupted(BaseException):
    """Raised from the SIGTERM/SIGINT handler so Lightning stops at once and callbacks see it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


# SIGTERM: plain kills and SLURM's end of job; SIGINT: Ctrl-C; SIGUSR2: SLURM's pre-timeout/preemption
# warning as submitit configures it (--signal=USR2@<signal_delay_s>).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


class SignalHandlers:
    """Turns :data:`STOP_SIGNALS` into :class:`RunInterrupted` while installed, keeping the handlers they
    replaced so the run can hand the signal on (to submitit's checkpoint-and-requeue) once its state is safe.

    Installed before ``trainer.fit`` so Lightning's own SIGTERM notifier chains to it.
    """

    def __init__(self) -> None:
        global _ACTIVE
        self.previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        self.held = False  # while True a signal is noted, not raised (see hold_signals)
        self.pending: int | None = None
        for s in STOP_SIGNALS:
            signal.signal(s, self._raise)
        _ACTIVE = self

    def _raise(self, signum: int, _frame: Any) -> None:
        if self.held:
            self.pending = signum
            return
        raise RunInterrupted(signum)

    def restore(self) -> None:
        global _ACTIVE
        for s, h in self.previous.items():
            signal.signal(s, h)
        _ACTIVE = None

    def hand_on(self, signum: int) -> None:
        """Call the handler this one replaced for ``signum`` when it is a Python function (submitit's
        requeue for SIGUSR2 on a cluster); a default or ignored handler does nothing here."""
        previous = self.previous.get(signal.Signals(signum))
        if callable(previous) and previous not in (signal.default_int_handler,):
            previous(signum, None)


_ACTIVE: SignalHandlers | None = None


def install_signal_handlers() -> SignalHandlers:
    """Install :class:`SignalHandlers`; call ``.restore()`` when the run is over."""
    return SignalHandlers()


def hold_signals() -> None:
    """From an epoch's checkpoint until the next epoch starts, a stop signal waits: Lightning logs the
    epoch's training metrics after the checkpoint, and a stop in between would lose that epochs.csv row
    although the resume (from that checkpoint) never redoes the epoch."""
    if _ACTIVE is not None:
        _ACTIVE.held = True


def release_signals() -> None:
    """End :func:`hold_signals`; a signal that arrived meanwhile is raised now."""
    if _ACTIVE is not None:
        _ACTIVE.held = False
        if _ACTIVE.pending is not None:
            signum, _ACTIVE.pending = _ACTIVE.pending, None
            raise RunInterrupted(signum)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them (crash safety)
        os.replace(tmp, path)
    except BaseException:  # a stop signal can land here: leave no temp file behind
        Path(tmp).unlink(missing_ok=True)
        raise


def read_epochs_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of an ``epochs.csv`` as dicts of floats (missing cells become NaN), ``epoch`` as int."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed: dict[str, Any] = {k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items()}
            parsed["epoch"] = int(parsed["epoch"])
            rows.append(parsed)
    return rows


class EpochCSVLogger(Logger):
    """One row per epoch (1-based ``epoch``) of every epoch-level metric, in ``<save_dir>/epochs.csv``.

    Step-level values (``*_step``) are dropped and ``*_epoch`` suffixes removed. On resume, rows of
    epochs after ``resume_epoch`` (from the interrupted attempt) are dropped so the log stays continuous.
    """

    def __init__(self, save_dir: str | Path, resume_epoch: int | None = None) -> None:
        super().__init__()
        self._path = Path(save_dir) / EPOCHS_FILE
        self._rows: dict[int, dict[str, float]] = {}
        if resume_epoch is not None:
            for row in read_epochs_csv(self._path):
                if row["epoch"] <= resume_epoch:
                    self._rows[row["epoch"]] = row

    @property
    def name(self) -> str:
        return "epochs"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self._path.parent)

    @property
    @rank_zero_experiment
    def experiment(self) -> None:
        return None

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the resolved config is saved by Hydra and in metrics.json

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "epoch" not in metrics:
            return
        values = {key.removesuffix("_epoch"): float(value) for key, value in metrics.items()
                  if key != "epoch" and not key.endswith("_step")}
        if not values:  # a step-level log (trainer.log_every_n_steps): a row is an epoch's end, never its middle
            return
        epoch = int(metrics["epoch"]) + 1
        row = self._rows.setdefault(epoch, {"epoch": epoch})
        row.update(values)
        if step is not None:
            row["step"] = float(step)
        self.save()

    @rank_zero_only
    def save(self) -> None:
        if not self._rows:
            return
        keys = ["epoch", *sorted({k for r in self._rows.values() for k in r} - {"epoch"})]
        lines = [",".join(keys)]
        for epoch in sorted(self._rows):
            row = self._rows[epoch]
            lines.append(",".join(_fmt(row.get(k)) for k in keys))
        atomic_write_text(self._path, "\n".join(lines) + "\n")


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


class TrainingClock(pl.Callback):
    """Per epoch, logs ``time/epoch_s`` (the whole epoch: training, validation, checkpoints),
    ``time/train_s`` and ``time/train_images_per_s`` (training batches only, data loading included), and
    records in :attr:`time_to_acc` the first epoch and elapsed training seconds at which ``val/acc`` reaches
    each of ``acc_thresholds``. Its state travels in checkpoints, so ``train_seconds`` and ``time_to_acc``
    count the earlier attempts of a resumed run. Timing never changes a result: not in a run's identity.
    """

    def __init__(self, acc_thresholds: Sequence[float] = (0.80, 0.85, 0.90)) -> None:
        self.time_to_acc: dict[str, dict[str, float] | None] = {f"{float(t):.2f}": None for t in acc_thresholds}
        self.train_seconds = 0.0  # s, wall time of training+validation epochs, earlier attempts included
        self.throughput: dict[str, float] = {}
        self._before_resume = 0.0  # s, train_seconds of earlier attempts (restored from the checkpoint)
        self._restored: dict[str, Any] | None = None  # a checkpoint's record, applied when training starts
        self._fit_start = self._epoch_start = self._last_batch_end = 0.0
        self._epoch_images = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Only a resumed fit continues a checkpoint's record: validating the best checkpoint at the end also
        # loads callback states, and must not turn the clock back to that epoch.
        if self._restored is not None:
            self.time_to_acc.update(self._restored.get("time_to_acc", {}))
            self.train_seconds = float(self._restored.get("train_seconds", 0.0))
            self._restored = None
        self._before_resume = self.train_seconds

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last_batch_end = time.perf_counter()
        self._epoch_images = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._epoch_images += len(batch[1])  # the labels: a size on the host, no device read
        self._last_batch_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        train_s = self._last_batch_end - self._epoch_start
        epoch_s = time.perf_counter() - self._epoch_start
        ips = self._epoch_images * trainer.world_size / max(train_s, 1e-9)
        self.throughput = {"train_images_per_s": ips, "train_s": train_s, "epoch_s": epoch_s}
        pl_module.log_dict({"time/train_images_per_s": ips, "time/train_s": train_s, "time/epoch_s": epoch_s})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the epoch's metrics are aggregated, before the checkpoint callbacks (Lightning runs them last),
        # so the checkpoint of the epoch that first reached a threshold records it.
        if trainer.state.fn != "fit" or trainer.sanity_checking or "val/acc" not in trainer.callback_metrics:
            return
        acc = float(trainer.callback_metrics["val/acc"])
        self.train_seconds = self._before_resume + time.perf_counter() - self._fit_start
        for key, hit in self.time_to_acc.items():
            if hit is None and acc >= float(key):
                self.time_to_acc[key] = {"epoch": trainer.current_epoch + 1, "seconds": self.train_seconds}

    def state_dict(self) -> dict[str, Any]:
        return {"time_to_acc": self.time_to_acc, "train_seconds": self.train_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before the clock was a callback kept its record in the module's "run_state".
        if "run_state" in checkpoint and not any("TrainingClock" in k for k in checkpoint.get("callbacks", {})):
            self._restored = checkpoint["run_state"]


def clock_of(trainer: pl.Trainer) -> TrainingClock | None:
    return next((c for c in trainer.callbacks if isinstance(c, TrainingClock)), None)


class RunRecorder(pl.Callback):
    """Keeps ``<run>/metrics.json`` current: ``running`` after each epoch, ``failed`` or ``interrupted``
    when training stops early (the last good ``last.ckpt`` is kept), via ``write``.

    ``base`` holds what is known before training (config, seed, git revision, parameter count...).
    """

    def __init__(self, run_dir: str | Path, base: dict[str, Any]) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.base = base
        self.status = "running"

    def snapshot(self, trainer: pl.Trainer, module: pl.LightningModule, epochs_completed: int) -> dict[str, Any]:
        """Everything the report needs, from the module's bookkeeping and the trainer's metrics."""
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        ckpt = trainer.checkpoint_callback
        best_score = getattr(ckpt, "best_model_score", None)
        clock = clock_of(trainer)
        return {
            **self.base,
            "status": self.status,
            "epochs_completed": epochs_completed,
            "final": {k: v for k, v in metrics.items() if not k.endswith("_step")},
            "best": {
                "val/acc": float(best_score) if best_score is not None else None,
                "checkpoint": os.path.basename(getattr(ckpt, "best_model_path", "") or "") or None,
            },
            "per_class_acc": getattr(module, "last_per_class", {}),
            "confusion_matrix": getattr(module, "last_confusion", []),
            "time_to_acc": clock.time_to_acc if clock else {},
            "train_seconds": clock.train_seconds if clock else None,
            "throughput": clock.throughput if clock else {},
        }

    @rank_zero_only
    def write(self, data: dict[str, Any]) -> None:
        atomic_write_text(self.path, json.dumps(data, indent=2, default=str) + "\n")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # from here (before the checkpoint callbacks, which Lightning runs last) until the next epoch starts,
        # a stop signal waits: the checkpoint and the epoch's row are written whole
        hold_signals()
        if not trainer.sanity_checking:
            self.write(self.snapshot(trainer, pl_module, trainer.current_epoch + 1))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        release_signals()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        release_signals()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        interrupted = isinstance(exception, RunInterrupted | KeyboardInterrupt)
        self.status = "interrupted" if interrupted else "failed"
        data = self.snapshot(trainer, pl_module, trainer.current_epoch)
        data["error"] = f"{type(exception).__name__}: {exception}"
        self.write(data)
