"""Training-step and end-to-end benchmarks: ours against the library constructor, the real loader
against the model alone."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import timm
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch import nn

from benchmarks.config import ADAM_LR, ADAM_WD, NUM_CLASSES
from imagenette_lab.data import ImagenetteDataModule
from imagenette_lab.models import count_params, create_model

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

# The library constructor of each architecture, for parity (the hybrid is ours alone: no library has it).
LIBRARY: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "googlenet": (
        "torchvision googlenet",
        lambda: torchvision.models.googlenet(
            weights=None, num_classes=NUM_CLASSES, aux_logits=False, init_weights=True
        ),
    ),
    "mobilenetv2": (
        "timm mobilenetv2_100",
        lambda: timm.create_model("mobilenetv2_100", num_classes=NUM_CLASSES),
    ),
    "resnet34": ("timm resnet34", lambda: timm.create_model("resnet34", num_classes=NUM_CLASSES)),
    "resnet50": ("timm resnet50", lambda: timm.create_model("resnet50", num_classes=NUM_CLASSES)),
    "resnet50d": ("timm resnet50d", lambda: timm.create_model("resnet50d", num_classes=NUM_CLASSES)),
}


# ------------------------------------------------------------------------------------ training step
@dataclass(frozen=True)
class StepSetup:
    """How every training step runs: the same for ours, the library's and the end-to-end loop."""

    device: torch.device
    precision: str  # fp32 | bf16 (autocast)
    channels_last: bool
    compile: bool

    def describe(self) -> str:
        """One line for the report."""
        return (
            f"{'bf16 autocast' if self.precision == 'bf16' else 'fp32'}, channels_last "
            f"{'on' if self.channels_last else 'off'}, torch.compile {'on' if self.compile else 'off'}, "
            f"Adam ({'fused' if self.device.type == 'cuda' else 'torch default implementation'})"
        )


class TrainStep:
    """forward (autocast) -> cross-entropy -> backward -> Adam step, for one model."""

    def __init__(
        self, model: nn.Module, setup: StepSetup, optimizer: OptimizerFactory | None = None
    ) -> None:
        """``optimizer(params)`` builds the optimizer; default: the report's Adam, fused on a GPU."""
        self.setup = setup
        self.model = model.to(setup.device).train()
        if setup.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # static shapes: each input size gets its own specialized graph, as a real run at one size has
        self.forward = torch.compile(self.model, dynamic=False) if setup.compile else self.model
        if optimizer is None:
            fused = True if setup.device.type == "cuda" else None  # one kernel for the whole update on a GPU
            self.optimizer = torch.optim.Adam(
                self.model.parameters(), lr=ADAM_LR, weight_decay=ADAM_WD, fused=fused
            )
        else:
            self.optimizer = optimizer(self.model.parameters())

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.setup.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            self.setup.device.type, dtype=torch.bfloat16, enabled=self.setup.precision == "bf16"
        ):
            loss = F.cross_entropy(self.forward(x), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class Clock:
    """Marks between steps: CUDA events (no host sync between steps) on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in pairwise(self.marks)]  # elapsed_time is in ms
        return [b - a for a, b in pairwise(self.marks)]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, where every op is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_step_times(
    steppers: Sequence[TrainStep], x: torch.Tensor, y: torch.Tensor, b: DictConfig
) -> list[list[float]]:
    """Per-step seconds of each stepper, run in alternating order (A B, B A, A B, ...).

    Adjacent steps see the same machine load, and flipping the order each round cancels what running
    first or second does (caches warmed or evicted by the other model). Round ``i`` of every list holds
    the steps run side by side, so their ratios pair up.
    """
    for _ in range(b.warmup):
        for step in steppers:
            step(x, y)
    clock, rounds, order = Clock(x.device), 0, list(range(len(steppers)))
    synchronize(x.device)
    start = time.perf_counter()
    clock.mark()
    while rounds < b.steps or (time.perf_counter() - start < b.step_seconds and rounds < b.max_steps):
        ran = order if rounds % 2 == 0 else order[::-1]
        for i in ran:
            steppers[i](x, y)
            clock.mark()
        rounds += 1
    gaps = iter(clock.intervals())
    times: list[list[float]] = [[] for _ in steppers]
    for r in range(rounds):
        for i in order if r % 2 == 0 else order[::-1]:
            times[i].append(next(gaps))
    return times


def _free(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()  # compiled graphs of the last models would count against the recompile limit
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_steps(cfg: DictConfig, setup: StepSetup) -> list[dict[str, Any]]:
    """images/s of our model and the library's, per model and input size, on synthetic batches."""
    b, rows = cfg.bench, []
    for name in b.models:
        torch.manual_seed(cfg.seed)
        ours = create_model(name, NUM_CLASSES)
        library, build = LIBRARY.get(name, (None, None))
        twin = build() if build else None
        info = {
            "model": name,
            "params_m": count_params(ours) / 1e6,
            "library": library,
            # same layers in the same order: then ours/library only measures the timing noise
            "same_layers": None if twin is None else repr(ours) == repr(twin),
        }
        steppers = [TrainStep(m, setup) for m in (ours, twin) if m is not None]
        for size in b.sizes:
            x = torch.randn(b.batch_size, 3, size, size, device=setup.device)
            y = torch.randint(0, NUM_CLASSES, (b.batch_size,), device=setup.device)
            times = interleaved_step_times(steppers, x, y, b)
            rates = [b.batch_size / statistics.median(t) for t in times]
            row = {
                **info,
                "size": size,
                "ours": rates[0],
                "library_images_per_s": None,
                "ratio": None,
                "timed_steps": len(times[0]),
                "step_s": times,
            }
            if twin is not None:
                # median of the side-by-side ratios: robust to load changing during the run
                ratio = statistics.median(lib / own for own, lib in zip(*times, strict=True))
                row.update(library_images_per_s=rates[1], ratio=ratio)
            rows.append(row)
            lib = f", {library} {rates[1]:.1f} -> {row['ratio']:.2f}x" if twin is not None else ""
            print(
                f"  step {name} {size}px: ours {rates[0]:.1f} images/s{lib} ({len(times[0])} steps)",
                flush=True,
            )
        del steppers, ours, twin
        _free(setup.device)
    return rows


# ------------------------------------------------------------------------------------------- e2e
def timed_block(device: torch.device, steps: int, run_step: Callable[[], None]) -> float:
    """Wall seconds of ``steps`` calls, synchronized at both edges (the loader's time counts too)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        run_step()
    synchronize(device)
    return time.perf_counter() - start


class LoaderFeed:
    """Training batches of the real DataModule, endlessly (a new epoch's iterator when one ends), ready on
    the device: moved there (non-blocking from pinned memory) and augmented there (cached pipeline)."""

    def __init__(self, dm: ImagenetteDataModule, device: torch.device) -> None:
        self.dm, self.device = dm, device
        self.stream = self._batches()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from self.dm.train_dataloader()

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (t.to(self.device, non_blocking=True) for t in next(self.stream))
        return self.dm.device_transform((x, y), train=True) if self.dm.pipeline == "cached" else (x, y)


def e2e_rates(step: TrainStep, feeds: dict[str, LoaderFeed], steps: int, b: DictConfig) -> dict[str, float]:
    """images/s of one model: ``model`` (alone) and each feed's end to end, over ``b.e2e_rounds`` rounds of
    one block each, the order reversed every round."""
    first = next(iter(feeds.values()))
    fixed = first()  # model-only reuses this one real batch, already normalized on the device
    for _ in range(b.warmup):  # through each loader: also warms the page cache and pinned buffers
        for feed in feeds.values():
            step(*feed())
    runs: dict[str, Callable[[], None]] = {"model": lambda: step(*fixed)}
    runs.update({name: (lambda feed=feed: step(*feed())) for name, feed in feeds.items()})
    seconds = dict.fromkeys(runs, 0.0)
    for r in range(b.e2e_rounds):
        for kind in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            seconds[kind] += timed_block(first.device, steps, runs[kind])
    images = b.e2e_rounds * steps * b.batch_size
    return {kind: images / s for kind, s in seconds.items()}


def bench_e2e(cfg: DictConfig, setup: StepSetup) -> list[dict[str, Any]]:
    """Real loader + device augmentation + step vs the step alone on a batch already on the device. Where
    the cached pipeline prefetches in a thread (CUDA), the plain loader (``prefetch_batches=0``) is timed
    beside it as the reference."""
    b, rows = cfg.bench, []
    data = OmegaConf.to_container(cfg.data, resolve=True)
    dm = ImagenetteDataModule(**{**data, "batch_size": b.batch_size})  # same batch as the model-only loop
    dm.prepare_data()
    dm.setup("fit")
    dms = {"configured": dm}
    if dm.pipeline == "cached" and dm.resolved_prefetch_batches > 0:
        dms["plain"] = ImagenetteDataModule(**{**data, "batch_size": b.batch_size, "prefetch_batches": 0})
        dms["plain"].setup("fit")  # the same cache, its own (identically seeded) streams
    steps = b.e2e_steps or len(dm.train_dataloader())  # CUDA default: one epoch per block
    for name in b.e2e_models:
        torch.manual_seed(cfg.seed)
        rates = e2e_rates(
            TrainStep(create_model(name, NUM_CLASSES), setup),
            {kind: LoaderFeed(d, setup.device) for kind, d in dms.items()}, steps, b,
        )
        for kind, d in dms.items():
            pipeline = d.pipeline if d.pipeline == "pil" else f"cached, prefetch {d.resolved_prefetch_batches}"
            rows.append(
                {
                    "model": name,
                    "size": d.transform_spec.crop,
                    "pipeline": pipeline + (" (reference: plain DataLoader)" if kind == "plain" else ""),
                    "reference": kind == "plain",
                    "model_only": rates["model"],
                    "e2e": rates[kind],
                    "ratio": rates[kind] / rates["model"],
                    "timed_steps": b.e2e_rounds * steps,
                }
            )
            print(f"  e2e {name} ({rows[-1]['pipeline']}): model-only {rates['model']:.1f}, "
                  f"end-to-end {rates[kind]:.1f} images/s", flush=True)
        _free(setup.device)
    return rows
