"""Trustworthy runs: a result is never stale, mixed, silently restarted or mislabelled.

Every test drives real ``run.py`` processes on the real mini archive and fails on the code before run
identities, run locks and truthful W&B exits existed.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from importlib import metadata
from pathlib import Path

import pytest

from imagenette_lab.callbacks import read_epochs_csv
from imagenette_lab.report import build_report
from imagenette_lab.report.runs import load_runs, parse_overrides
from imagenette_lab.report.wandb_source import load_offline_wandb_runs, wandb_records
from imagenette_lab.run_identity import (
    IDENTITY_FILE,
    LOCATION_KEYS,
    SUPERSEDED_DIR,
    RunIdentityError,
    compare,
    job_dirname,
    plan_run,
)
from tests.test_train import CLI_ENV, REPO, SMALL_HYBRID, TINY, cli_command, run_cli

BASE = [*TINY, *SMALL_HYBRID, "debug=limit", "trainer.num_sanity_val_steps=0"]


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _mini_without_one_val_image(mini_root: Path, dest: Path) -> Path:
    """A copy of the mini dataset minus one validation image (and its CSV row): other data, same layout."""
    root = dest / mini_root.name
    shutil.copytree(mini_root, root)
    (csv_path,) = root.glob("*.csv")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    victim = next(r for r in rows if r["is_valid"] == "True")
    (root / victim["path"]).unlink()
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r is not victim)
    return root


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not reached (exit {proc.poll()}):\n{log.read_text()[-3000:]}")


# ------------------------------------------------------------------------------------------ identity
@pytest.mark.slow
def test_rerun_skips_only_the_same_run_and_refuses_others_naming_the_keys(
    tmp_path: Path, mini_archive: Path, mini_root: Path
) -> None:
    run_dir = tmp_path / "run"
    args = [*BASE, "trainer.max_epochs=1", "logger=csv", f"hydra.run.dir={run_dir}"]
    archive = tmp_path / "archives" / mini_archive.name  # a copy this test may touch
    archive.parent.mkdir()
    shutil.copy2(mini_archive, archive)
    run_cli([*args, f"data.archive={archive}"], tmp_path)
    first = _metrics(run_dir)
    assert first["status"] == "completed" and len(first["attempts"]) == 1
    assert first["attempts"][0]["versions"]["torch"] == metadata.version("torch")
    identity = json.loads((run_dir / IDENTITY_FILE).read_text())
    assert identity["fingerprint"]["data"]["images"] == {"train": 200, "val": 100}
    stamp = (run_dir / "metrics.json").stat().st_mtime_ns

    # The same archive copied again or touched (as a fresh machine's shared disk does): the same bytes, so
    # its extraction is reused, and the same images, so skipped.
    os.utime(archive, ns=(time.time_ns(), time.time_ns()))
    touched = run_cli([*args, f"data.archive={archive}"], tmp_path)
    assert "already completed" in touched.stdout + touched.stderr, touched.stderr[-3000:]
    stem = mini_archive.name.split(".")[0]
    assert sum(p.is_dir() for p in (tmp_path / "data").glob(f"{stem}*")) == 1  # one extraction

    # The same data from another location (an extracted copy): same identity, so skipped.
    same = run_cli([*args, f"data.root={mini_root}"], tmp_path)
    assert "already completed" in same.stdout + same.stderr

    # Other data in the same folder (as `make train ARCHIVE=...` then `make train` did): refused, named.
    other_root = _mini_without_one_val_image(mini_root, tmp_path / "other")
    other = run_cli([*args, f"data.root={other_root}"], tmp_path, check=False)
    text = other.stdout + other.stderr
    assert other.returncode == 2, text[-3000:]
    assert "already completed" not in text and "data digest: folder has" in text and "rerun=restart" in text

    # An edited config (as after editing an experiment yaml): refused before any data is touched.
    edited = run_cli([*args, f"data.archive={mini_archive}", "optim.lr=0.01"], tmp_path, check=False)
    text = edited.stdout + edited.stderr
    assert edited.returncode == 2 and "optim.lr: folder has 0.00024, this command has 0.01" in text, text[-3000:]
    assert (run_dir / "metrics.json").stat().st_mtime_ns == stamp  # nothing of the first run was touched

    # An explicit restart trains the new config and keeps the old results aside.
    run_cli([*args, f"data.archive={mini_archive}", "optim.lr=0.01", "rerun=restart"], tmp_path)
    assert _metrics(run_dir)["config"]["optim"]["lr"] == 0.01
    (aside,) = (run_dir / SUPERSEDED_DIR).iterdir()
    assert json.loads((aside / "metrics.json").read_text())["final"] == first["final"]
    assert [r.source for r in load_runs(run_dir)] == [str(run_dir)]  # the report ignores what was set aside

    # Raising max_epochs extends the completed run (and says so); every attempt is kept.
    extended = run_cli([*args, f"data.archive={mini_archive}", "optim.lr=0.01", "trainer.max_epochs=2"], tmp_path)
    assert "raised from 1 to 2" in extended.stdout + extended.stderr
    metrics = _metrics(run_dir)
    assert metrics["status"] == "completed" and metrics["epochs_completed"] == 2
    assert [a["action"] for a in metrics["attempts"]] == ["fresh", "resume"]
    assert all(a["git_rev"] == metrics["git_rev"] and a["versions"]["timm"] for a in metrics["attempts"])

    # A folder that ran epochs but lost last.ckpt is refused, never silently restarted...
    fp = json.loads((run_dir / IDENTITY_FILE).read_text())["fingerprint"]
    metrics["status"] = "interrupted"
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "checkpoints" / "last.ckpt").rename(run_dir / "kept.ckpt")
    with pytest.raises(RunIdentityError, match=r"records 2 finished epoch.*no checkpoints/last\.ckpt"):
        plan_run(run_dir, fp, "strict")
    # ...and a damaged one is named with what to do.
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    broken = run_cli([*args, f"data.archive={mini_archive}", "optim.lr=0.01", "trainer.max_epochs=3"], tmp_path,
                     check=False)
    text = broken.stdout + broken.stderr
    assert broken.returncode == 2 and "last.ckpt cannot be loaded" in text and "rerun=restart" in text, text[-3000:]
    assert read_epochs_csv(run_dir / "epochs.csv")[-1]["epoch"] == 2  # epochs.csv not overwritten


def test_one_list_of_location_keys_for_folders_arms_and_names() -> None:
    base = ["model=hybrid", "act=mish", "seed=1"]
    noise = ["logger=csv", "data.mirror=https://user:secret@mirror.example", "trainer.enable_progress_bar=false",
             "hydra/launcher=parallel", "data.archive=/x/y.tgz", "paths.log_dir=/tmp/l", "logger.wandb.entity=team"]
    assert job_dirname(base) == job_dirname([*base, *noise]) == "act-mish+model-hybrid+seed-1"
    assert parse_overrides([*base, *noise]) == parse_overrides(base)  # the report groups them in one arm
    assert "secret" not in job_dirname([*base, *noise])
    assert {"data.mirror", "logger", "hydra", "paths", "trainer.enable_progress_bar"} <= set(LOCATION_KEYS)
    hydra_yaml = (REPO / "conf" / "hydra" / "default.yaml").read_text()
    assert "exclude_keys" not in hydra_yaml and "${job_dirname:" in hydra_yaml  # no second list
    ckpt = "/runs/hybrid/a-1/checkpoints/last.ckpt"
    evaluated = job_dirname(["mode=eval", f"ckpt_path={ckpt}", *base], mode="eval", ckpt_path=ckpt)
    assert evaluated.startswith("eval-last-") and "-of-a-1+act-mish" in evaluated and evaluated != job_dirname(base)


# ------------------------------------------------------------------------------------------ lock
@pytest.mark.slow
def test_same_command_twice_at_once_one_trains_the_other_exits_naming_the_holder(
    tmp_path: Path, mini_archive: Path
) -> None:
    go = tmp_path / "go"  # the first run waits after its first epoch until this file exists
    args = [*BASE, "trainer.max_epochs=3", "logger=csv", f"data.archive={mini_archive}",
            f"hydra.run.dir={tmp_path / 'run'}", "+callbacks.hold._target_=tests.run_hooks.WaitForFile",
            f"+callbacks.hold.path={go}"]
    log = tmp_path / "first.out"
    first = subprocess.Popen(cli_command(args, tmp_path), cwd=REPO, env=CLI_ENV, stdout=log.open("w"),
                             stderr=subprocess.STDOUT)
    holder = tmp_path / "run" / "run.lock.json"
    _wait_for(lambda: bool(read_epochs_csv(tmp_path / "run" / "epochs.csv")), first, log)
    t0 = time.time()
    second = run_cli(args, tmp_path, check=False)
    waited = time.time() - t0
    text = second.stdout + second.stderr
    assert second.returncode == 2 and f"in use by pid {first.pid}" in text and "on host" in text, text[-3000:]
    assert first.poll() is None, "the second process must not have disturbed the first"
    assert waited < 120  # it exits as soon as it sees the lock, without preparing data or training
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").stat().st_mtime < t0  # .hydra/ not rewritten
    go.touch()
    first.wait(timeout=600)
    assert first.returncode == 0, log.read_text()[-3000:]
    metrics = _metrics(tmp_path / "run")
    assert metrics["status"] == "completed" and len(metrics["attempts"]) == 1 and metrics["pid"] == first.pid
    assert [r["epoch"] for r in read_epochs_csv(tmp_path / "run" / "epochs.csv")] == [1, 2, 3]
    assert not holder.exists()  # released at the end


# ------------------------------------------------------------------------------------------ W&B
def _exit_code(run: Path) -> int | None:
    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    codes = [r.exit.exit_code for r in wandb_records(path) if r.WhichOneof("record_type") == "exit"]
    return codes[-1] if codes else None


@pytest.mark.slow
def test_wandb_tells_failed_and_interrupted_runs_apart(tmp_path: Path, mini_archive: Path) -> None:
    common = [*BASE, f"data.archive={mini_archive}", "logger=wandb", "seed=3"]
    # A job that fails on a NaN loss at its second epoch.
    failed = tmp_path / "sweep" / "failed"
    proc = run_cli([*common, "trainer.max_epochs=2", f"hydra.run.dir={failed}",
                    "+callbacks.poison._target_=tests.run_hooks.PoisonWeights"], tmp_path, check=False)
    assert proc.returncode != 0 and _metrics(failed)["status"] == "failed"
    assert _exit_code(failed) == 1

    # A job stopped by SLURM's pre-timeout signal (SIGUSR2) after its first epoch.
    stopped = tmp_path / "sweep" / "stopped"
    args = [*common, "trainer.max_epochs=3", "data.resize=64", "data.crop=56", f"hydra.run.dir={stopped}"]
    log = tmp_path / "stopped.out"
    proc = subprocess.Popen(cli_command(args, tmp_path), cwd=REPO, env=CLI_ENV, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    _wait_for(lambda: (stopped / "checkpoints" / "last.ckpt").is_file(), proc, log)
    proc.send_signal(signal.SIGUSR2)
    proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR2, log.read_text()[-3000:]
    assert _metrics(stopped)["status"] == "interrupted"
    assert _exit_code(stopped) == 128 + signal.SIGUSR2
    run_id = (stopped / "wandb_id.txt").read_text().strip()
    assert run_id == (stopped / "wandb").glob("offline-run-*").__next__().name.rsplit("-", 1)[1]
    assert run_id != (failed / "wandb_id.txt").read_text().strip()

    offline = load_offline_wandb_runs(tmp_path / "sweep")
    assert sorted(r.status for r in offline) == ["failed", "interrupted"]
    assert all(r.overrides.get("seed") == "3" for r in offline)  # overrides come from the run config
    report = build_report(offline, experiment="adhoc")
    assert sorted(r.status for r in report.problems) == ["failed", "interrupted"]
    assert "## Runs not averaged" in report.markdown and all(not arm.completed for arm in report.arms)

    # Resuming continues the same W&B run id, and the run then finishes with exit code 0.
    run_cli(args, tmp_path)
    assert (stopped / "wandb_id.txt").read_text().strip() == run_id
    assert _metrics(stopped)["status"] == "completed"
    names = {Path(p).name for p in (stopped / "wandb").glob("offline-run-*")}
    assert all(n.endswith(run_id) for n in names)
    records = [r for p in sorted((stopped / "wandb").glob("offline-run-*/run-*.wandb")) for r in wandb_records(p)]
    run_records = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_records and all("seed=3" in r.display_name for r in run_records)
    assert all(r.run_group == "adhoc/full" for r in run_records)


# ------------------------------------------------------------------------------------------ preemption
@pytest.mark.slow
def test_sigusr2_under_submitit_checkpoints_and_requeues(tmp_path: Path, mini_archive: Path) -> None:
    """SLURM's warning signal reaches a job run by submitit (local executor: the same requeue path):
    the job stops as ``interrupted``, submitit requeues it, and the requeued job resumes to the end."""
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=30", *BASE, "logger=csv",
            f"data.archive={mini_archive}", "trainer.max_epochs=3", "data.resize=64", "data.crop=56", "seed=5"]
    log = tmp_path / "sweep.out"
    proc = subprocess.Popen(cli_command(args, tmp_path), cwd=REPO, env=CLI_ENV, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    found: list[Path] = []

    def first_epoch_done() -> bool:
        found[:] = [p.parent.parent for p in (tmp_path / "logs").rglob("checkpoints/last.ckpt")]
        return bool(found) and (found[0] / "run.lock.json").is_file()

    _wait_for(first_epoch_done, proc, log)
    run = found[0]
    job_pid = json.loads((run / "run.lock.json").read_text())["pid"]
    assert job_pid != proc.pid  # the job runs in submitit's process, not the launcher's
    os.kill(job_pid, signal.SIGUSR2)
    proc.wait(timeout=600)
    assert proc.returncode == 0, log.read_text()[-3000:]
    metrics = _metrics(run)
    assert metrics["status"] == "completed" and metrics["epochs_completed"] == 3
    assert [a["action"] for a in metrics["attempts"]] == ["fresh", "resume"]
    assert metrics["attempts"][1]["from_epoch"] >= 1 and metrics["attempts"][1]["pid"] != job_pid
    assert [r["epoch"] for r in read_epochs_csv(run / "epochs.csv")] == [1, 2, 3]
    submitit_logs = "".join(p.read_text() for p in (tmp_path / "logs").rglob(".submitit/*/*_log.*"))
    assert "Caught signal SIGUSR2" in submitit_logs and "Calling checkpoint method" in submitit_logs
    assert not list(run.glob(".*.tmp"))  # no half-written file left by the signal


def test_folders_older_than_a_config_key_match_only_the_value_their_code_used() -> None:
    """A key added later (absent from an older folder's identity) is filled in as the old code behaved:
    the same run matches, a run that differs through that key is refused."""
    code = {"torch": "x"}
    old = {"config": {"model.name": "resnet34", "model.norm": "batch", "data.crop": 224}, "code": code}
    same = {"config": {**old["config"], "model.zero_init_last": False, "data.train_fraction": 1.0}, "code": code}
    assert compare(old, same, "strict") == []
    half = {"config": {**same["config"], "data.train_fraction": 0.5}, "code": code}
    assert compare(old, half, "strict") == [("data.train_fraction", 1.0, 0.5)]
    # without BatchNorm the old code always zero-initialised the last conv: the new default differs
    no_bn = {"config": {**old["config"], "model.norm": "none"}, "code": code}
    new_no_bn = {"config": {**no_bn["config"], "model.zero_init_last": False}, "code": code}
    assert compare(no_bn, new_no_bn, "strict") == [("model.zero_init_last", True, False)]
    assert compare(no_bn, {"config": {**no_bn["config"], "model.zero_init_last": True}, "code": code}, "strict") == []
    # model.width came to every model (1.0 where a model has no multiplier); a per-scale lookup table gaining a
    # scale (hybrid_width.cpu) is not part of a run's identity: the value it feeds (model.width) is
    tables = {"config": {**old["config"], "hybrid_width.full": 1.0, "hybrid_width.quick": 0.5}, "code": code}
    grown = {"config": {**same["config"], "hybrid_width.full": 1.0, "hybrid_width.quick": 0.5, "hybrid_width.cpu": 0.5,
                        "model.width": 1.0}, "code": code}
    assert compare(tables, grown, "strict") == []
    narrow = {"config": {**grown["config"], "model.width": 0.5}, "code": code}
    assert compare(tables, narrow, "strict") == [("model.width", 1.0, 0.5)]
    # compile/channels_last moved from the trainer group to the module's (which held the same values already)
    # and the clock's thresholds are not part of the identity: older folders match, a real change does not
    moved = {"config": {**old["config"], "trainer.compile": False, "trainer.channels_last": True,
                        "module.compile": False, "module.channels_last": True, "module.acc_thresholds": [0.8]},
             "code": code}
    now = {"config": {**same["config"], "module.compile": False, "module.channels_last": True}, "code": code}
    assert compare(moved, now, "strict") == []
    nchw = {"config": {**now["config"], "module.channels_last": False}, "code": code}
    assert compare(moved, nchw, "strict") == [("module.channels_last", True, False)]
