"""Loader benchmark: the PIL reference against the resize cache, each in its own process."""

from __future__ import annotations

import gc
import multiprocessing as mp
import resource
import statistics
import time
import traceback
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from benchmarks.config import MIB
from imagenette_lab.data import ImagenetteDataModule


def _endless(dm: ImagenetteDataModule) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:  # a fresh iterator per epoch, as a Trainer makes
        yield from dm.train_dataloader()


def _window(dm: ImagenetteDataModule, stream: Iterator, seconds: float, augment: bool) -> tuple[float, int]:
    """(images/s, images) of training batches drawn from ``stream`` for ``seconds``."""
    images, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        batch = next(stream)
        if augment:  # the cached pipeline's flip/normalize/erase, here on the CPU
            batch = dm.device_transform(batch, train=True)
        images += batch[1].shape[0]
    return images / elapsed, images


def _peak_rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss * 1024 / MIB  # ru_maxrss is in KiB on Linux


def loader_process(
    conn: Connection, data: dict[str, Any], pipeline: str, workers: int, threads: int, warmup: float
) -> None:
    """A loader's own process: build it, then time one window per ``(seconds, augment)`` request received
    until ``None`` arrives; finally send its peak RSS. Errors go back as ``("error", traceback)``."""
    try:
        torch.set_num_threads(threads)
        start_mib = _peak_rss_mib(resource.RUSAGE_SELF)  # the imports, the same in every loader process
        dm = ImagenetteDataModule(**{**data, "pipeline": pipeline, "num_workers": workers})
        dm.setup("fit")
        stream = _endless(dm)
        _window(dm, stream, warmup, augment=False)
        conn.send("ready")
        while (request := conn.recv()) is not None:
            conn.send(_window(dm, stream, *request))
        stream.close()
        del dm, stream
        gc.collect()  # shuts persistent workers down, so their peak RSS is counted under RUSAGE_CHILDREN
        conn.send(
            {
                "rss_start_mib": start_mib,
                "rss_main_mib": _peak_rss_mib(resource.RUSAGE_SELF),
                "rss_worker_mib": _peak_rss_mib(resource.RUSAGE_CHILDREN) if workers else None,
            }
        )
    except EOFError:
        return  # the parent stopped before the end (it reports why)
    except Exception:  # reported by the parent, which names the loader; exit quietly here
        conn.send(("error", traceback.format_exc()))


def _receive(conn: Connection, what: str) -> Any:
    reply = conn.recv()
    if isinstance(reply, tuple) and reply[:1] == ("error",):
        raise RuntimeError(f"the {what} loader process failed:\n{reply[1]}")
    return reply


def measure_loaders(
    ctx: mp.context.BaseContext, runs: Sequence[tuple[str, int]], b: DictConfig, data: dict[str, Any]
) -> list[dict[str, Any]]:
    """Time the loaders of ``runs`` ((pipeline, workers) each, one process each) in turns.

    Every process builds its loader and warms up; then they take turns, one timed window each per round
    (order flipped every round), the others idle meanwhile: all see the same machine load, which on a
    shared box swings a single loader's rate 2-3x within a minute. The cached process has a second slot
    that also runs the batch augmentation on the CPU.
    """
    procs: list[tuple[str, Connection, mp.process.BaseProcess]] = []
    try:
        for pipeline, workers in runs:
            parent, child = ctx.Pipe()
            args = (child, data, pipeline, workers, b.loader_threads, float(b.loader_warmup))
            proc = ctx.Process(target=loader_process, name=f"bench-{pipeline}-{workers}", args=args)
            proc.start()
            child.close()
            procs.append((f"{pipeline} with {workers} workers", parent, proc))
        for what, conn, _ in procs:
            _receive(conn, what)  # built and warmed up
        slots = [(i, False) for i in range(len(runs))]
        slots += [(i, True) for i, (pipeline, _) in enumerate(runs) if pipeline == "cached"]
        rates: dict[tuple[int, bool], list[float]] = {slot: [] for slot in slots}
        for r in range(b.loader_windows):
            for i, augment in slots if r % 2 == 0 else slots[::-1]:
                what, conn, _ = procs[i]
                conn.send((float(b.loader_seconds), augment))
                rates[i, augment].append(_receive(conn, what)[0])
        results = []
        for i, (pipeline, workers) in enumerate(runs):
            what, conn, proc = procs[i]
            conn.send(None)  # stop: the process shuts its loader down and reports its peak RSS
            out = {
                "pipeline": pipeline,
                "workers": workers,
                "threads": b.loader_threads,
                "images_per_s": statistics.median(rates[i, False]),
                "window_images_per_s": rates[i, False],
                **_receive(conn, what),
            }
            if (i, True) in rates:
                out["augmented_images_per_s"] = statistics.median(rates[i, True])
            results.append(out)
            print(f"  loader {pipeline} workers={workers}: {out['images_per_s']:.0f} images/s", flush=True)
        return results
    finally:
        for _, conn, proc in procs:
            conn.close()  # a process still waiting for a request gets EOF and ends
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()


def bench_loaders(cfg: DictConfig) -> list[dict[str, Any]]:
    """pil at 0 workers and cached (in-process), in turns; then pil at each other worker count alone."""
    b = cfg.bench
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for pipeline in ("pil", "cached"):  # fetch/verify/build the cache here, outside the timed processes
        ImagenetteDataModule(**{**data, "pipeline": pipeline}).prepare_data()
    # Forked from this process, which so far has only imported its libraries and prepared the data: every
    # loader starts from the same baseline memory without paying the imports again (seconds on 2 cores).
    # A process that has initialized CUDA cannot fork children that use it (pinned memory): spawn then.
    ctx = mp.get_context("spawn" if torch.cuda.is_initialized() else "fork")
    # pil workers keep decoding ahead while idle, so runs with workers are timed alone, not in turns
    groups = [[("pil", 0), ("cached", 0)] if 0 in b.pil_workers else [("cached", 0)]]
    groups += [[("pil", w)] for w in b.pil_workers if w]
    return [r for group in groups for r in measure_loaders(ctx, group, b, data)]

