"""Exact resume: a run killed by a real SIGTERM and rerun equals the uninterrupted run.

The runs are tiny but use every random stream: shuffled batches, random train and validation crops,
flips, random erasing, dropout (head and blocks) and a per-epoch cosine schedule.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from imagenette_lab.callbacks import read_epochs_csv
from imagenette_lab.data import ImagenetteDataModule
from imagenette_lab.resume import (
    STREAMS,
    AtomicCheckpointIO,
    ExactResume,
    global_rng_state,
    seeded_generator,
    set_global_rng_state,
)
from tests.test_train import CLI_ENV, REPO, SMALL_HYBRID, TINY, cli_command, compose_cfg, run_cli


class PauseAt(pl.Callback):
    """Test-only callback: at the start of epoch ``epoch`` (0-based; the previous epoch's checkpoint, row and
    metrics.json all written) or before its ``batch`` (0-based), write ``marker`` and wait for the test's
    SIGTERM. Once the marker exists it never pauses again, so the rerun
    (the very same command) passes through."""

    def __init__(self, marker: str, epoch: int, batch: int | None = None) -> None:
        self.marker = Path(marker)
        self.epoch = epoch
        self.batch = batch

    def _pause(self, trainer: pl.Trainer) -> None:
        if self.marker.exists():
            return
        self.marker.write_text(f"{os.getpid()} {trainer.current_epoch}\n")
        deadline = time.time() + 300  # s; the test kills the process long before
        while time.time() < deadline:
            time.sleep(0.05)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.batch is None and trainer.current_epoch == self.epoch:
            self._pause(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.batch is not None and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            self._pause(trainer)


EPOCHS = 3
# Every random stream in play: random crops for training and validation, flips and erasing (data
# defaults 0.5), dropout in the head and in every block, and a learning rate that changes each epoch.
RESUME_ARGS = [
    *TINY, *SMALL_HYBRID, "logger=none", f"trainer.max_epochs={EPOCHS}", "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=3", "data.val_crop=random", "model.drop_rate=0.3", "model.block_drop_rate=0.1",
    "sched.scheduler.T_max=3",
    "trainer.log_every_n_steps=1",  # step-level logs in the killed epoch, which must not count as a finished one
    "++trainer.plugins=[{_target_: imagenette_lab.resume.AtomicCheckpointIO}]",  # the default once conf has it
]


def _epochs_csv(run: Path) -> list[dict[str, float]]:
    # wall-clock columns are the only ones allowed to differ; NaN (a class absent from the few validation
    # batches) is made comparable
    return [{k: ("nan" if v != v else v) for k, v in row.items() if not k.startswith("time/")}
            for row in read_epochs_csv(run / "epochs.csv")]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def _start_and_kill(args: list[str], tmp: Path, marker: Path, log: Path) -> None:
    """Start ``run.py``; SIGTERM it once :class:`PauseAt` wrote ``marker``; check it exits as interrupted."""
    proc = subprocess.Popen(cli_command(args, tmp), cwd=REPO, env=CLI_ENV, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)  # a file, not a pipe: nobody reads it while we poll
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.05)
    assert marker.exists(), log.read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, log.read_text()[-3000:]


@pytest.mark.slow
def test_sigterm_and_rerun_equals_the_uninterrupted_run(tmp_path: Path, mini_archive: Path) -> None:
    """Killed between epochs 1 and 2, rerun and killed again in the middle of epoch 3, rerun to the end: every per-epoch value and every final weight is bit for bit
    the uninterrupted run's (CPU, one thread)."""
    full = tmp_path / "full"
    run_cli([*RESUME_ARGS, f"data.archive={mini_archive}", f"hydra.run.dir={full}"], tmp_path)
    want_rows, want_weights = _epochs_csv(full), _weights(full)
    assert [r["epoch"] for r in want_rows] == list(range(1, EPOCHS + 1))
    assert len({r["lr"] for r in want_rows}) == EPOCHS  # the schedule really moves each epoch

    # One command for every attempt; each PauseAt pauses once.
    run = tmp_path / "killed"
    boundary, mid_epoch = tmp_path / "boundary.paused", tmp_path / "mid_epoch.paused"
    args = [*RESUME_ARGS, f"data.archive={mini_archive}", f"hydra.run.dir={run}",
            "+callbacks.boundary._target_=tests.test_resume.PauseAt", f"+callbacks.boundary.marker={boundary}",
            "+callbacks.boundary.epoch=1",
            "+callbacks.mid_epoch._target_=tests.test_resume.PauseAt", f"+callbacks.mid_epoch.marker={mid_epoch}",
            "+callbacks.mid_epoch.epoch=2", "+callbacks.mid_epoch.batch=2",
            # a no-op on a clean clone; in a shared checkout someone may edit the code while this test runs
            "rerun=accept_code"]
    last = run / "checkpoints" / "last.ckpt"
    for marker, done in ((boundary, 1), (mid_epoch, 2)):
        _start_and_kill(args, tmp_path, marker, tmp_path / f"{marker.stem}.out")
        assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
        assert last.is_file() and not last.is_symlink(), "last.ckpt must be a file of its own"
        assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] + 1 == done
        assert [r["epoch"] for r in _epochs_csv(run)] == list(range(1, done + 1))
    clock = torch.load(last, map_location="cpu", weights_only=True)["callbacks"]["TrainingClock"]
    run_cli(args, tmp_path)
    # the training clock continues from the checkpoint: two epochs of earlier attempts plus this one's
    rows = read_epochs_csv(run / "epochs.csv")
    this_attempt = sum(float(r["time/epoch_s"]) for r in rows if r["epoch"] > 2)
    assert clock["train_seconds"] > 0
    slack = float(rows[-1]["time/epoch_s"]) / 2  # the last epoch_s also counts its checkpoint save
    assert json.loads((run / "metrics.json").read_text())["train_seconds"] >= clock["train_seconds"] + this_attempt - slack

    # each attempt continued from the epochs its checkpoint held, not from what the logs had reached
    assert [a["from_epoch"] for a in json.loads((run / "metrics.json").read_text())["attempts"]] == [0, 1, 2]
    got_rows = _epochs_csv(run)
    assert len(got_rows) == EPOCHS
    for want, got in zip(want_rows, got_rows, strict=True):
        assert got == want, f"epoch {want['epoch']} differs from the uninterrupted run's"
    got_weights = _weights(run)
    assert got_weights.keys() == want_weights.keys()
    differing = [k for k, v in want_weights.items() if not torch.equal(v, got_weights[k])]
    assert not differing, f"final weights differ from the uninterrupted run's: {differing[:5]}"


@pytest.mark.slow
def test_a_run_that_validates_only_at_the_end_resumes(tmp_path: Path, mini_archive: Path) -> None:
    """`make train` validates once, at the end: killed between epochs it still leaves last.ckpt of the
    epoch it finished, and the rerun resumes from it (Lightning alone writes it only after a validation)."""
    run, marker = tmp_path / "run", tmp_path / "boundary.paused"
    args = [*RESUME_ARGS, f"data.archive={mini_archive}", f"hydra.run.dir={run}",
            f"trainer.check_val_every_n_epoch={EPOCHS}",
            "+callbacks.boundary._target_=tests.test_resume.PauseAt", f"+callbacks.boundary.marker={marker}",
            "+callbacks.boundary.epoch=2", "rerun=accept_code"]
    _start_and_kill(args, tmp_path, marker, tmp_path / "killed.out")
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file(), "no last.ckpt after two epochs without validation"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 1  # 0-based: epochs 1-2 done
    run_cli(args, tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs_completed"] == EPOCHS
    assert [a["action"] for a in metrics["attempts"]] == ["fresh", "resume"], metrics["attempts"]
    assert metrics["attempts"][-1]["from_epoch"] == 2


# ------------------------------------------------------------------------------------------ pieces
def test_streams_never_coincide_across_streams_seeds_and_ranks() -> None:
    """``seed + k`` seeding made seed 1's augmentation stream seed 2's shuffle stream; SeedSequence keys do not."""
    draws = {(seed, stream, rank): tuple(torch.rand(4, generator=seeded_generator(seed, stream, rank)).tolist())
             for seed in range(6) for stream in STREAMS for rank in range(3)}
    assert len(set(draws.values())) == len(draws)
    with pytest.raises(ValueError, match="seed=-1"):
        seeded_generator(-1, "shuffle")


def _epoch(dm: ImagenetteDataModule) -> list[torch.Tensor]:
    """One epoch of everything random: shuffled labels, augmented training crops, random validation crops."""
    train = [dm.device_transform(batch, train=True) for batch in dm.train_dataloader()]
    val = [x for x, _ in dm.val_dataloader()]
    return [torch.cat([y for _, y in train]), torch.cat([x for x, _ in train]), torch.cat(val)]


def test_datamodule_state_continues_every_stream(tmp_path: Path, mini_root: Path) -> None:
    """A datamodule restored from a (weights_only) checkpoint state draws epoch 2 exactly as the one that went
    on, whether the state is loaded after ``setup`` (as Lightning does) or before it."""

    def make() -> ImagenetteDataModule:
        return ImagenetteDataModule(data_dir=tmp_path, root=mini_root, resize=40, crop=32, batch_size=8,
                                    num_workers=0, val_crop="random", seed=3)

    def ready(dm: ImagenetteDataModule) -> ImagenetteDataModule:
        dm.prepare_data()
        dm.setup("fit")
        return dm

    original = ready(make())
    epoch1 = _epoch(original)
    saved = io.BytesIO()
    torch.save(original.state_dict(), saved)
    epoch2 = _epoch(original)
    assert not torch.equal(epoch1[1], epoch2[1])  # the streams move on between epochs

    for load_first in (False, True):
        resumed = make()
        saved.seek(0)
        state = torch.load(saved, weights_only=True)
        if load_first:
            resumed.load_state_dict(state)
            ready(resumed)
        else:
            ready(resumed).load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(_epoch(resumed), epoch2, strict=True)), load_first
    fresh = _epoch(ready(make()))  # without the state a rerun replays epoch 1
    assert all(torch.equal(a, b) for a, b in zip(fresh, epoch1, strict=True))


def test_streams_follow_the_rank_lightning_sets_up(tmp_path: Path, mini_root: Path) -> None:
    """run.py sets the datamodule up before a trainer exists (rank 0); Lightning's setup on DDP rank 1 must
    give that rank its own streams, and a later setup (validate) must not reseed them."""
    dm = ImagenetteDataModule(data_dir=tmp_path, root=mini_root, resize=40, crop=32, batch_size=8, num_workers=0,
                              seed=3)
    dm.prepare_data()
    dm.setup("fit")
    rank0 = dm.streams.states()
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2, training=True)
    dm.setup("fit")
    rank1 = dm.streams.states()
    assert all(not torch.equal(rank0[k]["state"], rank1[k]["state"]) for k in rank0)
    next(iter(dm.train_dataloader()))  # draws
    drawn = dm.streams.states()
    dm.setup("validate")
    assert all(torch.equal(drawn[k]["state"], v["state"]) for k, v in dm.streams.states().items())


def test_global_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    callback = ExactResume()
    path = tmp_path / "state.pt"
    torch.save(callback.state_dict(), path)
    want = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    resumed = ExactResume()
    resumed.load_state_dict(torch.load(path, weights_only=True))
    torch.manual_seed(123), np.random.seed(123), random.seed(123)  # what a fresh process would have
    resumed.on_train_start(SimpleNamespace(global_rank=0, world_size=1), None)
    got = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]
    set_global_rng_state(global_rng_state())  # the inverse pair alone round-trips too
    assert torch.equal(torch.get_rng_state(), global_rng_state()["torch"])


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_save_fails(tmp_path: Path) -> None:
    class Unsaveable:
        def __reduce__(self) -> Any:
            raise RuntimeError("cannot pickle this")

    checkpoint_io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint_io.save_checkpoint({"w": torch.arange(3)}, path)
    checkpoint_io.save_checkpoint({"w": torch.arange(4)}, path)  # replaces it
    with pytest.raises(RuntimeError, match="cannot pickle"):
        checkpoint_io.save_checkpoint({"w": torch.zeros(10_000), "bad": Unsaveable()}, path)
    assert torch.equal(checkpoint_io.load_checkpoint(path, weights_only=True)["w"], torch.arange(4))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left behind
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_default_trainer_writes_checkpoints_atomically(tmp_path: Path) -> None:
    cfg = compose_cfg(["trainer=cpu", f"trainer.default_root_dir={tmp_path}"])
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
