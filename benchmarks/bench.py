"""``make bench``: data loader, training step and end-to-end throughput, side by side, on one machine,
and the CPU preset's training knobs.

Four measurements, each printed as a table and written to its section of ``BENCHMARKS.md`` (a run
rewrites the sections it measured and keeps the others):

1. **Loader**: training batches per second of the torchvision PIL reference
   (``data.pipeline=pil``) against the resize cache (``cached``), each in its own process (peak RSS
   measured there), timed in turns so that both see the same machine load.
2. **Training step**: forward + cross-entropy + backward + Adam on synthetic batches already
   on the device, our ``create_model`` network against the library constructor of the same architecture
   (timm / torchvision), interleaved step by step so both see the same machine load.
3. **End to end**: the same step fed by the real ``ImagenetteDataModule`` loader (+ its
   device-side augmentation) against the model alone on a batch already in memory: the data path's tax.
4. **Knobs** (CPU only): the CPU preset's training step with channels_last, torch.compile, a
   fused optimizer and other batch sizes, side by side, as ratios to the preset's own settings
   (``benchmarks/cpu_knobs.py``). Only these rows: ``make bench ARGS='bench.parts=[knobs]'``.

Arguments are Hydra-style ``key=value`` (OmegaConf dotlist): ``data.*`` are the keys of
``conf/data/imagenette.yaml`` (``make bench`` passes ``data.archive=...``), ``bench.*`` are the knobs in
``BENCH_DEFAULTS`` (``benchmarks/config.py``), e.g. ``python benchmarks/bench.py bench.device=cpu
bench.models=[resnet50]``. On CUDA it uses bf16 autocast, channels_last, ``torch.compile``,
cudnn.benchmark and fused Adam, and times with CUDA events / synchronize, warm-up steps excluded. A GPU
box without the 224 px archive can use ``data.archive=.../imagenette2-128.tgz``: the cache upsamples it
to 280 px once, and crops stay 224 px, so the loader does the same work per batch (the pil reference
decodes smaller JPEGs, though).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

if __package__ in (None, ""):  # run as a script (`python benchmarks/bench.py`): import as the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.config import PARTS, REPO, BenchConfigError, load_config, machine_info, resolve_auto
from benchmarks.cpu_knobs import bench_knobs
from benchmarks.loader import bench_loaders
from benchmarks.report import NO_RUN, SECTIONS, judge, render, update_markdown
from benchmarks.step import StepSetup, bench_e2e, bench_steps

# Re-exported for callers of this script's functions (tests, gpu_check.py).
__all__ = ["NO_RUN", "SECTIONS", "BenchConfigError", "load_config", "main", "resolve_auto", "update_markdown"]


# -------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str]) -> int:
    try:
        cfg = load_config(argv)
    except BenchConfigError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    b = cfg.bench
    try:
        device = resolve_auto(b)
    except BenchConfigError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
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
        "knobs": lambda: bench_knobs(cfg),
    }
    info["part_s"] = {}
    for part in (p for p in PARTS if p in b.parts):
        part_start = time.perf_counter()
        results[part] = parts[part]()
        info["part_s"][part] = time.perf_counter() - part_start
    results["checks"] = judge(results, setup, b.targets)
    info["load_avg_end"] = os.getloadavg()
    info["wall_s"] = time.perf_counter() - start
    sections = render(results, cfg, setup, info)
    print("\n" + "\n".join(sections.values()))
    if b.output:
        path = Path(b.output) if Path(b.output).is_absolute() else REPO / b.output
        for kind, section in sections.items():
            update_markdown(path, kind, section)
        print(f"wrote {path} ({', '.join(sections)})")
    if b.json:
        record = {"machine": info, "config": OmegaConf.to_container(cfg, resolve=True), **results}
        Path(b.json).write_text(json.dumps(record, indent=2, default=str))
    failed = [c for c in results["checks"] if c["result"] == "FAIL"]
    return 1 if failed and b.strict else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
