"""Batches of the cached pipeline sliced ahead in a background thread, straight into pinned memory.

Written by hand: torch's DataLoader overlaps loading with the training step only through worker
processes, and for the cached pipeline shipping a crop through a worker's shared memory costs more than
slicing it (see ``ImagenetteDataModule._loader``). So with ``num_workers=0`` the slicing, the collate
copy and the pin copy all ran in the main thread between two training steps: on one H200 that held
ResNet-50's end-to-end rate at 0.74x of the model alone (BENCHMARKS.md). Here a thread gathers each
batch's crops with one copy into a (pinned) batch tensor while the main thread launches the step.

Every random draw (the shuffle order, each crop's corner) stays in the calling thread, in the plain
loader's order, so the batches are identical with and without prefetching; they are drawn
``prefetch_batches`` batches early (a checkpoint taken after an epoch cut short records the streams that
far ahead, the same way on every run).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from imagenette_lab.data.datasets import CachedCropDataset


def crop_source(dataset: Dataset) -> tuple[CachedCropDataset, Sequence[int] | None]:
    """The cached dataset behind ``dataset`` and the index map of a ``Subset`` around it (None: identity)."""
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, CachedCropDataset):
        return dataset.dataset, dataset.indices
    if isinstance(dataset, CachedCropDataset):
        return dataset, None
    raise TypeError(f"prefetching needs the cached pipeline's dataset, got {type(dataset).__name__}")


def gather_crops(
    source: CachedCropDataset, items: Sequence[int], corners: Sequence[tuple[int, int]], pin: bool
) -> torch.Tensor:
    """(B, 3, crop, crop) uint8 batch of ``items`` cropped at ``corners``: one copy per crop, no collate."""
    c = source.crop
    out = torch.empty((len(items), 3, c, c), dtype=torch.uint8, pin_memory=pin)
    rows = out.numpy()
    for j, (i, (top, left)) in enumerate(zip(items, corners, strict=True)):
        rows[j] = source.cache.image(i)[:, top : top + c, left : left + c]  # numpy copies without the GIL
    return out


class PrefetchLoader(DataLoader):
    """A ``DataLoader`` over a :class:`CachedCropDataset` (or a ``Subset`` of one) that keeps
    ``prefetch_batches`` batches being sliced in a background thread. ``prefetch_batches=0`` is the plain
    DataLoader. Everything else (sampler, batch size, ``drop_last``, ``len``, Lightning's distributed
    sampler swap) is DataLoader's own."""

    def __init__(self, dataset: Dataset, *args: object, prefetch_batches: int = 2, **kwargs: object) -> None:
        super().__init__(dataset, *args, **kwargs)
        if prefetch_batches < 0:
            raise ValueError(f"prefetch_batches={prefetch_batches} must be >= 0")
        if prefetch_batches and self.num_workers:
            raise ValueError("prefetch_batches needs num_workers=0: the thread replaces the worker processes")
        self.prefetch_batches = prefetch_batches

    def __iter__(self) -> Iterator:
        if self.prefetch_batches == 0:
            return super().__iter__()
        return self._prefetched()

    def _prefetched(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        source, index_map = crop_source(self.dataset)
        pin = bool(self.pin_memory) and torch.cuda.is_available()
        batches = iter(self.batch_sampler)
        # the draw DataLoader's own iterator makes for its workers' base seed: the shuffle stream then
        # continues exactly as with the plain loader, whichever one a run (or its resume) uses
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        pending: deque[Future] = deque()
        pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        try:
            while True:
                while len(pending) <= self.prefetch_batches:  # the batch to yield + prefetch_batches ahead
                    indices = next(batches, None)
                    if indices is None:
                        break
                    items = [index_map[i] for i in indices] if index_map is not None else list(indices)
                    corners = [source.origin(i) for i in items]  # draws here, in the plain loader's order
                    labels = torch.tensor([source.labels[i] for i in items], dtype=torch.int64)
                    labels = labels.pin_memory() if pin else labels  # a pageable copy would sync the device
                    pending.append(pool.submit(lambda it=items, co=corners, lb=labels: (
                        gather_crops(source, it, co, pin), lb)))
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
