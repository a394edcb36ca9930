"""``make bench``'s knobs: defaults, per-device values, validation, and the machine record."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning
import timm
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf

from imagenette_lab.models import MODEL_NAMES

REPO = Path(__file__).resolve().parents[1]
ADAM_LR = 0.00024  # learning rate per step (the report's Adam); irrelevant to speed but kept realistic
ADAM_WD = 0.00001  # L2 weight decay coefficient (the report's)
NUM_CLASSES = 10  # ImageNette classes
MIB = 2**20  # bytes per MiB

# Every knob; ``null`` = chosen by device in ``resolve_auto`` (CPU value / CUDA value in the comment).
BENCH_DEFAULTS: dict[str, Any] = {
    "device": "auto",  # auto | cpu | cuda
    "quick": False,  # tiny smoke run (tests): QUICK below replaces the defaults it names
    "parts": None,  # which measurements to run (PARTS); [loader, step, e2e, knobs] / [loader, step, e2e]
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
    # CPU training knobs (part `knobs`, CPU only): the CPU preset's training step, one knob changed at a time
    "knob_experiment": "cpu_train",  # conf/experiment/<name>.yaml whose model, crop, batch, optimizer are timed
    # Each variant is `+`-joined settings on top of the preset's own (`default`): channels_last, compile,
    # fused, bf16 (bare = true, or =true/false) and batch=N (images per step).
    "knob_variants": [
        # against the CPU preset as configured (channels_last on since this table chose it)
        "channels_last=false", "compile", "fused", "batch=32", "batch=128", "compile+fused",
    ],
    "knob_crop": None,  # px, side of the synthetic square inputs; null = the preset's data.crop
    # 1 thread, as the other CPU rows: on the shared 2-core box, 2 threads spin-waiting for cores other jobs
    # held made a round of 1.8 s steps take 55 s (load 3). null = torch's default, for a quiet machine.
    "knob_threads": 1,  # torch intra-op threads
    "knob_warmup": 2,  # untimed steps per variant (torch.compile compiles in the first)
    "knob_steps": 10,  # minimum timed steps per variant
    "knob_seconds": 150.0,  # s, keep going round the variants past knob_steps until this long
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
    parts=["loader", "step", "e2e", "knobs"],
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
    e2e_models=["resnet50", "mobilenetv2", "hybrid"],  # ResNet-50 has the GPU target, the others are reported
    e2e_steps=None,  # None: one epoch of the loader per block
    e2e_rounds=1,  # block pairs
    parts=["loader", "step", "e2e"],  # knobs: the CPU preset's rows, CPU only
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
    knob_variants=["channels_last=false+fused", "batch=2"],  # compile is exercised by tests/test_gpu_paths.py
    knob_crop=32,  # px
    knob_threads=1,
    knob_warmup=1,  # steps
    knob_steps=2,  # steps
    knob_seconds=0.0,  # s: no extra steps
)
PARTS = ("loader", "step", "e2e", "knobs")
PRECISIONS = ("fp32", "bf16")


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

    for key in ("parts", "models", "sizes", "e2e_models", "pil_workers", "knob_variants"):
        need(
            OmegaConf.is_list(b[key]) or (key in ("e2e_models", "parts") and b[key] is None),
            key,
            f"must be a list, e.g. bench.{key}=[a,b]",
        )
    need(b.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
    need(b.device != "cuda" or torch.cuda.is_available(), "device", "but no CUDA device is visible; use cpu")
    need(isinstance(b.quick, bool), "quick", "must be true or false")
    need(
        b.parts is None or (set(b.parts) <= set(PARTS) and len(b.parts) > 0),
        "parts",
        f"must be a non-empty subset of {PARTS} (or null = by device)",
    )
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
    for text in b.knob_variants:
        try:
            parse_variant(str(text))
        except ValueError as err:
            raise BenchConfigError(f"bench.knob_variants: {err}") from err
    need(b.knob_crop is None or (positive_int(b.knob_crop) and b.knob_crop >= 32), "knob_crop",
         "must be an image side in px >= 32 (or null = the preset's data.crop)")
    need(b.knob_threads is None or positive_int(b.knob_threads), "knob_threads",
         "must be a positive integer (or null = torch's default)")
    need(positive_int(b.knob_warmup) or b.knob_warmup == 0, "knob_warmup", "must be an integer >= 0")
    need(positive_int(b.knob_steps), "knob_steps", "must be a positive integer")
    need(float(b.knob_seconds) >= 0, "knob_seconds", "must be >= 0 (seconds)")


KNOB_FLAGS = ("channels_last", "compile", "fused", "bf16")


def parse_variant(text: str) -> dict[str, Any]:
    """``"channels_last+batch=32"`` -> ``{"channels_last": True, "batch": 32}``; ``"default"`` -> ``{}``."""
    settings: dict[str, Any] = {}
    for token in filter(None, (t.strip() for t in text.split("+"))):
        if token == "default":
            continue
        key, _, value = token.partition("=")
        if key == "batch":
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{text!r}: batch needs a positive number of images, e.g. batch=32")
            settings["batch"] = int(value)
        elif key in KNOB_FLAGS:
            if value not in ("", "true", "false"):
                raise ValueError(f"{text!r}: {key} takes no value, =true or =false")
            settings[key] = value != "false"
        else:
            raise ValueError(f"{text!r}: unknown setting {key!r}; use {', '.join(KNOB_FLAGS)} or batch=N")
    return settings


def resolve_auto(b: DictConfig) -> torch.device:
    """Pick the device and fill every ``null`` knob with its per-device default (in place)."""
    device = torch.device(
        "cuda" if b.device == "cuda" or (b.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    for key, value in (CUDA_AUTO if device.type == "cuda" else CPU_AUTO).items():
        if b[key] is None and value is not None:
            b[key] = value
    if device.type == "cuda" and "knobs" in b.parts:
        raise BenchConfigError("bench.parts has knobs, the CPU preset's rows: run them with bench.device=cpu")
    return device


# ------------------------------------------------------------------------------------------ machine
def project_relative(text: str) -> str:
    """``text`` with paths inside the project, or beside it (``../shared``), made relative to the project:
    BENCHMARKS.md is committed, and committed docs name no machine's absolute paths."""
    return text.replace(f"{REPO}/", "").replace(f"{REPO.parent}/", "../")


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
        "command": " ".join(["python", *(project_relative(a) for a in sys.argv)]),
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

