"""``make bench``: data loader, training step and end-to-end throughput, side by side, on one machine.

Three measurements (issue 6), each printed as a table with its target and PASS/FAIL, and written to the
device's section of ``BENCHMARKS.md`` (a CPU run replaces the CPU section, a CUDA run the GPU one):

1. **Loader**: training batches per second of the torchvision PIL reference (``data.pipeline=pil``)
   against the resize cache (``cached``), each in its own process (peak RSS measured there), timed in
   turns so that both see the same machine load.
2. **Training step**: forward + cross-entropy + backward + Adam on synthetic batches already on the
   device, our ``create_model`` network against the library constructor of the same architecture
   (timm / torchvision), interleaved step by step so both see the same machine load.
3. **End to end**: the same step fed by the real ``ImagenetteDataModule`` loader (+ its device-side
   augmentation) against the model alone on a batch already in memory: the data path's tax.

Arguments are Hydra-style ``key=value`` (OmegaConf dotlist): ``data.*`` are the keys of
``conf/data/imagenette.yaml`` (``make bench`` passes ``data.archive=...``), ``bench.*`` are the knobs in
``BENCH_DEFAULTS`` below, e.g. ``python benchmarks/bench.py bench.device=cpu bench.models=[resnet50]``.
On CUDA it uses bf16 autocast, channels_last, ``torch.compile``, cudnn.benchmark and fused Adam, and
times with CUDA events / synchronize, warm-up steps excluded. A GPU box without the 224 px archive can
use ``data.archive=.../imagenette2-128.tgz``: the cache upsamples it to 280 px once, and crops stay
224 px, so the loader does the same work per batch (the pil reference decodes smaller JPEGs, though).
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import pairwise
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import lightning
import timm
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch import nn

from imagenette_lab.data import ImagenetteDataModule
from imagenette_lab.models import MODEL_NAMES, count_params, create_model

REPO = Path(__file__).resolve().parents[1]
ADAM_LR = 0.00024  # learning rate per step (the report's Adam); irrelevant to speed but kept realistic
ADAM_WD = 0.00001  # L2 weight decay coefficient (the report's)
NUM_CLASSES = 10  # ImageNette classes
MIB = 2**20  # bytes per MiB

# Every knob; ``null`` = chosen by device in ``resolve_auto`` (CPU value / CUDA value in the comment).
BENCH_DEFAULTS: dict[str, Any] = {
    "device": "auto",  # auto | cpu | cuda
    "quick": False,  # tiny smoke run (tests): QUICK below replaces the defaults it names
    "parts": ["loader", "step", "e2e"],  # which measurements to run
    "models": ["googlenet", "mobilenetv2", "resnet34", "resnet50", "resnet50d", "hybrid"],
    "sizes": [224, 128],  # px, side of the square synthetic inputs of the step benchmark
    "threads": None,  # torch intra-op threads of the step/e2e process; 1 / torch's default (all cores)
    "batch_size": None,  # images per step of the step and e2e benchmarks; 8 / 256
    "precision": None,  # fp32 | bf16 (autocast); fp32 / bf16
    "channels_last": None,  # NHWC model and inputs; off / on
    "compile": None,  # torch.compile the model (compilation happens in the warm-up steps); off / on
    "cudnn_benchmark": True,  # cudnn autotuner (CUDA only)
    "warmup": None,  # untimed steps per model before timing (allocator, autotune, compile); 1 / 10
    "steps": None,  # minimum timed steps per model and size (each of ours / library); 2 / 20
    "step_seconds": None,  # s, keep alternating ours/library past `steps` until this long; 10 / 3
    "max_steps": 50,  # cap on timed steps per model and size
    "e2e_models": None,  # models of the end-to-end benchmark; [mobilenetv2, resnet50] / +hybrid
    "e2e_steps": None,  # timed steps per block; null on CUDA = one epoch of the loader; 2 on CPU
    "e2e_rounds": None,  # alternating (model-only, end-to-end) block pairs; 2 / 1
    "pil_workers": [0, 2],  # DataLoader worker processes of the pil reference (one run each)
    "loader_threads": 1,  # torch threads in each loader process (2 cripples the pil main process)
    "loader_warmup": 2.0,  # s of untimed loading per loader (starting workers, mapping the cache's pages)
    "loader_windows": 5,  # timed windows per loader, taken in turns with the other loaders (median kept)
    "loader_seconds": 1.0,  # s, length of one timed window
    "output": "BENCHMARKS.md",  # markdown to update (relative to the repo root); null = print only
    "json": None,  # optional path for the raw results as JSON
    "strict": False,  # exit with status 1 when a target FAILs
    "targets": {
        "loader_speedup": 20.0,  # x, cached vs pil images/s at equal worker processes
        "step_ratio": 0.95,  # x, ours vs the library constructor images/s
        "e2e_ratio": 0.9,  # x, end-to-end vs model-only images/s
        "gpu_resnet50_e2e": 3000.0,  # images/s, ResNet-50 at 224 px end to end on CUDA
    },
}
# Per-device values of the ``null`` knobs (see BENCH_DEFAULTS for their meaning and units).
CPU_AUTO: dict[str, Any] = dict(
    # 1 thread: on the shared 2-core box (load ~4) threads spin-waiting for cores other jobs hold made
    # steps 10-30x slower and erratic; every CPU target is a ratio, measured under equal threads
    threads=1,
    batch_size=8,  # images; big models train at ~2 images/s at 224 px here, so few and small steps
    precision="fp32",  # as the project's CPU runs (trainer.precision=32-true)
    channels_last=False,  # the project's CPU runs keep NCHW (pipeline.py resolves it so)
    compile=False,  # as the project's CPU runs; compiling alone would take minutes on 2 cores
    warmup=1,  # steps
    steps=2,  # steps, at least, each of ours / library
    step_seconds=10.0,  # s, more timed steps while under this (the small models and 128 px get many)
    e2e_models=["mobilenetv2", "resnet50"],  # the fastest model shows the data path's tax most
    e2e_steps=2,  # steps per block (an epoch would take hours)
    e2e_rounds=2,  # block pairs
)
CUDA_AUTO: dict[str, Any] = dict(
    threads=None,  # torch's default
    batch_size=256,  # images; the batch of NVIDIA's published ResNet-50 throughput figures
    precision="bf16",  # autocast, as the project's GPU runs (trainer.precision=bf16-mixed)
    channels_last=True,
    compile=True,  # each model and size compiles once in its warm-up (tens of seconds each)
    warmup=10,  # steps: compilation, cudnn autotuning, allocator growth
    steps=20,  # steps, at least, each of ours / library
    step_seconds=3.0,  # s
    e2e_models=["resnet50", "mobilenetv2", "hybrid"],  # issue 6: ResNet-50's target, the others reported
    e2e_steps=None,  # None: one epoch of the loader per block
    e2e_rounds=1,  # block pairs
)
# bench.quick=true: a smoke run in seconds (the tests); its numbers are no benchmark
QUICK: dict[str, Any] = dict(
    models=["mobilenetv2"],
    sizes=[32],  # px
    batch_size=4,  # images
    warmup=1,  # steps
    steps=2,  # steps
    step_seconds=0.0,  # s: no extra steps
    e2e_models=["mobilenetv2"],
    e2e_steps=2,  # steps
    e2e_rounds=1,
    pil_workers=[0],
    loader_warmup=0.2,  # s
    loader_windows=2,
    loader_seconds=0.5,  # s
    output=None,  # never overwrite BENCHMARKS.md with smoke numbers unless asked to
)
PARTS = ("loader", "step", "e2e")
PRECISIONS = ("fp32", "bf16")

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


class BenchConfigError(ValueError):
    """A bench/data argument is invalid; the message names it and says how to fix it."""


# ------------------------------------------------------------------------------------------- config
def load_config(argv: Sequence[str]) -> DictConfig:
    """Defaults <- (bench.quick preset) <- ``key=value`` arguments, validated; ``auto`` values unresolved."""
    bad = [a for a in argv if "=" not in a or a.startswith("-")]
    if bad:
        raise BenchConfigError(f"arguments must be key=value (e.g. bench.device=cpu), got {bad}")
    try:
        cli = OmegaConf.from_dotlist(list(argv))
    except Exception as err:  # omegaconf's grammar errors name the token but not the fix
        raise BenchConfigError(f"cannot parse {list(argv)}: {err}") from err
    data = OmegaConf.load(REPO / "conf" / "data" / "imagenette.yaml")
    data.pop("_target_")
    base = OmegaConf.create(
        {"seed": 0, "paths": {"data_dir": str(REPO / "data")}, "data": data, "bench": BENCH_DEFAULTS}
    )
    OmegaConf.set_struct(base, True)  # a misspelt key fails instead of being ignored
    quick = OmegaConf.select(cli, "bench.quick", default=False)
    layers = [base, OmegaConf.create({"bench": QUICK})] if quick is True else [base]
    try:
        cfg = OmegaConf.merge(*layers, cli)
    except Exception as err:
        raise BenchConfigError(
            f"{err}\nValid bench keys: {sorted(BENCH_DEFAULTS)}; "
            "data keys: those of conf/data/imagenette.yaml"
        ) from err
    _validate(cfg.bench)
    return cfg


def _validate(b: DictConfig) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise BenchConfigError(f"bench.{key}={OmegaConf.select(b, key)!r} {what}")

    def positive_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    for key in ("parts", "models", "sizes", "e2e_models", "pil_workers"):
        need(
            OmegaConf.is_list(b[key]) or (key == "e2e_models" and b[key] is None),
            key,
            f"must be a list, e.g. bench.{key}=[a,b]",
        )
    need(b.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
    need(b.device != "cuda" or torch.cuda.is_available(), "device", "but no CUDA device is visible; use cpu")
    need(isinstance(b.quick, bool), "quick", "must be true or false")
    need(set(b.parts) <= set(PARTS) and len(b.parts) > 0, "parts", f"must be a non-empty subset of {PARTS}")
    for key in ("models", "e2e_models"):
        names = b[key]
        need(names is None or set(names) <= set(MODEL_NAMES), key, f"must list models from {MODEL_NAMES}")
    need(
        len(b.sizes) > 0 and all(positive_int(s) and s >= 32 for s in b.sizes),
        "sizes",
        "must be a list of image sides in px, each >= 32 (the networks downsample 32x)",
    )
    for key in ("threads", "batch_size", "warmup", "steps", "e2e_steps", "e2e_rounds"):
        need(
            b[key] is None or positive_int(b[key]) or (key == "warmup" and b[key] == 0),
            key,
            "must be a positive integer (or null = by device)",
        )
    need(positive_int(b.max_steps), "max_steps", "must be a positive integer")
    need(b.precision is None or b.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
    need(
        all(isinstance(w, int) and w >= 0 for w in b.pil_workers),
        "pil_workers",
        "must be a list of worker counts >= 0",
    )
    need(positive_int(b.loader_threads), "loader_threads", "must be a positive integer")
    need(float(b.loader_warmup) >= 0, "loader_warmup", "must be >= 0 (seconds)")
    need(float(b.loader_seconds) > 0, "loader_seconds", "must be > 0 (seconds)")
    need(positive_int(b.loader_windows), "loader_windows", "must be a positive integer")


def resolve_auto(b: DictConfig) -> torch.device:
    """Pick the device and fill every ``null`` knob with its per-device default (in place)."""
    device = torch.device(
        "cuda" if b.device == "cuda" or (b.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    for key, value in (CUDA_AUTO if device.type == "cuda" else CPU_AUTO).items():
        if b[key] is None and value is not None:
            b[key] = value
    return device


# ------------------------------------------------------------------------------------------ machine
def machine_info(device: torch.device) -> dict[str, Any]:
    """Date, host CPU/GPU, library versions, load average and git commit: the context of the numbers."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": f"{cpu}, {os.cpu_count()} logical cores",
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": None,
        "python": platform.python_version(),
        "versions": {m.__name__: m.__version__ for m in (torch, torchvision, timm, lightning)},
        "load_avg_start": os.getloadavg(),
        "command": " ".join(["python", *sys.argv]),
        "git": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        info["git"] = head + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass  # not a checkout (e.g. a copied tree): the record just has no commit
    return info


# ------------------------------------------------------------------------------------------- loader
def _endless(dm: ImagenetteDataModule) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:  # a fresh iterator per epoch, as a Trainer makes
        yield from dm.train_dataloader()


def _window(dm: ImagenetteDataModule, stream: Iterator, seconds: float, augment: bool) -> tuple[float, int]:
    """(images/s, images) of training batches drawn from ``stream`` for ``seconds``."""
    images, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        batch = next(stream)
        if augment:  # the cached pipeline's flip/normalize/erase, here on the CPU
            batch = dm.gpu_transform(batch, train=True)
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

    def __init__(self, model: nn.Module, setup: StepSetup) -> None:
        self.setup = setup
        self.model = model.to(setup.device).train()
        if setup.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # static shapes: each input size gets its own specialized graph, as a real run at one size has
        self.forward = torch.compile(self.model, dynamic=False) if setup.compile else self.model
        fused = True if setup.device.type == "cuda" else None  # one kernel for the whole update on a GPU
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=ADAM_LR, weight_decay=ADAM_WD, fused=fused
        )

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
        return self.dm.gpu_transform((x, y), train=True) if self.dm.pipeline == "cached" else (x, y)


def e2e_rates(step: TrainStep, feed: LoaderFeed, steps: int, b: DictConfig) -> tuple[float, float]:
    """(model-only, end-to-end) images/s of one model over ``b.e2e_rounds`` alternating block pairs."""
    fixed = feed()  # model-only reuses this one real batch, already normalized on the device
    for _ in range(b.warmup):  # through the loader: also warms the page cache and pinned buffers
        step(*feed())
    seconds = {"model": 0.0, "e2e": 0.0}
    runs = {"model": lambda: step(*fixed), "e2e": lambda: step(*feed())}
    for r in range(b.e2e_rounds):
        for kind in ("model", "e2e") if r % 2 == 0 else ("e2e", "model"):  # flipped order each round
            seconds[kind] += timed_block(feed.device, steps, runs[kind])
    images = b.e2e_rounds * steps * b.batch_size
    return images / seconds["model"], images / seconds["e2e"]


def bench_e2e(cfg: DictConfig, setup: StepSetup) -> list[dict[str, Any]]:
    """Real loader + device augmentation + step vs the step alone on a batch already on the device."""
    b, rows = cfg.bench, []
    data = OmegaConf.to_container(cfg.data, resolve=True)
    dm = ImagenetteDataModule(**{**data, "batch_size": b.batch_size})  # same batch as the model-only loop
    dm.prepare_data()
    dm.setup("fit")
    steps = b.e2e_steps or len(dm.train_dataloader())  # CUDA default: one epoch per block
    for name in b.e2e_models:
        torch.manual_seed(cfg.seed)
        model_rate, e2e_rate = e2e_rates(
            TrainStep(create_model(name, NUM_CLASSES), setup), LoaderFeed(dm, setup.device), steps, b
        )
        rows.append(
            {
                "model": name,
                "size": dm.transform_spec.crop,
                "pipeline": dm.pipeline,
                "model_only": model_rate,
                "e2e": e2e_rate,
                "ratio": e2e_rate / model_rate,
                "timed_steps": b.e2e_rounds * steps,
            }
        )
        print(f"  e2e {name}: model-only {model_rate:.1f}, end-to-end {e2e_rate:.1f} images/s", flush=True)
        _free(setup.device)
    return rows


# ---------------------------------------------------------------------------------------- verdicts
def _verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "FAIL"


def judge(results: dict[str, Any], setup: StepSetup, t: DictConfig) -> list[dict[str, Any]]:
    """Attach target and PASS/FAIL to each row that has one; return the list of checks."""
    checks = []
    loaders = results.get("loader", [])
    pil = {r["workers"]: r["images_per_s"] for r in loaders if r["pipeline"] == "pil"}
    for r in loaders:
        if r["pipeline"] == "cached" and 0 in pil:  # equal workers: no worker process on either side
            r["speedup"] = r["images_per_s"] / pil[0]
            r["augmented_speedup"] = r["augmented_images_per_s"] / pil[0]
            r["speedup_by_workers"] = {w: r["images_per_s"] / rate for w, rate in pil.items()}
            r["result"] = _verdict(r["speedup"], t.loader_speedup)
            checks.append(
                {
                    "what": "loader: cached vs pil, 0 workers each",
                    "value": f"{r['speedup']:.1f}x",
                    "target": f">= {t.loader_speedup:g}x",
                    "result": r["result"],
                }
            )
    for r in results.get("step", []):
        if r["ratio"] is not None:
            r["result"] = _verdict(r["ratio"], t.step_ratio)
            checks.append(
                {
                    "what": f"step: {r['model']} {r['size']} px, ours vs {r['library']}",
                    "value": f"{r['ratio']:.2f}x",
                    "target": f">= {t.step_ratio:g}x",
                    "result": r["result"],
                }
            )
    for r in results.get("e2e", []):
        r["result"] = _verdict(r["ratio"], t.e2e_ratio)
        checks.append(
            {
                "what": f"e2e: {r['model']} {r['size']} px, end-to-end vs model-only",
                "value": f"{r['ratio']:.2f}x",
                "target": f">= {t.e2e_ratio:g}x",
                "result": r["result"],
            }
        )
        recipe = setup.precision == "bf16" and setup.channels_last and setup.compile
        if setup.device.type == "cuda" and r["model"] == "resnet50" and r["size"] == 224 and recipe:
            checks.append(
                {
                    "what": "e2e: ResNet-50 224 px, bf16, channels_last, compiled",
                    "value": f"{r['e2e']:,.0f} images/s",
                    "target": f">= {t.gpu_resnet50_e2e:,.0f} images/s",
                    "result": _verdict(r["e2e"], t.gpu_resnet50_e2e),
                }
            )
    return checks


# ------------------------------------------------------------------------------------------ report
def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join("—" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _rate(v: float | None) -> str | None:
    return None if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _x(v: float | None) -> str | None:
    return None if v is None else f"{v:.2f}x"


def _context(cfg: DictConfig, info: dict[str, Any], checks: list[dict[str, Any]]) -> str:
    d = cfg.data
    loads = [" / ".join(f"{v:.2f}" for v in info[k]) for k in ("load_avg_start", "load_avg_end")]
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in info["part_s"].items())
    source = d.archive or d.root or f"official {d.variant}"
    lines = [
        f"- date: {info['date']}; wall time {info['wall_s'] / 60:.1f} min ({parts})",
        f"- host: {info['host']}; CPU {info['cpu']}" + (f"; GPU {info['gpu']}" if info["gpu"] else ""),
        f"- software: Python {info['python']}, " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        f"- load average (1/5/15 min): {loads[0]} at start, {loads[1]} at end (other jobs share the machine)",
        f"- command: `{info['command']}`" + (f" at commit {info['git']}" if info["git"] else ""),
        f"- data: `{source}`, resize {d.resize} px, crop {d.crop} px",
        f"- targets: {sum(c['result'] == 'PASS' for c in checks)}/{len(checks)} PASS",
    ]
    return "\n".join(lines)


def _loader_section(rows_in: list[dict[str, Any]], cfg: DictConfig) -> str:
    b, t = cfg.bench, cfg.bench.targets
    rows = []
    for r in rows_in:
        rss = f"{r['rss_main_mib']:,.0f} (+{r['rss_main_mib'] - r['rss_start_mib']:,.0f})"
        if r["pipeline"] == "pil":
            worker_rss = None if r["rss_worker_mib"] is None else f"{r['rss_worker_mib']:,.0f}"
            where = "workers" if r["workers"] else "main process"
            rows.append(
                [
                    f"pil (torchvision reference, {where})",
                    r["workers"],
                    r["threads"],
                    _rate(r["images_per_s"]),
                    "1.00x" if r["workers"] == 0 else None,
                    rss,
                    worker_rss,
                    None,
                    None,
                ]
            )
        else:
            rows.append(
                [
                    "cached (uint8 crops, what the loader yields)",
                    "0 (in-process)",
                    r["threads"],
                    _rate(r["images_per_s"]),
                    _x(r.get("speedup")),
                    rss,
                    None,
                    f">= {t.loader_speedup:g}x",
                    r.get("result"),
                ]
            )
            rows.append(
                [
                    "cached + BatchAugment on the CPU (training-ready batches)",
                    "0 (in-process)",
                    r["threads"],
                    _rate(r["augmented_images_per_s"]),
                    _x(r.get("augmented_speedup")),
                    "(same process)",
                    None,
                    None,
                    "info",
                ]
            )
    others = [
        f"{v:.1f}x pil with {w} workers"
        for r in rows_in
        for w, v in r.get("speedup_by_workers", {}).items()
        if w
    ]
    versus = (
        (
            f"; against the other pil runs it is {', '.join(others)} (their workers compete with the "
            f"main process for the {os.cpu_count()} cores)"
        )
        if others
        else ""
    )
    headers = [
        "pipeline",
        "worker processes",
        "torch threads",
        "images/s",
        "vs pil, 0 workers",
        "peak RSS MiB main (+ while loading)",
        "peak RSS MiB (largest worker)",
        "target",
        "result",
    ]
    note = (
        f"images/s = median of {b.loader_windows} windows of {b.loader_seconds:g} s, after "
        f"{b.loader_warmup:g} s of untimed loading (a fresh process maps the cache file's pages during its "
        "first epoch, a one-off), page cache warm. The 0-worker loaders take their windows in "
        "turns (order flipped every round), so they see the same machine load; runs with workers are "
        "timed alone (their workers would decode ahead during the others' windows). The cached pipeline ignores `num_workers` (it slices crops in the main process), so the target "
        f"compares it with pil at 0 workers: one process, one thread, each{versus}. On a GPU its "
        "flip/normalize/erase runs on the device (`gpu_transform`); the `+ BatchAugment` row does that on "
        "the CPU instead, which is what a CPU training run pays (it is inside the end-to-end numbers "
        "below). Peak RSS is per process; the part in brackets is what loading added to the imports. It "
        "counts the memory-mapped cache pages a process touched (shared, reclaimable page cache) and, for "
        "workers, the pages they share with the main process."
    )
    title = f"### Loader: training batches of {cfg.data.batch_size}, one process each"
    return f"{title}\n\n{md_table(headers, rows)}\n\n{note}"


def _step_section(rows_in: list[dict[str, Any]], cfg: DictConfig, setup: StepSetup, threads: int) -> str:
    b, t = cfg.bench, cfg.bench.targets
    same = {True: "yes", False: "no", None: None}
    rows = [
        [
            r["model"],
            r["size"],
            f"{r['params_m']:.1f}",
            _rate(r["ours"]),
            r["library"],
            same[r["same_layers"]],
            _rate(r["library_images_per_s"]),
            _x(r["ratio"]),
            r["timed_steps"],
            None if r["ratio"] is None else f">= {t.step_ratio:g}x",
            r.get("result", "no library model"),
        ]
        for r in rows_in
    ]
    headers = [
        "model",
        "px",
        "params M",
        "ours images/s",
        "library constructor",
        "same layers",
        "library images/s",
        "ours / library",
        "timed steps each",
        "target",
        "result",
    ]
    note = (
        f"{setup.describe()}; torch threads: {threads}. Forward + cross-entropy + backward + Adam step; "
        f"{b.warmup} warm-up step(s) each, then ours and the library's alternate step by step, the order "
        f"flipped every round (at least {b.steps} timed steps each, more while under {b.step_seconds:g} s). "
        "images/s = batch / median step time; ours / library = median of the side-by-side step-time "
        "ratios. `same layers` = identical module trees (repr): there the ratio's distance from 1.00 is "
        "the timing noise of this machine. The hybrid is the report's own network: no library has it."
    )
    title = f"### Training step: batch {b.batch_size}, synthetic batches on the device"
    return f"{title}\n\n{md_table(headers, rows)}\n\n{note}"


def _e2e_section(rows_in: list[dict[str, Any]], cfg: DictConfig, setup: StepSetup) -> str:
    b, t = cfg.bench, cfg.bench.targets
    rows = [
        [
            r["model"],
            r["size"],
            r["pipeline"],
            _rate(r["model_only"]),
            _rate(r["e2e"]),
            _x(r["ratio"]),
            r["timed_steps"],
            f">= {t.e2e_ratio:g}x",
            r["result"],
        ]
        for r in rows_in
    ]
    headers = [
        "model",
        "px",
        "pipeline",
        "model-only images/s",
        "end-to-end images/s",
        "end-to-end / model-only",
        "timed steps each",
        "target",
        "result",
    ]
    block = "one epoch" if b.e2e_steps is None else f"{b.e2e_steps} steps"
    note = (
        f"{setup.describe()}. End to end = `train_dataloader()` -> `.to(device)` -> `gpu_transform` -> "
        "step; model-only = the same step on one such batch kept on the device. "
        f"{b.warmup} warm-up step(s) through the loader, then {b.e2e_rounds} round(s) of a model-only and "
        f"an end-to-end block of {block} each (order flipped every round), timed by the wall clock, "
        "synchronized at block edges."
    )
    title = f"### End to end: batch {b.batch_size}, real ImagenetteDataModule loader vs model alone"
    return f"{title}\n\n{md_table(headers, rows)}\n\n{note}"


def render(results: dict[str, Any], cfg: DictConfig, setup: StepSetup, info: dict[str, Any]) -> str:
    """The device's section of BENCHMARKS.md (also printed)."""
    checks = results["checks"]
    title = f"## {'GPU' if setup.device.type == 'cuda' else 'CPU'}: {info['gpu'] or info['cpu']}"
    out = [
        title + (" (quick smoke run, not a benchmark)" if cfg.bench.quick else ""),
        _context(cfg, info, checks),
    ]
    if "loader" in results:
        out.append(_loader_section(results["loader"], cfg))
    if "step" in results:
        out.append(_step_section(results["step"], cfg, setup, info["torch_threads"]))
    if "e2e" in results:
        out.append(_e2e_section(results["e2e"], cfg, setup))
    rows = [[c["what"], c["value"], c["target"], c["result"]] for c in checks]
    out.append("### Targets\n\n" + md_table(["check", "measured", "target", "result"], rows))
    return "\n\n".join(out) + "\n"


HEADER = """# Benchmarks

Generated by `make bench` (`python benchmarks/bench.py`, see its docstring for the knobs): issue 6's
loader, training-step and end-to-end throughput, side by side on one machine. A run rewrites the section
of its device kind (CPU or GPU) and keeps the other one.
"""
NO_RUN = {
    "cpu": "## CPU\n\nNot measured yet: run `make bench ARGS=bench.device=cpu`.\n",
    "cuda": (
        "## GPU\n\nNot measured yet: no GPU was available to the runs recorded here, so the CPU targets "
        "above are the ones that close issue 6. `make bench` on a CUDA machine fills this section "
        "unchanged (bf16 autocast, channels_last, torch.compile, cudnn.benchmark and fused Adam are "
        "picked automatically; expect several minutes of compilation). Where the 224 px archive is "
        "missing, `data.archive=<...>/imagenette2-128.tgz` gives the loader the same work per batch.\n"
    ),
}


def _marker(kind: str, end: bool = False) -> str:
    return f"<!-- bench:{kind}:{'end' if end else 'start'} -->"


def update_markdown(path: Path, kind: str, section: str) -> None:
    """Write ``section`` as the ``kind`` (cpu | cuda) part of ``path``, keeping the other kind's part."""
    old = path.read_text() if path.is_file() else ""
    parts = {}
    for k in ("cpu", "cuda"):
        start, end = _marker(k), _marker(k, end=True)
        if k == kind:
            parts[k] = section
        else:
            kept = old.split(start, 1)[1].split(end, 1)[0].strip("\n") if start in old and end in old else ""
            # a measured section's title names its device ("## GPU: <name>"); a placeholder is refreshed
            parts[k] = kept + "\n" if kept.startswith("## ") and ":" in kept.split("\n", 1)[0] else NO_RUN[k]
    body = "\n".join(f"{_marker(k)}\n{parts[k]}{_marker(k, end=True)}\n" for k in ("cpu", "cuda"))
    path.write_text(HEADER + "\n" + body)


# -------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str]) -> int:
    try:
        cfg = load_config(argv)
    except BenchConfigError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    b = cfg.bench
    device = resolve_auto(b)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(b.cudnn_benchmark)
        torch.set_float32_matmul_precision("high")  # TF32 for whatever stays fp32 under autocast
    if b.threads is not None:
        torch.set_num_threads(b.threads)
    setup = StepSetup(device, b.precision, bool(b.channels_last), bool(b.compile))
    info = machine_info(device)
    start = time.perf_counter()
    print(f"bench on {device} ({info['gpu'] or info['cpu']}): {', '.join(b.parts)}", flush=True)
    results: dict[str, Any] = {}
    parts = {
        "loader": lambda: bench_loaders(cfg),
        "step": lambda: bench_steps(cfg, setup),
        "e2e": lambda: bench_e2e(cfg, setup),
    }
    info["part_s"] = {}
    for part in (p for p in PARTS if p in b.parts):
        part_start = time.perf_counter()
        results[part] = parts[part]()
        info["part_s"][part] = time.perf_counter() - part_start
    results["checks"] = judge(results, setup, b.targets)
    info["load_avg_end"] = os.getloadavg()
    info["wall_s"] = time.perf_counter() - start
    section = render(results, cfg, setup, info)
    print("\n" + section)
    if b.output:
        path = Path(b.output) if Path(b.output).is_absolute() else REPO / b.output
        update_markdown(path, device.type, section)
        print(f"wrote {path}")
    if b.json:
        record = {"machine": info, "config": OmegaConf.to_container(cfg, resolve=True), **results}
        Path(b.json).write_text(json.dumps(record, indent=2, default=str))
    failed = [c for c in results["checks"] if c["result"] == "FAIL"]
    return 1 if failed and b.strict else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
