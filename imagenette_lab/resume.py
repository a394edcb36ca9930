"""Exact resume: independent seeded random streams, their states in checkpoints, atomic checkpoint files.

A run killed at any point and rerun must continue exactly where the uninterrupted run would be. That
needs three things no library provides together, so they are written here:

* :func:`seeded_generator`: every random stream of the data pipeline (shuffle, crops, augmentation),
  per rank, is seeded from one :class:`numpy.random.SeedSequence` ``(seed, spawn_key=(stream, rank))``,
  so no stream of one seed is a stream of another seed (``seed + 1`` style seeding overlaps);
* :class:`ExactResume`: the global torch (CPU and current CUDA device), numpy and Python RNG states
  of every rank (dropout, the PIL pipeline's transforms...) go into checkpoints and are put back when
  training resumes (Lightning 2.6 saves none of them), and the sanity check draws nothing from the
  datamodule's streams;
* :class:`AtomicCheckpointIO`: checkpoint files are written to a temp file in the same folder, fsynced and
  renamed over the old one. Lightning's own ``_atomic_save`` writes a local file through an fsspec
  transaction whose temp file lives in the system temp folder, so on another file system the "rename"
  is a copy over the old checkpoint, and nothing is fsynced.

Checkpoints are loaded with ``weights_only=True``, so every state here is made of tensors, ints, floats,
strings, tuples, lists and dicts only (no numpy arrays).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import fsspec
import lightning.pytorch as pl
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

# Stream ids are part of the seeding: never reorder or reuse one (it would change every seeded run).
STREAMS = {"shuffle": 0, "train_crop": 1, "val_crop": 2, "augment": 3}
_UMASK = os.umask(0)  # read once (the only way to read it is to set it), to give checkpoints normal modes
os.umask(_UMASK)


# ------------------------------------------------------------------------------------------ streams
def stream_seed(seed: int, stream: str, rank: int = 0) -> int:
    """The 64-bit seed of one random stream: a hash of ``(seed, stream, rank)`` by numpy's SeedSequence.

    torch's CPU generator (MT19937) keeps the low 32 bits of it, CUDA's Philox all 64.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an integer >= 0")
    sequence = np.random.SeedSequence(seed, spawn_key=(STREAMS[stream], rank))
    return int(sequence.generate_state(1, dtype=np.uint64)[0])


def seeded_generator(seed: int, stream: str, rank: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """A new ``torch.Generator`` on ``device`` for ``stream`` of ``rank`` (see :func:`stream_seed`)."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, stream, rank))


def generator_state(generator: torch.Generator) -> dict[str, Any]:
    """The generator's state with the device type it belongs to (CPU and CUDA states differ in kind)."""
    return {"device": generator.device.type, "state": generator.get_state()}


def set_generator_state(generator: torch.Generator, saved: dict[str, Any], what: str) -> bool:
    """Put ``saved`` (from :func:`generator_state`) into ``generator``; False (and a warning) if it was
    saved on another kind of device, whose state cannot continue here."""
    if saved["device"] != generator.device.type:
        log.warning("%s: the checkpoint's state is for %s, this run draws on %s: the stream restarts from its "
                    "seed, so the resumed run is not an exact continuation", what, saved["device"],
                    generator.device.type)
        return False
    generator.set_state(saved["state"])
    return True


def gather_per_rank(local: Any) -> list[Any]:
    """``local`` of every rank, in rank order (``[local]`` without an initialized process group).

    Lightning dumps checkpoints on every rank but rank 0 alone writes the file, so per-rank states must
    be gathered to survive; call it on all ranks at once (Lightning's checkpoint hooks are).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def pick_rank(ranks: list[Any], rank: int, world_size: int, what: str) -> Any | None:
    """This rank's entry of a gathered state (None when the checkpoint has none), warning when the
    number of ranks changed since the checkpoint was written."""
    if len(ranks) != world_size:
        log.warning("%s: the checkpoint holds the states of %d rank(s), this run has %d: the random streams "
                    "cannot continue exactly", what, len(ranks), world_size)
    return ranks[rank] if rank < len(ranks) else None


class RandomStreams:
    """A datamodule's named random streams for its rank, with checkpointable states.

    CPU streams exist from the start (datasets and loaders hold them) and are seeded in place by
    :meth:`seed_for`; device streams are created on their device at first use. States set before a
    stream is seeded or created wait in ``pending`` and are applied then, so restoring works in any order.
    """

    def __init__(self, seed: int, cpu: tuple[str, ...]) -> None:
        stream_seed(seed, cpu[0])  # validates the seed
        self.seed = seed
        self.cpu = {name: torch.Generator() for name in cpu}
        self.on_device: dict[str, torch.Generator] = {}
        self.rank: int | None = None  # the rank the streams are seeded for (None: not yet)
        self.pending: dict[str, dict[str, Any]] = {}

    def seed_for(self, rank: int) -> None:
        """Seed the CPU streams for ``rank`` unless they already are: a restored state is never clobbered."""
        if rank == self.rank:
            return
        for name, generator in self.cpu.items():
            generator.manual_seed(stream_seed(self.seed, name, rank))
        self.rank = rank
        self._apply_pending()

    def device_stream(self, name: str, device: torch.device, rank: int) -> torch.Generator:
        """Stream ``name`` on ``device`` (one device per process; a move restarts it, with a warning)."""
        generator = self.on_device.get(name)
        if generator is None or generator.device != device:
            if generator is not None:
                log.warning("data stream %s moved from %s to %s: it restarts", name, generator.device, device)
            self.on_device[name] = seeded_generator(self.seed, name, rank, device)
            self._apply_pending()
        return self.on_device[name]

    def _live(self) -> dict[str, torch.Generator]:
        return {**(self.cpu if self.rank is not None else {}), **self.on_device}

    def _apply_pending(self) -> None:
        for name, generator in self._live().items():
            if name in self.pending:
                set_generator_state(generator, self.pending.pop(name), f"data stream {name}")

    def states(self) -> dict[str, dict[str, Any]]:
        """Every stream's state (a restored stream not seeded or created yet keeps its saved state)."""
        return {**self.pending, **{name: generator_state(g) for name, g in self._live().items()}}

    def set_states(self, states: dict[str, dict[str, Any]]) -> None:
        """Continue from :meth:`states`."""
        self.pending = dict(states)
        self._apply_pending()


# ------------------------------------------------------------------------------------------ global RNG
def global_rng_state() -> dict[str, Any]:
    """torch CPU, current CUDA device (when CUDA is in use), numpy and Python RNG states, checkpoint-safe."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only: ranks may move between GPUs
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`global_rng_state` (a CUDA state is skipped when this run does not use CUDA)."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        else:
            log.warning("the checkpoint has a CUDA RNG state but this run has no GPU: it is not restored")


class ExactResume(pl.Callback):
    """Saves every rank's global RNG states in checkpoints and puts them back when training resumes; keeps
    the sanity check from moving the datamodule's random streams.

    The states are put back in ``on_train_start``, the last hook before the first resumed training batch,
    so nothing Lightning does while restoring (or this process did before) shifts them. A resumed run runs
    the sanity check again (the first attempt did too): Lightning isolates the global RNG from it, and this
    callback does the same for a datamodule's :class:`RandomStreams` ``streams`` (validation crops with
    ``data.val_crop=random``), so ``num_sanity_val_steps`` never changes a result.
    """

    def __init__(self) -> None:
        self._pending: list[Any] | None = None
        self._before_sanity: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": gather_per_rank(global_rng_state())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = list(state_dict["ranks"])

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        streams = getattr(getattr(trainer, "datamodule", None), "streams", None)
        if isinstance(streams, RandomStreams):
            self._before_sanity = streams.states()

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._before_sanity is not None:
            trainer.datamodule.streams.set_states(self._before_sanity)
            self._before_sanity = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ranks, self._pending = self._pending, None
        if ranks is None:
            return
        state = pick_rank(ranks, trainer.global_rank, trainer.world_size, "global RNG state")
        if state is not None:
            set_global_rng_state(state)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._pending = None  # loaded by validate/test (no training to resume): never apply it to a later fit


# ------------------------------------------------------------------------------------------ files
def fsync_dir(folder: Path) -> None:
    """fsync a folder so a rename inside it survives a crash (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temp file beside the target, fsync, ``os.replace``, fsync the folder: a reader
    (or a rerun after a kill at any instant) sees the old checkpoint or the new one, never a torn one.

    Remote (fsspec) paths keep Lightning's own save. Pass it as ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        fs, local = fsspec.core.url_to_fs(str(path))
        if not isinstance(fs, LocalFileSystem) or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)  # remote, or rejects storage_options
            return
        target = Path(local)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the file from the group
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(target.parent)
