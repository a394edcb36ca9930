"""A process-parallel ``map`` with a progress bar, for decoding thousands of JPEGs once."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")

MIN_ITEMS_PER_WORKER = 64  # below this, starting processes costs more than it saves


def available_cpus() -> int:
    """CPU cores this process may run on (respects affinity masks and cgroup pinning)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pmap(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    desc: str,
    workers: int | None = None,
) -> Iterator[R]:
    """Yield ``fn(item)`` in order, in ``workers`` processes (all cores by default), with a tqdm bar."""
    workers = available_cpus() if workers is None else workers
    workers = max(1, min(workers, len(items) // MIN_ITEMS_PER_WORKER))
    bar = tqdm(total=len(items), desc=desc, unit="img")
    with bar:
        if workers == 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        # fork: workers inherit the imported modules instantly; they only run PIL/numpy code, never CUDA.
        context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        chunk = max(1, min(256, len(items) // (workers * 8)))
        pool = ProcessPoolExecutor(workers, mp_context=context)
        try:
            for result in pool.map(fn, items, chunksize=chunk):
                yield result
                bar.update()
        finally:
            pool.shutdown(cancel_futures=True)  # on an error, don't finish the remaining work first
