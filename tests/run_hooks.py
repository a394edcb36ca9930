"""Test-only Lightning callbacks, added to real runs from the command line
(``+callbacks.poison._target_=tests.run_hooks.PoisonWeights``); never used by the package."""

from __future__ import annotations

import lightning.pytorch as pl
import torch


class PoisonWeights(pl.Callback):
    """Sets every weight to NaN when epoch ``epoch`` (0-based) starts: the next training loss is NaN."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))


class WaitForFile(pl.Callback):
    """Holds the run at the end of its first training epoch until ``path`` exists (at most ``timeout_s``
    seconds), so a test can act while the run is certainly alive and mid-way."""

    def __init__(self, path: str, timeout_s: float = 600.0) -> None:
        self.path = path
        self.timeout_s = timeout_s

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time
        from pathlib import Path

        deadline = time.time() + self.timeout_s
        while trainer.current_epoch == 0 and not Path(self.path).exists() and time.time() < deadline:
            time.sleep(0.05)
