"""Verdicts against the targets, the markdown tables, and the sections of ``BENCHMARKS.md``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from benchmarks.config import project_relative
from benchmarks.step import StepSetup


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
        if r.get("reference"):
            r["result"] = "reference"
            continue
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


def _context(cfg: DictConfig, info: dict[str, Any], checks: list[dict[str, Any]], data: bool = True) -> str:
    d = cfg.data
    loads = [" / ".join(f"{v:.2f}" for v in info[k]) for k in ("load_avg_start", "load_avg_end")]
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in info["part_s"].items())
    source = project_relative(str(d.archive or d.root or f"official {d.variant}"))
    lines = [
        f"- date: {info['date']}; wall time {info['wall_s'] / 60:.1f} min ({parts})",
        f"- host: {info['host']}; CPU {info['cpu']}" + (f"; GPU {info['gpu']}" if info["gpu"] else ""),
        f"- software: Python {info['python']}, " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        f"- load average (1/5/15 min): {loads[0]} at start, {loads[1]} at end (other jobs share the machine)",
        f"- command: `{info['command']}`" + (f" at commit {info['git']}" if info["git"] else ""),
    ]
    if data:
        lines.append(f"- data: `{source}`, resize {d.resize} px, crop {d.crop} px")
    if checks:
        lines.append(f"- targets: {sum(c['result'] == 'PASS' for c in checks)}/{len(checks)} PASS")
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
        "flip/normalize/erase runs on the device (`device_transform`); the `+ BatchAugment` row does that on "
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
            "—" if r.get("reference") else f">= {t.e2e_ratio:g}x",
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
        f"{setup.describe()}. End to end = `train_dataloader()` -> `.to(device)` -> `device_transform` -> "
        "step; model-only = the same step on one such batch kept on the device. "
        f"{b.warmup} warm-up step(s) through the loader, then {b.e2e_rounds} round(s) of a model-only and "
        f"an end-to-end block of {block} each (order flipped every round), timed by the wall clock, "
        "synchronized at block edges."
    )
    title = f"### End to end: batch {b.batch_size}, real ImagenetteDataModule loader vs model alone"
    return f"{title}\n\n{md_table(headers, rows)}\n\n{note}"


def knobs_section(result: dict[str, Any], cfg: DictConfig) -> str:
    """The markdown table of the ``knobs`` part."""
    b = cfg.bench
    on_off = {True: "on", False: "off"}
    rows = [
        [r["name"], r["batch"], on_off[r["channels_last"]], on_off[r["compile"]], on_off[r["fused"]],
         "bf16" if r["bf16"] else "fp32", _rate(r["images_per_s"]), _x(r["ratio"]), r["timed_steps"],
         f"{r['warmup_s']:.0f}"]
        for r in result["rows"]
    ]
    headers = ["variant", "batch", "channels_last", "compile", "fused optimizer", "precision", "images/s",
               "vs default", "timed steps", "warm-up s"]
    model = result["model"]
    flags = ", ".join(f"{k} {v}" for k, v in model.items() if k not in ("_target_", "name", "num_classes"))
    note = (
        f"Model, batch and optimizer of `experiment={result['experiment']}` (`{model['name']}`: {flags}; "
        f"{result['params_m']:.1f} M parameters; `{result['optimizer']}`), `default` = its settings as a CPU "
        f"run resolves them. Forward + cross-entropy + backward + optimizer step on synthetic "
        f"{result['crop']} px batches in memory, {result['threads']} torch thread(s); {b.knob_warmup} warm-up "
        f"step(s) each (the warm-up column: torch.compile compiles there), then one step of every variant per "
        f"round, the order flipped every round (at least {b.knob_steps} rounds, more while under "
        f"{b.knob_seconds:g} s). images/s = batch / median step time; vs default = median over rounds of the "
        "images/s ratio to `default` in the same round, so both saw the same machine load."
    )
    title = f"### Training knobs: the CPU preset's step, {result['crop']} px"
    return f"{title}\n\n{md_table(headers, rows)}\n\n{note}"


def render(
    results: dict[str, Any], cfg: DictConfig, setup: StepSetup, info: dict[str, Any]
) -> dict[str, str]:
    """The sections of BENCHMARKS.md this run measured, by kind (``SECTIONS``); also printed."""
    checks = results["checks"]
    device = info["gpu"] or info["cpu"]
    smoke = " (quick smoke run, not a benchmark)" if cfg.bench.quick else ""
    sections = {}
    if {"loader", "step", "e2e"} & set(results):
        out = [f"## {'GPU' if setup.device.type == 'cuda' else 'CPU'}: {device}{smoke}", _context(cfg, info, checks)]
        if "loader" in results:
            out.append(_loader_section(results["loader"], cfg))
        if "step" in results:
            out.append(_step_section(results["step"], cfg, setup, info["torch_threads"]))
        if "e2e" in results:
            out.append(_e2e_section(results["e2e"], cfg, setup))
        rows = [[c["what"], c["value"], c["target"], c["result"]] for c in checks]
        out.append("### Targets\n\n" + md_table(["check", "measured", "target", "result"], rows))
        sections["cuda" if setup.device.type == "cuda" else "cpu"] = "\n\n".join(out) + "\n"
    if "knobs" in results:
        out = [f"## CPU training knobs: {info['cpu']}{smoke}", _context(cfg, info, [], data=False),
               knobs_section(results["knobs"], cfg)]
        sections["cpu-knobs"] = "\n\n".join(out) + "\n"
    return sections


HEADER = """# Benchmarks

Generated by `make bench` (`python benchmarks/bench.py`, see its docstring for the knobs) and
`make gpu-check` (`python benchmarks/gpu_check.py`): loader, training-step and end-to-end throughput side by
side on one machine, the CPU preset's training knobs, and the GPU check of the
report's recipe. A run rewrites the sections it measured and keeps the others.
"""
SECTIONS = ("cpu", "cpu-knobs", "cuda", "gpu-check")  # in file order
NO_RUN = {
    "cpu": "## CPU\n\nNot measured yet: run `make bench ARGS=bench.device=cpu`.\n",
    "cpu-knobs": "## CPU training knobs\n\nNot measured yet: run `make bench ARGS='bench.parts=[knobs]'`.\n",
    "cuda": (
        "## GPU\n\nNot measured yet: no GPU was available to the runs recorded here, so the CPU targets "
        "above are the only ones measured. `make bench` on a CUDA machine fills this section "
        "unchanged (bf16 autocast, channels_last, torch.compile, cudnn.benchmark and fused Adam are "
        "picked automatically; expect several minutes of compilation). Where the 224 px archive is "
        "missing, `data.archive=<...>/imagenette2-128.tgz` gives the loader the same work per batch.\n"
    ),
    "gpu-check": (
        "## GPU check\n\nNot measured: no GPU was lent to the sessions that produced this file. "
        "`make gpu-check` (`benchmarks/gpu_check.py`, under 8 minutes on one H200) fills this section: "
        "ResNet-50 224 px bf16 end to end against 3,000 images/s and 0.9x model-only, one epoch of the "
        "report's recipe for the hybrid and ResNet-50, and peak GPU memory at batch 32 and 128.\n"
    ),
}


def _marker(kind: str, end: bool = False) -> str:
    return f"<!-- bench:{kind}:{'end' if end else 'start'} -->"


def update_markdown(path: Path, kind: str, section: str) -> None:
    """Write ``section`` as the ``kind`` part (one of ``SECTIONS``) of ``path``, in place: the other parts and
    any prose between or after them are kept, a placeholder part (no device in its title) is refreshed, a
    missing part is added in ``SECTIONS`` order; the introduction before the first part is ``HEADER``."""
    if kind not in SECTIONS:
        raise ValueError(f"unknown BENCHMARKS.md section {kind!r}; one of {SECTIONS}")
    text = path.read_text() if path.is_file() else ""
    first = min((text.index(_marker(k)) for k in SECTIONS if _marker(k) in text), default=len(text))
    text = f"{HEADER}\n{text[first:].lstrip()}"
    for i, k in enumerate(SECTIONS):
        start, end = _marker(k), _marker(k, end=True)
        if start in text and end in text:
            before, rest = text.split(start, 1)
            kept, after = rest.split(end, 1)
            kept = kept.strip("\n")
            measured = kept.startswith("## ") and ":" in kept.split("\n", 1)[0]  # "## GPU: <device>"
            body = section if k == kind else kept + "\n" if measured else NO_RUN[k]
            text = f"{before}{start}\n{body}{end}{after}"
            continue
        block = f"{start}\n{section if k == kind else NO_RUN[k]}{end}\n"
        later = [text.index(_marker(n)) for n in SECTIONS[i + 1 :] if _marker(n) in text]
        cut = min(later, default=len(text))  # before the next part the file has, or at the end
        text = f"{text[:cut].rstrip()}\n\n{block}\n{text[cut:]}"
    path.write_text(text.rstrip("\n") + "\n")
