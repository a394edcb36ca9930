"""LightningModule that trains any registry model as an image classifier."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

OptimizerFactory = Callable[..., torch.optim.Optimizer]


class ClassifierModule(pl.LightningModule):
    """Cross-entropy classifier around a registry model.

    The optimizer and scheduler arrive as Hydra ``_partial_`` factories (``optim`` and ``sched`` config
    groups), so nothing about them is hard-coded here. Logged per epoch: ``train/loss``, ``train/acc``,
    ``val/loss``, ``val/acc`` (micro top-1), ``val/acc_best``, ``val/acc_<class name>`` and ``lr``.
    Timing, throughput and time-to-accuracy are a callback's (:class:`~imagenette_lab.callbacks.TrainingClock`).

    GoogLeNet with auxiliary heads returns ``(logits, aux1, aux2)`` in training; each auxiliary
    cross-entropy is added with weight ``aux_loss_weight``.

    A non-finite training loss raises :class:`FloatingPointError` naming its epoch and step. The training
    step never reads a value back to the host (on a GPU each read stalls the stream): it only records the
    first bad step on the device, and the record is read every ``trainer.log_every_n_steps`` batches,
    before every validation and at the end of every epoch, i.e. before any checkpoint of the epoch that
    went bad is written, so the last good ``last.ckpt`` is kept.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: dict[str, Any] | None = None,
        num_classes: int = 10,
        class_names: Sequence[str] | None = None,
        label_smoothing: float = 0.0,
        aux_loss_weight: float = 0.3,
        channels_last: bool = False,
        compile: bool = False,
        hparams: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # Only plain data goes into hparams (checkpoints load with weights_only=True).
        self.save_hyperparameters(hparams or {}, logger=False)
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_cfg = scheduler or {}
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.label_smoothing = label_smoothing
        self.aux_loss_weight = aux_loss_weight
        self.channels_last = channels_last
        self.compile_net = compile  # not `self.compile`: that would shadow nn.Module.compile
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

        # The step metrics skip torchmetrics' per-update input checks (NaN scan, label range): each is a host
        # read per step, a stall on a GPU. A NaN training loss is caught by `_record_nonfinite` instead, a
        # NaN validation loss shows as val/loss NaN, and labels come from our datamodule, which checks
        # num_classes against the class folders.
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc_per_class = MulticlassAccuracy(num_classes, average=None, validate_args=False)
        self.val_confusion = MulticlassConfusionMatrix(num_classes, validate_args=False)
        self.val_acc_best = MaxMetric()

        # The last validation's per-class accuracy and confusion matrix (metrics.json, W&B).
        self.last_per_class: dict[str, float] = {}
        self.last_confusion: list[list[int]] = []
        self._forward: nn.Module = self.net
        # First non-finite training loss, kept on the device: its optimizer step (-1 = none yet) and value.
        # Plain attributes, not buffers: never in checkpoints, and DDP does not overwrite each rank's own
        # record with rank 0's (it broadcasts buffers every forward).
        self._bad_step = torch.tensor(-1)
        self._bad_loss = torch.tensor(0.0)

    # ---------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "class_names", None)
        if names:
            self.class_names = list(names)
        if self.compile_net and stage == "fit":
            # Compiled wrapper is used for the forward only; the state dict stays the plain `net`.
            self._forward = torch.compile(self.net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._forward(x)
        return out[0] if isinstance(out, tuple) else out

    # ---------------------------------------------------------------- steps
    def _loss(self, out: torch.Tensor | tuple[torch.Tensor, ...], y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, *aux = out if isinstance(out, tuple) else (out,)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        for aux_logits in aux:
            loss = loss + self.aux_loss_weight * F.cross_entropy(aux_logits, y, label_smoothing=self.label_smoothing)
        return loss, logits

    def on_fit_start(self) -> None:
        self._bad_step = torch.tensor(-1, device=self.device)
        self._bad_loss = torch.tensor(0.0, device=self.device)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.trainer.log_every_n_steps
        if every and (batch_idx + 1) % every == 0:
            self._raise_if_nonfinite()

    def _record_nonfinite(self, loss: torch.Tensor) -> None:
        """Remember the first step whose loss is NaN/inf, with device ops only (no host read)."""
        first = ~torch.isfinite(loss.detach()) & (self._bad_step < 0)
        self._bad_step = torch.where(first, self.global_step, self._bad_step)
        self._bad_loss = torch.where(first, loss.detach().float(), self._bad_loss)

    def _raise_if_nonfinite(self) -> None:
        """Raise if any rank saw a non-finite training loss since the start: one host read (+ one
        all-reduce under DDP, so every rank stops together) per call."""
        step = int(self._bad_step)
        if not self.trainer.strategy.reduce_boolean_decision(step >= 0, all=False):
            return
        # Checks run at least at every epoch end, so a bad step always lies in the current epoch.
        where = (f"training loss is {float(self._bad_loss)} at epoch {self.current_epoch}, step {step}"
                 if step >= 0 else f"training loss is non-finite on another rank by step {self.global_step}")
        raise FloatingPointError(
            f"{where} (the first non-finite step; the loss is checked every trainer.log_every_n_steps="
            f"{self.trainer.log_every_n_steps} batches and at epoch end): lower optim.lr, enable "
            "trainer.gradient_clip_val, or use trainer.precision=32-true"
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, logits = self._loss(self._forward(x), y)
        self._record_nonfinite(loss)
        self.train_loss(loss.detach())
        self.train_acc(logits.detach(), y)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=y.shape[0])
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=y.shape[0])
        return loss

    def on_validation_start(self) -> None:
        # Before validation, whose end saves the epoch's checkpoints (ModelCheckpoint.on_validation_end).
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self._raise_if_nonfinite()

    def on_train_epoch_end(self) -> None:
        # Before the checkpoint callbacks' own on_train_epoch_end (Lightning runs them after this hook).
        self._raise_if_nonfinite()
        # lr used during this epoch (epoch-interval schedulers step after this hook)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.val_loss(loss)
        self.val_acc(logits, y)
        self.val_acc_per_class(logits, y)
        self.val_confusion(logits, y)
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True, batch_size=y.shape[0])
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True, batch_size=y.shape[0])

    def on_validation_epoch_end(self) -> None:
        # torchmetrics syncs these across DDP ranks on compute().
        per_class = self.val_acc_per_class.compute()
        confusion = self.val_confusion.compute()
        self.val_acc_per_class.reset()
        self.val_confusion.reset()
        if self.trainer.sanity_checking:
            return
        acc = float(self.val_acc.compute())
        self.val_acc_best(torch.tensor(acc, device=self.device))
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)
        self.last_per_class = {n: float(a) for n, a in zip(self.class_names, per_class.tolist(), strict=True)}
        for name, value in self.last_per_class.items():
            self.log(f"val/acc_{name}", value)
        self.last_confusion = confusion.int().tolist()

    # ---------------------------------------------------------------- optim
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        factory = self.scheduler_cfg.get("scheduler")
        if factory is None:
            return optimizer
        interval = self.scheduler_cfg.get("interval", "epoch")
        kwargs: dict[str, Any] = {}
        if isinstance(getattr(factory, "func", None), type) and factory.func is torch.optim.lr_scheduler.OneCycleLR:
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = factory(optimizer=optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    # ---------------------------------------------------------------- state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # MaxMetric's state is not in the state dict (torchmetrics keeps it out): kept here for resumes.
        checkpoint["run_state"] = {
            "val_acc_best": float(self.val_acc_best.compute()) if self.val_acc_best.update_called else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("run_state", {})
        if state.get("val_acc_best") is not None:
            self.val_acc_best(torch.tensor(state["val_acc_best"]))
