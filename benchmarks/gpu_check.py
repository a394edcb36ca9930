"""``make gpu-check``: the GPU measurements as one prepared script (under 8 minutes on one H200).

1. ``make bench``'s GPU section for ResNet-50 at 224 px (loader, training step, end to end; bf16,
   channels_last, torch.compile, fused Adam): its targets are >= 3,000 images/s end to end and
   end-to-end / model-only >= 0.9x.
2. One epoch of the report's recipe (``run.py trainer=gpu``: 224 px crops, batch 32, Adam, cosine) for
   ``hybrid`` and ``resnet50``, as ``make train`` runs it on a GPU: training images/s, epoch time, status.
3. Peak GPU memory of a training step (bf16 autocast, channels_last, fused Adam, eager, 224 px) at
   batch 32 and 128, both models.

It writes the ``gpu-check`` section of ``BENCHMARKS.md`` (the bench writes its ``cuda`` one) and copies
the file, the raw JSON and the logs (6 files) to ``--out``; the data cache and run folders stay in
``--work``. Each stage gets what is left of ``--budget-s``;
a stage that no longer fits is recorded as skipped.

``--dry-run`` runs the same code paths tiny on the CPU (mini archive, 32-64 px, a few batches), into
``--out`` only, never the repository's BENCHMARKS.md; ``tests/test_gpu_paths.py`` runs it.

On the lent GPU machine (no internet; the archive and the pure-Python packages it lacks must travel):
``python benchmarks/gpu_check.py --stage .gpu`` here copies the 128 px archive and hydra/omegaconf/antlr4
into ``.gpu/`` (ignored by git through its own ``.gitignore``), then the device call is
``run(command="PYTHONPATH=.gpu/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py
--archive .gpu/imagenette2-128.tgz --out $OUT", carry=[".gpu"], timeout_s=560)``; copy the returned
BENCHMARKS.md over the repository's. The 128 px archive is upsampled to 280 px once by the cache, so
crops stay 224 px.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import the sibling modules as the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.config import NUM_CLASSES, REPO, project_relative
from benchmarks.report import md_table, update_markdown
from benchmarks.step import StepSetup, TrainStep, _free
from imagenette_lab.models import create_model

GIB = 2**30  # bytes per GiB
DEPS = ("hydra", "omegaconf", "antlr4")  # pure-Python packages the GPU machine lacks (run.py, bench config)
TARGET_E2E = 3000.0  # images/s, ResNet-50 224 px bf16 end to end on one H200
TARGET_RATIO = 0.9  # x, end-to-end / model-only


@dataclass(frozen=True)
class Plan:
    """Everything that differs between the real check and its CPU dry run."""

    device: str
    bench_args: list[str]
    run_args: list[str]  # run.py overrides shared by both recipe epochs
    models: dict[str, list[str]]  # recipe model -> its extra overrides
    memory_models: dict[str, dict[str, Any]]  # model -> create_model flags of the peak-memory steps
    memory_size: int  # px
    memory_batches: tuple[int, ...]
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> time it needs at least, s


def real_plan(archive: Path) -> Plan:
    return Plan(
        device="cuda",
        bench_args=["bench.device=cuda", "bench.models=[resnet50]", "bench.sizes=[224]",
                    "bench.e2e_models=[resnet50]", f"data.archive={archive}"],
        run_args=["trainer=gpu", "trainer.max_epochs=1", "logger=csv", f"data.archive={archive}"],
        models={"hybrid": [], "resnet50": ["model=resnet50"]},
        memory_models={"hybrid": {}, "resnet50": {}},
        memory_size=224,
        memory_batches=(32, 128),
        seconds={"bench": 150, "recipe": 45, "memory": 20},
    )


def dry_plan(archive: Path) -> Plan:
    return Plan(
        device="cpu",
        bench_args=["bench.device=cpu", "bench.quick=true", "bench.parts=[loader,step,e2e]",
                    "bench.models=[resnet50]", "bench.e2e_models=[resnet50]", "data.resize=40", "data.crop=32",
                    f"data.archive={archive}"],
        run_args=["trainer=cpu", "trainer.max_epochs=1", "logger=csv", "data.resize=40", "data.crop=32",
                  "data.batch_size=8", "data.num_workers=0", "trainer.limit_train_batches=3",
                  "trainer.limit_val_batches=2", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
                  f"data.archive={archive}"],
        models={"hybrid": ["model.width=0.25", "model.rb_groups=4"], "resnet50": ["model=resnet50"]},
        memory_models={"hybrid": {"width": 0.25, "rb_groups": 4}, "resnet50": {}},
        memory_size=32,
        memory_batches=(2, 4),
    )


class Budget:
    """Seconds left of the whole check."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict[str, str]) -> int:
    """Run ``cmd`` from the repository root with its output in ``log``; the exit status (124: timeout)."""
    with log.open("w") as out:
        try:
            return subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                  timeout=max(timeout, 1)).returncode
        except subprocess.TimeoutExpired:
            return 124


def stage_bench(plan: Plan, work: Path, markdown: Path, budget: Budget, env: dict) -> dict:
    """``benchmarks/bench.py`` in its own process; its e2e rows and checks (raw JSON in ``work``)."""
    raw = work / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench.py"), *plan.bench_args, f"paths.data_dir={work / 'data'}",
           f"bench.output={markdown}", f"bench.json={raw}"]
    later = len(plan.models) * plan.seconds.get("recipe", 0) + plan.seconds.get("memory", 0)
    rc = run_logged(cmd, work / "bench.log", budget.left() - later, env)
    if rc != 0 or not raw.is_file():
        return {"status": f"failed (exit {rc}, see bench.log)"}
    record = json.loads(raw.read_text())
    rows = [{k: r[k] for k in ("model", "size", "pipeline", "model_only", "e2e", "ratio")}
            for r in record.get("e2e", []) if not r.get("reference")]  # the plain-loader reference row stays in bench
    return {"status": "completed", "e2e": rows, "checks": record.get("checks", [])}


def stage_recipe(plan: Plan, work: Path, budget: Budget, env: dict) -> list[dict[str, Any]]:
    """One epoch of ``run.py`` per model; throughput and status from each run's metrics.json."""
    rows = []
    for i, (name, extra) in enumerate(plan.models.items()):
        later = (len(plan.models) - i - 1) * plan.seconds.get("recipe", 0) + plan.seconds.get("memory", 0)
        if budget.left() < later + plan.seconds.get("recipe", 0):
            rows.append({"model": name, "status": "skipped (time budget)"})
            continue
        run_dir = work / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh epoch, not a resume or a skip of an earlier one
        cmd = [sys.executable, str(REPO / "run.py"), *plan.run_args, *extra, f"paths.data_dir={work / 'data'}",
               f"paths.log_dir={work / 'runs'}", f"hydra.run.dir={run_dir}"]
        rc = run_logged(cmd, work / f"recipe_{name}.log", budget.left() - later, env)
        metrics_file = run_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        speed = metrics.get("throughput", {})
        rows.append({
            "model": name,
            "status": metrics.get("status", f"failed (exit {rc})") if rc == 0 else f"failed (exit {rc})",
            "batch": metrics.get("config", {}).get("data", {}).get("batch_size"),
            "precision": metrics.get("config", {}).get("trainer", {}).get("precision"),
            "train_images_per_s": speed.get("train_images_per_s"),
            "train_s": speed.get("train_s"),
            "epoch_s": speed.get("epoch_s"),
            "val_acc": metrics.get("final", {}).get("val/acc"),
        })
    return rows


def peak_memory(plan: Plan, budget: Budget) -> list[dict[str, Any]]:
    """Peak allocated memory over 3 training steps per model and batch (None on the CPU dry run)."""
    device = torch.device(plan.device)
    setup = StepSetup(device, "bf16", channels_last=True, compile=False)
    fused = device.type == "cuda"  # the GPU preset's optimizer; CPU: the dry run only walks the code path
    rows = []
    for name, flags in plan.memory_models.items():
        for batch in plan.memory_batches:
            if budget.left() < 5:
                rows.append({"model": name, "batch": batch, "status": "skipped (time budget)"})
                continue
            torch.manual_seed(0)
            step = TrainStep(create_model(name, NUM_CLASSES, **flags), setup,
                             optimizer=lambda p, fused=fused: torch.optim.Adam(p, lr=0.00024, fused=fused))
            x = torch.randn(batch, 3, plan.memory_size, plan.memory_size, device=device)
            y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            for _ in range(3):
                step(x, y)
            peak = reserved = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak, reserved = torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB
            rows.append({"model": name, "batch": batch, "status": "completed", "peak_gib": peak,
                         "reserved_gib": reserved})
            del step, x, y
            _free(device)
    return rows


def _num(v: Any, fmt: str) -> str | None:
    return None if v is None else format(v, fmt)


def section(result: dict[str, Any]) -> str:
    """The ``gpu-check`` section of BENCHMARKS.md."""
    dry = result["dry_run"]
    title = f"## GPU check: {result['device_name']}" + (" (dry run on the CPU, not a measurement)" if dry else "")
    context = (f"- date: {result['date']}; wall time {result['wall_s'] / 60:.1f} min; torch {result['torch']}\n"
               f"- command: `{result['command']}`; data: `{result['archive']}`")
    bench = result["bench"]
    checks = []
    for r in bench.get("e2e", []):
        if r["model"] == "resnet50":
            e2e_ok = "PASS" if r["e2e"] >= TARGET_E2E else "FAIL"
            checks.append([f"ResNet-50 {r['size']} px bf16, end to end", f"{r['e2e']:,.0f} images/s",
                           f">= {TARGET_E2E:,.0f} images/s", "info (dry run)" if dry else e2e_ok])
            ratio_ok = "PASS" if r["ratio"] >= TARGET_RATIO else "FAIL"
            checks.append([f"ResNet-50 {r['size']} px, end-to-end / model-only", f"{r['ratio']:.2f}x",
                           f">= {TARGET_RATIO:g}x", "info (dry run)" if dry else ratio_ok])
    if not checks:
        checks.append(["make bench's GPU section", bench.get("status"), "—", "not measured"])
    targets = md_table(["check", "measured", "target", "result"], checks)
    recipe = md_table(
        ["model", "batch", "precision", "train images/s", "train s", "epoch s", "val acc", "status"],
        [[r["model"], r.get("batch"), r.get("precision"), _num(r.get("train_images_per_s"), ",.0f"),
          _num(r.get("train_s"), ".1f"), _num(r.get("epoch_s"), ".1f"), _num(r.get("val_acc"), ".3f"), r["status"]]
         for r in result["recipe"]],
    )
    memory = md_table(
        ["model", "batch", "peak allocated GiB", "peak reserved GiB", "status"],
        [[r["model"], r["batch"], _num(r.get("peak_gib"), ".2f") or ("n/a (CPU)" if dry else None),
          _num(r.get("reserved_gib"), ".2f"), r["status"]] for r in result["memory"]],
    )
    size = result["memory_size"]
    return (
        f"{title}\n\n{context}\n\n### Targets (from `make bench`'s GPU section above)\n\n{targets}\n\n"
        f"### One epoch of the report's recipe (`run.py trainer=gpu`, as `make train` on a GPU)\n\n{recipe}\n\n"
        "train images/s counts the training batches (loading included); epoch s is the whole epoch with "
        "validation and checkpointing; val acc after one epoch is no result, only a sign the run learned.\n\n"
        f"### Peak GPU memory of a training step ({size} px, bf16 autocast, channels_last, fused Adam, eager)"
        f"\n\n{memory}\n"
    )


def stage_files(dest: Path, archive: Path) -> None:
    """Copy the archive and the pure-Python packages the GPU machine lacks into ``dest`` (git-ignored)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / ".gitignore").write_text("*\n")  # never committed, travels only when `carry` names it
    shutil.copy2(archive, dest / archive.name)
    site = dest / "site"
    for name in DEPS:
        src = Path(__import__(name).__file__).parent
        shutil.copytree(src, site / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    print(f"staged {archive.name} and {', '.join(DEPS)} in {dest}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="same code paths, tiny, on the CPU")
    parser.add_argument("--archive", type=Path, help="dataset archive (default: 128 px, or mini for --dry-run)")
    parser.add_argument("--out", type=Path, default=REPO / "logs" / "gpu_check", help="results (6 files)")
    parser.add_argument("--work", type=Path, default=REPO / "logs" / "gpu_check_work", help="data cache, runs")
    parser.add_argument("--budget-s", type=float, default=470.0, help="seconds for the whole check")
    parser.add_argument("--stage", type=Path, metavar="DIR", help="only copy what the GPU machine needs into DIR")
    args = parser.parse_args(argv)
    datasets = Path(os.environ.get("IMAGENETTE_DATASETS", REPO.parent / "shared" / "datasets"))
    if args.stage:
        stage_files(args.stage, args.archive or datasets / "imagenette2-128.tgz")
        return 0
    archive = (args.archive or datasets / ("imagenette2-224-mini.tgz" if args.dry_run else "imagenette2-128.tgz"))
    archive = archive.resolve()
    if not archive.is_file():
        print(f"gpu_check: archive {archive} not found; pass --archive PATH (see --stage)", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; use --dry-run to walk the code paths on the CPU", file=sys.stderr)
        return 2
    start, budget = time.monotonic(), Budget(args.budget_s)
    out, work = args.out.resolve(), args.work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    plan = dry_plan(archive) if args.dry_run else real_plan(archive)
    markdown = work / "BENCHMARKS.md" if args.dry_run else REPO / "BENCHMARKS.md"
    if args.dry_run:  # the dry run edits a copy, never the repository's file
        shutil.copy2(REPO / "BENCHMARKS.md", markdown)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    if args.dry_run:  # tiny batches on a shared CPU: a second thread only spins (as the tests run)
        env["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    result: dict[str, Any] = {
        "dry_run": args.dry_run,
        "device_name": torch.cuda.get_device_name() if plan.device == "cuda" else "CPU",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "benchmarks/gpu_check.py",
                             *map(project_relative, argv if argv is not None else sys.argv[1:])]),
        "archive": archive.name,
        "memory_size": plan.memory_size,
    }
    print("gpu_check: bench", flush=True)
    result["bench"] = stage_bench(plan, work, markdown, budget, env)
    print("gpu_check: recipe epochs", flush=True)
    result["recipe"] = stage_recipe(plan, work, budget, env)
    print("gpu_check: peak memory", flush=True)
    result["memory"] = peak_memory(plan, budget)
    result["wall_s"] = time.monotonic() - start
    text = section(result)
    update_markdown(markdown, "gpu-check", text)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    shutil.copy2(markdown, out / "BENCHMARKS.md")
    for name in ("bench.json", "bench.log", *(f"recipe_{m}.log" for m in plan.models)):
        if (work / name).is_file():
            shutil.copy2(work / name, out / name)
    print("\n" + text + f"\nwrote {markdown}; results in {out}")
    return 0 if result["bench"].get("status") == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
