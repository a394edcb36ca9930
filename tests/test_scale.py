"""Scale out and hold up: DDP on CPU, parallel/SLURM launchers, failures and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imagenette_lab.callbacks import read_epochs_csv
from tests.test_train import CLI_ENV, REPO, SMALL_HYBRID, TINY, run_cli, run_dirs


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_single_process(tmp_path: Path, mini_archive: Path) -> None:
    """gloo DDP over 2 processes: trains, logs once, and its (synced) validation metrics of a checkpoint
    equal a single-process evaluation of the same checkpoint on the same 100 real images."""
    data = [f"data.archive={mini_archive}", "logger=csv"]
    run_cli(
        [
            *TINY,
            *SMALL_HYBRID,
            *data,
            "debug=limit",
            "trainer.max_epochs=1",
            "hydra.run.dir=" + str(tmp_path / "train"),
        ],
        tmp_path,
    )
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    evals = {}
    for name, extra in {
        "single": [],
        "ddp": ["trainer.strategy=ddp", "trainer.devices=2", "data.batch_size=4"],
    }.items():
        out = tmp_path / f"eval_{name}"
        run_cli(
            [*TINY, *SMALL_HYBRID, *data, "mode=eval", f"ckpt_path={ckpt}", f"hydra.run.dir={out}", *extra],
            tmp_path,
        )
        evals[name] = _metrics(out)
    single, ddp = evals["single"], evals["ddp"]
    assert ddp["final"]["val/acc"] == pytest.approx(single["final"]["val/acc"], abs=1e-6)
    assert ddp["final"]["val/loss"] == pytest.approx(single["final"]["val/loss"], rel=1e-4)
    for cls, acc in single["per_class_acc"].items():
        assert ddp["per_class_acc"][cls] == pytest.approx(acc, abs=1e-6)
    assert sum(map(sum, ddp["confusion_matrix"])) == 100  # every val image counted once across ranks

    # DDP training: one folder, one epochs.csv, completed.
    out = tmp_path / "ddp_train"
    run_cli(
        [
            *TINY,
            *SMALL_HYBRID,
            *data,
            "debug=limit",
            "trainer.max_epochs=1",
            "trainer.strategy=ddp",
            "trainer.devices=2",
            f"hydra.run.dir={out}",
        ],
        tmp_path,
    )
    assert _metrics(out)["status"] == "completed"
    assert [r["epoch"] for r in read_epochs_csv(out / "epochs.csv")] == [1]


def _hydra_cfg(args: list[str]) -> str:
    out = subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args, "--cfg", "hydra"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_slurm_and_parallel_presets_compose() -> None:
    slurm = _hydra_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=lab"])
    assert "SlurmLauncher" in slurm and "partition: gpu" in slurm and "account: lab" in slurm
    assert "max_num_timeout: 3" in slurm
    par = _hydra_cfg(["hydra/launcher=parallel", "hydra.launcher.n_jobs=3"])
    assert "JoblibLauncher" in par and "n_jobs: 3" in par


@pytest.mark.slow
def test_sweep_through_submitit_local_executor(tmp_path: Path, mini_archive: Path) -> None:
    run_cli(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",
            "seed=1,2",
            *TINY,
            *SMALL_HYBRID,
            f"data.archive={mini_archive}",
            "debug=limit",
            "trainer.max_epochs=1",
            "logger=csv",
        ],
        tmp_path,
    )
    runs = run_dirs(tmp_path / "logs")
    assert len(runs) == 2
    assert {_metrics(r)["seed"] for r in runs} == {1, 2}
    assert all(_metrics(r)["status"] == "completed" for r in runs)


@pytest.mark.slow
def test_nan_loss_fails_clearly_and_keeps_last_good_checkpoint(tmp_path: Path, mini_archive: Path) -> None:
    out = tmp_path / "nan"
    # Epoch 2 starts with NaN weights (a test-only callback), so its first training loss is NaN.
    args = [
        *TINY,
        *SMALL_HYBRID,
        f"data.archive={mini_archive}",
        "debug=limit",
        "logger=csv",
        f"hydra.run.dir={out}",
        "trainer.max_epochs=2",
        "+callbacks.poison._target_=tests.run_hooks.PoisonWeights",
        "+callbacks.poison.epoch=1",
    ]
    proc = run_cli(args, tmp_path, check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "training loss is" in text and "lower optim.lr" in text
    metrics = _metrics(out)
    assert metrics["status"] == "failed" and "FloatingPointError" in metrics["error"]
    kept = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (best,) = (out / "checkpoints").glob("best-epoch000-*.ckpt")  # written at the end of the good epoch 1
    good = torch.load(best, map_location="cpu", weights_only=True)
    assert kept["epoch"] == good["epoch"] == 0
    assert all(torch.equal(kept["state_dict"][k], v) for k, v in good["state_dict"].items())
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


def test_bad_input_fails_fast_with_a_clear_message(tmp_path: Path, mini_archive: Path) -> None:
    """Incompatible flags and an unwritable output folder stop the run before any data is touched."""
    cases = {
        "width on resnet50": (
            ["model=resnet50", "model.width=0.5"],
            "'width' is not supported by 'resnet50'",
        ),
        "bad label noise": (["data.label_noise=7"], "data.label_noise=7"),
    }
    for name, (args, message) in cases.items():
        out = run_cli([*args, f"data.archive={mini_archive}"], tmp_path, check=False)
        assert out.returncode != 0, name
        assert message in out.stdout + out.stderr, (name, out.stderr[-2000:])
    assert not (tmp_path / "data").exists()  # nothing was extracted or cached

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = subprocess.run(
        [sys.executable, str(REPO / "run.py"), f"paths.log_dir={blocker / 'logs'}"],
        cwd=REPO,
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert f"output folder paths.log_dir={blocker / 'logs'} is not writable" in proc.stderr
    assert blocker.read_text() == "not a folder"
