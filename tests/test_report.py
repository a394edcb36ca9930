"""The report tool on a real tiny sweep: ReLU6 vs Mish in a small hybrid, 2 seeds, 2 short epochs on
the real mini archive, run through ``python -m imagenette_lab.report.sweep`` (what ``make activation`` calls)."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from scipy import stats

from imagenette_lab.callbacks import read_epochs_csv
from imagenette_lab.report import build_report, expected_jobs, load_runs, summarize, welch
from imagenette_lab.report.__main__ import main as report_main
from imagenette_lab.report.build import time_to
from imagenette_lab.report.claims import CLAIMS, claims_markdown
from imagenette_lab.report.experiments import EXPERIMENTS
from imagenette_lab.report.stats import adjust_bh
from imagenette_lab.report.wandb_source import load_offline_wandb_runs
from tests.test_train import REPO

NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"
TINY = [
    "trainer=cpu", "data.resize=40", "data.crop=32", "data.batch_size=8", "data.num_workers=0",
    "data.persistent_workers=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "debug=limit", "logger=both", "model.width=0.25", "model.rb_groups=4",
]


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, mini_archive: Path) -> dict[str, Path]:
    """``make activation``'s command with 2 seeds and tiny settings; returns the sweep and results folders."""
    tmp = tmp_path_factory.mktemp("report")
    cmd = [
        sys.executable, "-m", "imagenette_lab.report.sweep", "activation", "--seeds", "1,2", "--out",
        str(tmp / "results"), "--make", "make activation SEEDS=1,2", "--",
        f"paths.log_dir={tmp / 'logs'}", f"paths.data_dir={tmp / 'data'}", f"data.archive={mini_archive}", *TINY,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (folder,) = {p.parent.parent for p in (tmp / "logs").rglob("metrics.json")}
    return {"sweep": folder, "results": tmp / "results"}


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("metrics.json"))]


def test_welch_and_summaries_against_scipy() -> None:
    a, b = [0.81, 0.84, 0.83], [0.78, 0.80, 0.77]
    res = stats.ttest_ind([100 * x for x in a], [100 * x for x in b], equal_var=False)
    comp = welch(a, b, "mish", "relu6")
    assert comp.p == pytest.approx(res.pvalue) and comp.t == pytest.approx(res.statistic)
    assert comp.diff == pytest.approx(100 * (statistics.mean(a) - statistics.mean(b)))
    assert comp.ci_low < comp.diff < comp.ci_high and comp.significant
    assert "p = 0.0" in comp.sentence() and "significant at α = 0.05" in comp.sentence()
    single = welch([0.85], [0.80], "mish", "relu6")  # the report's situation: one run per arm
    assert not single.testable and "at least 2 seeds" in single.sentence() and "+5.00 pp" in single.sentence()
    assert "no spread" in welch([0.5, 0.5], [0.4, 0.4], "a", "b").note
    assert summarize([0.5, math.nan, 0.7]).fmt(100) == "60.0 ± 14.1"  # NaN (no value recorded) left out
    assert summarize([0.873]).fmt(100) == "87.3" and summarize([]).fmt() == "—"
    # several arms against one reference: Benjamini-Hochberg, as scipy computes it, decides significance
    comps = [welch(x, b, f"arm{i}", "relu6") for i, x in enumerate(([0.81, 0.84, 0.83], [0.80, 0.81, 0.79]))]
    adjusted = adjust_bh(comps)
    want = stats.false_discovery_control([c.p for c in comps], method="bh")
    assert [c.p_adj for c in adjusted] == pytest.approx(list(want)) and all(c.p_adj >= c.p for c in adjusted)
    assert "Benjamini-Hochberg adjusted p" in adjusted[0].sentence() and "BH" in adjusted[0].short()
    assert adjust_bh(comps[:1])[0].adjusted is False  # one test: nothing to correct


@pytest.mark.slow
def test_tables_are_the_runs_numbers(sweep: dict[str, Path]) -> None:
    runs = load_runs(sweep["sweep"])
    assert len(runs) == 4 and all(r.completed for r in runs), [(r.source, r.status) for r in runs]
    report = build_report(runs)
    assert report.experiment == "activation" and [a.label for a in report.arms] == ["relu6", "mish"]
    by_act: dict[str, list[float]] = {}
    last: dict[str, list[float]] = {}
    for m in _metrics(sweep["sweep"]):  # read metrics.json and epochs.csv independently of the tool
        by_act.setdefault(m["config"]["model"]["act"], []).append(m["final"]["val/acc"] * 100)
        rows_csv = read_epochs_csv(sweep["sweep"] / m["run_dir"] / "epochs.csv")
        last.setdefault(m["config"]["model"]["act"], []).append(rows_csv[-1]["val/acc"] * 100)
    rows = {row[0]: row for row in report.tables["accuracy"].rows}
    for act, accs in by_act.items():
        assert len(accs) == 2
        assert rows[act][1] == "2"
        assert rows[act][2] == summarize([a / 100 for a in accs]).fmt(100)  # best epoch
        assert rows[act][3] == summarize([a / 100 for a in last[act]]).fmt(100)  # last epoch
    assert rows["relu6"][4] == "85" and rows["mish"][4] == "~85"  # the report's numbers beside ours
    (comp,) = report.comparisons
    assert (comp.a, comp.b) == ("mish", "relu6") and not comp.adjusted  # one test: no correction
    if comp.testable:  # the test uses the last epoch, not the validation-chosen best one
        assert comp.p == pytest.approx(stats.ttest_ind(last["mish"], last["relu6"], equal_var=False).pvalue)
    # time to accuracy: the table's "reached" counts are the runs' own records
    tta = report.tables["time_to_acc"]
    assert tta.columns[2].startswith("epochs to ")
    threshold = float(tta.columns[2].removeprefix("epochs to ").rstrip("%")) / 100
    for arm in report.arms:
        reached = sum(time_to(r, threshold) is not None for r in arm.completed)
        row = next(r for r in tta.rows if r[0] == arm.label)
        assert row[2].endswith(f"({reached}/2)")
    # figures are real PNGs with data
    for kind in ("curves", "curves_time"):
        png = sweep["results"] / "full" / f"activation_{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert sorted(expected_jobs(sweep["sweep"]), key=str) == sorted((r.overrides for r in runs), key=str)


@pytest.mark.slow
def test_sweep_wrapper_records_command_machine_and_time(sweep: dict[str, Path]) -> None:
    (line,) = (sweep["sweep"] / "provenance.jsonl").read_text().splitlines()
    prov = json.loads(line)
    assert prov["jobs"] == {"completed": 4} and prov["seconds"] > 1 and prov["make"] == "make activation SEEDS=1,2"
    assert prov["command"].startswith("python run.py -m experiment=activation scale=full") and "seed=1,2" in prov["command"]
    assert prov["machine"]["cores"] == f"{os.cpu_count()} cores" and prov["machine"]["cpu"]
    page = (sweep["results"] / "full" / "activation.md").read_text()
    assert "**Produced by:**" in page and "`make activation SEEDS=1,2`" in page and "jobs 4 completed" in page


@pytest.mark.slow
def test_failed_missing_and_crashed_runs_are_listed_not_averaged(sweep: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "multiruns" / "activation" / "full"
    shutil.copytree(sweep["sweep"], folder)
    jobs = {(m["config"]["model"]["act"], m["seed"]): Path(m["run_dir"]).name for m in _metrics(folder)}
    # relu6 seed 2 failed at epoch 2; mish seed 2 never started (Hydra stopped at the failure)
    failed = folder / jobs["relu6", 2] / "metrics.json"
    data = json.loads(failed.read_text())
    data.update(status="failed", epochs_completed=1, error="FloatingPointError: training loss is nan at epoch 1")
    failed.write_text(json.dumps(data))
    shutil.rmtree(folder / jobs["mish", 2])
    report = build_report(load_runs(folder))
    relu6, mish = report.arms
    assert [r.status for r in report.problems] == ["failed", "missing"]
    assert [len(relu6.completed), len(mish.completed)] == [1, 1]
    kept = json.loads((folder / jobs["relu6", 1] / "metrics.json").read_text())["final"]["val/acc"]
    assert report.tables["accuracy"].rows[0][1:3] == ["1 (+1 not averaged)", f"{kept * 100:.1f}"]
    page = report.markdown
    assert "## Runs not averaged" in page and "FloatingPointError: training loss is nan" in page
    assert "| failed | 1/2 |" in page and "| missing |" in page and "act=mish" in page and "seed=2" in page
    assert "needs at least 2 seeds per arm" in page
    # a job that crashed before its first epoch ended has a folder but no metrics.json
    (folder / jobs["mish", 1] / "metrics.json").unlink()
    statuses = sorted(r.status for r in load_runs(folder))
    assert statuses == ["completed", "failed", "missing", "no-metrics"]


@pytest.mark.slow
def test_cli(sweep: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "imagenette_lab.report", str(sweep["sweep"]), "--out", str(tmp_path)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(tmp_path / "full" / "activation.md") in proc.stdout
    assert (tmp_path / "full" / "activation.md").read_text().startswith("# ReLU6 vs Mish in the hybrid — full scale")
    assert report_main([str(sweep["sweep"]), "--check"]) == 0
    assert "| relu6 | 2 |" in capsys.readouterr().out
    assert report_main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_offline_wandb_runs_give_the_same_report(sweep: dict[str, Path]) -> None:
    """The W&B run files the sweep wrote (offline), read back, give the same epochs, statuses and tables as
    the run folders: what W&B holds is what the folders hold."""
    folder_runs = load_runs(sweep["sweep"])
    wandb_runs = load_offline_wandb_runs(sweep["sweep"])
    assert len(wandb_runs) == len(folder_runs) == 4
    by_overrides = {tuple(sorted(r.overrides.items())): r for r in wandb_runs}
    for run in folder_runs:
        wr = by_overrides[tuple(sorted(run.overrides.items()))]
        assert wr.status == run.status == "completed" and wr.metrics["exit_code"] == 0
        for key in ("train/loss", "val/acc", "val/loss", "lr"):
            want = [r.get(key) for r in read_epochs_csv(Path(run.source) / "epochs.csv")]
            assert [r.get(key) for r in wr.epochs] == pytest.approx(want)
        assert wr.metrics["per_class_acc"] == pytest.approx(run.metrics["per_class_acc"])
    a, b = build_report(folder_runs), build_report(wandb_runs)
    assert [r[:4] for r in a.tables["accuracy"].rows] == [r[:4] for r in b.tables["accuracy"].rows]
    assert [c.sentence() for c in a.comparisons] == [c.sentence() for c in b.comparisons]


@pytest.mark.slow
def test_notebook_runs_on_the_sweep(sweep: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    stored = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in stored.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code), "store it without outputs"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('KERNEL', sys.executable)"))
    monkeypatch.setenv("IMAGENETTE_SWEEPS", str(sweep["sweep"]))
    # "python3" is resolved by jupyter_client to this interpreter (sys.executable), i.e. the venv
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert f"KERNEL {sys.executable}" in text
    assert "4 runs in 1 experiment(s): activation (full scale)" in text
    assert "| relu6 | 2 |" in text and "mish − relu6" in text and "every run completed" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # curves_time and curves


@pytest.mark.slow
def test_page_names_its_data_and_departures_and_corrects_for_several_arms(
    sweep: dict[str, Path], tmp_path: Path
) -> None:
    page = (sweep["results"] / "full" / "activation.md").read_text()
    data = _metrics(sweep["sweep"])[0]["data"]
    # the stored sizes are the ones run.py measured from the files' headers (metrics.json "data.sizes")
    assert data["sizes"]["train"]["max"] == [224, 224] and data["sizes"]["val"]["square"] == 1.0
    assert (f"- **Data:** archive `imagenette2-224-mini.tgz` → folder `imagenette2-224-mini`, 200 train / 100 val "
            f"images, data digest `{data['digest']}`; stored images: train 224×224 px (h×w, 100% square); val "
            "224×224 px (h×w, 100% square). Aspect ratios are already lost in this copy") in page
    # the archive's path and the temporary folders are the machine's: only relative paths or file names
    assert str(sweep["sweep"].parents[3]) not in page and "/tmp/" not in page and str(REPO) not in page
    assert "data.archive=../shared/datasets/imagenette2-224-mini.tgz" in page or "…/imagenette2-224-mini.tgz" in page
    assert "## Where this departs from the report" in page
    assert "**Epochs:** 2. The report never states its epoch count: the full scale's 30 epochs are our assumption" in page
    assert "val acc, best epoch (%)" in page and "val acc, last epoch (%)" in page
    assert "on the **last** epoch's validation accuracy" in page and "Benjamini" not in page  # one test only
    # a third arm (relu6's runs copied as silu), every run's validation accuracy set so that each test is
    # testable: two tests against relu6, Benjamini-Hochberg adjusted as scipy does it
    folder = tmp_path / "multiruns" / "activation" / "full"
    shutil.copytree(sweep["sweep"], folder)
    for m in _metrics(folder):
        if m["config"]["model"]["act"] == "relu6":
            dst = folder / (m["run_dir"] + "-silu")
            shutil.copytree(folder / m["run_dir"], dst)
            m["overrides"] = [o.replace("act=relu6", "act=silu") for o in m["overrides"]]
            m["run_dir"], m["config"]["model"]["act"] = dst.name, "silu"
            (dst / "metrics.json").write_text(json.dumps(m))
    _set_last_acc(folder, {"relu6": [0.30, 0.40], "mish": [0.41, 0.47], "silu": [0.34, 0.45]})
    report = build_report(load_runs(folder))
    assert [a.label for a in report.arms] == ["relu6", "mish", "silu"]
    last = {a.label: [read_epochs_csv(Path(r.source) / "epochs.csv")[-1]["val/acc"] * 100 for r in a.completed]
            for a in report.arms}
    raw = [stats.ttest_ind(last[x], last["relu6"], equal_var=False).pvalue for x in ("mish", "silu")]
    comps = {c.a: c for c in report.comparisons}
    assert [comps[x].p for x in ("mish", "silu")] == pytest.approx(raw)
    assert [comps[x].p_adj for x in ("mish", "silu")] == pytest.approx(list(stats.false_discovery_control(raw)))
    assert "p-values are Benjamini-Hochberg adjusted" in report.markdown


@pytest.mark.slow
def test_cpu_scale_page_names_its_stand_in_and_what_it_can_say(
    sweep: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep's runs as the cpu scale records them (the stand-in model, progressive resizing): the page says
    which model stood in, that the report trained at one size, and what the cpu scale can and cannot say,
    followed by the experiment's own cpu note."""
    monkeypatch.setitem(EXPERIMENTS, "activation", replace(EXPERIMENTS["activation"], cpu="Its own cpu note."))
    folder = tmp_path / "multiruns" / "activation" / "cpu"
    shutil.copytree(sweep["sweep"], folder)
    for path in sorted(folder.rglob("metrics.json")):
        m = json.loads(path.read_text())
        m["overrides"] = [o.replace("scale=full", "scale=cpu") for o in m["overrides"]]
        m["config"]["scale_name"] = "cpu"
        m["config"]["model"].update(name="resnet18", width=0.5)
        m["config"]["data"]["progressive"] = {"start": 56, "epochs": [5, 10], "step": 8}
        path.write_text(json.dumps(m))
    report = build_report(load_runs(folder))
    assert report.scale == "cpu"
    page = report.markdown
    assert "> **cpu scale — what it can and cannot say:** conf/scale/cpu.yaml: a stand-in" in page
    assert "may differ in a plain ResNet. Its own cpu note." in page
    assert "- **Model:** resnet18 (width 0.5) stands in for the experiment's own architecture" in page
    assert "- **Progressive resizing:** training images start at 56 px" in page
    assert "quick scale" not in page  # the quick form's caveats belong to the quick pages only
    # the full-scale page of the same runs names neither
    full = (sweep["results"] / "full" / "activation.md").read_text()
    assert "**Model:**" not in full and "Progressive resizing" not in full and "cpu scale" not in full


def _set_last_acc(folder: Path, values: dict[str, list[float]]) -> None:
    """Give each run of ``folder`` the next of its arm's ``values`` as every epoch's validation accuracy."""
    left = {k: list(v) for k, v in values.items()}
    for m in _metrics(folder):
        csv_path = folder / m["run_dir"] / "epochs.csv"
        lines = csv_path.read_text().splitlines()
        col = lines[0].split(",").index("val/acc")
        acc = left[m["config"]["model"]["act"]].pop(0)
        rows = [line.split(",") for line in lines[1:]]
        for cells in rows:
            cells[col] = repr(acc)
        csv_path.write_text("\n".join([lines[0], *(",".join(c) for c in rows)]) + "\n")


@pytest.mark.slow
def test_claims_page_from_the_sweep(sweep: dict[str, Path], tmp_path: Path) -> None:
    """``--claims-only`` writes CLAIMS.md alone, from the runs: the activation claims are judged (below the
    report's accuracy regime here, so not resolved), the dataset-size claim is checked against the data the
    runs recorded, everything else is not yet run or not tested here."""
    assert report_main([str(sweep["sweep"]), "--out", str(tmp_path), "--claims-only"]) == 0
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["CLAIMS.md"]
    text = (tmp_path / "CLAIMS.md").read_text()
    rows = {c.text: line for c in CLAIMS for line in text.splitlines() if c.text in line}
    assert len(rows) == len(CLAIMS)
    same = rows["ReLU6 reached 85 %; Mish gave no improvement in accuracy."]
    last = {}
    for m in _metrics(sweep["sweep"]):
        acc = read_epochs_csv(sweep["sweep"] / m["run_dir"] / "epochs.csv")[-1]["val/acc"]
        last.setdefault(m["config"]["model"]["act"], []).append(acc)
    assert f"mish {summarize(last['mish']).fmt(100)} (n=2)" in same
    assert "**not resolved at this scale** — best arm at" in same and "[page](full/activation.md)" in same
    assert "(0/2 reached)" in rows["Mish improved training efficiency: it reaches 80 % sooner than ReLU6."]
    counts = rows["The dataset has 9,469 training and 3,925 validation images."]
    assert "200 train / 100 val images" in counts and "**does not hold**" in counts
    assert "**not yet run** — `make blurpool SCALE=full`" in rows["BlurPool decreased the model's accuracy."]
    assert "**not tested here**" in rows["About 5 % of the images are incorrectly labelled."]
    # the rules on numbers in the report's regime (each run's validation accuracy edited)
    folder = tmp_path / "multiruns" / "activation" / "full"
    shutil.copytree(sweep["sweep"], folder)
    verdicts = []
    for values in ({"mish": [0.900, 0.910], "relu6": [0.850, 0.860]},  # a 5-point gap: they differ
                   {"mish": [0.8500, 0.8502], "relu6": [0.8501, 0.8503]},  # CI within ±1 pp: the same
                   {"mish": [0.85, 0.88], "relu6": [0.86, 0.84]}):  # too noisy to tell
        _set_last_acc(folder, values)
        md = claims_markdown([build_report(load_runs(folder))])
        verdicts.append(next(line for line in md.splitlines() if "Mish gave no improvement" in line))
    assert "**does not hold** — the arms differ" in verdicts[0]
    assert "**holds** — 95 % CI" in verdicts[1]
    assert "**not resolved at this scale** — no significant difference" in verdicts[2]
    # a sweep still running: an arm without a completed run counts as missing, it is never judged
    for path in folder.glob("*/metrics.json"):
        data = json.loads(path.read_text())
        if data["config"]["model"]["act"] == "mish":
            path.write_text(json.dumps({**data, "status": "running"}))
    md = claims_markdown([build_report(load_runs(folder))])
    sooner = next(line for line in md.splitlines() if "reaches 80 % sooner" in line)
    assert "**not resolved at this scale** — an arm of this claim has no completed run" in sooner
