"""End-to-end training through ``run.py`` on the real mini archive."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from imagenette_lab.callbacks import read_epochs_csv
from imagenette_lab.config_checks import ConfigError, validate_config

REPO = Path(__file__).resolve().parents[1]

# Tiny, fast and real: 32 px crops of the real images, a few batches per epoch, no worker processes.
TINY = [
    "trainer=cpu",
    "data.resize=40",
    "data.crop=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.persistent_workers=false",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
SMALL_HYBRID = ["model=hybrid", "model.width=0.25", "model.rb_groups=4"]


# One intra-op thread: on 2 cores and 32 px batches a second thread only adds contention.
CLI_ENV = {
    **os.environ,
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HYDRA_FULL_ERROR": "0",
    "OMP_NUM_THREADS": "1",
}


def cli_command(args: list[str], tmp: Path) -> list[str]:
    """``python run.py`` with outputs and data cache under ``tmp`` (``-m`` first, as argparse wants)."""
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    return [
        sys.executable,
        str(REPO / "run.py"),
        *flags,
        f"paths.log_dir={tmp / 'logs'}",
        f"paths.data_dir={tmp / 'data'}",
        *overrides,
    ]


def run_cli(args: list[str], tmp: Path, *, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """Run ``run.py`` to the end; fail the test with its output unless ``check=False``."""
    proc = subprocess.run(
        cli_command(args, tmp), cwd=REPO, env=CLI_ENV, capture_output=True, text=True, timeout=900, **popen
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"run.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=False)


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("metrics.json"))


def wandb_model_config(run: Path) -> dict:
    """The model config recorded in the run's offline W&B file (a protobuf stream holding JSON values)."""
    (record,) = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    found = re.search(rb'\{"_target_":"imagenette_lab\.models\.create_model"[^}]*\}', record.read_bytes())
    assert found, f"no model config in {record}"
    return json.loads(found.group(0))


def assert_complete_run(run: Path, epochs: int) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed", metrics.get("error")
    assert metrics["epochs_completed"] == epochs
    assert 0.0 <= metrics["final"]["val/acc"] <= 1.0
    assert metrics["params"] > 1000
    assert len(metrics["per_class_acc"]) == 10 and "tench" in metrics["per_class_acc"]
    assert set(metrics["time_to_acc"]) == {"0.80", "0.85", "0.90"}
    assert metrics["throughput"]["train_images_per_s"] > 0
    assert len(metrics["confusion_matrix"]) == 10
    assert metrics["git_rev"] is None or len(metrics["git_rev"]) == 40
    rows = read_epochs_csv(run / "epochs.csv")
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    assert all(r["val/acc"] == r["val/acc"] and r["train/loss"] > 0 for r in rows)  # no NaN, real values
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert any(p.name.startswith("best-") for p in (run / "checkpoints").iterdir())
    assert (run / ".hydra" / "config.yaml").is_file()
    return metrics


@pytest.mark.slow
def test_single_run_leaves_a_complete_folder(tmp_path: Path, mini_archive: Path) -> None:
    run_cli([*TINY, *SMALL_HYBRID, f"data.archive={mini_archive}", "debug=limit"], tmp_path)
    (run,) = run_dirs(tmp_path / "logs")
    metrics = assert_complete_run(run, epochs=2)
    assert metrics["model"] == "hybrid"
    assert metrics["config"]["model"]["width"] == 0.25
    assert list((run / "csv").rglob("metrics.csv")), "Lightning CSV log missing"
    assert list((run / "wandb").glob("offline-run-*")), "W&B offline run missing"


@pytest.mark.slow
def test_design_card_multirun(tmp_path: Path, mini_archive: Path) -> None:
    """``-m model=hybrid,resnet50 act=mish,relu6`` gives 4 complete jobs, each with its swept values in W&B."""
    sweep = ["-m", "model=hybrid,resnet50", "act=mish,relu6", *TINY, f"data.archive={mini_archive}", "debug=limit",
             "trainer.max_epochs=1"]
    run_cli(sweep, tmp_path)
    runs = run_dirs(tmp_path / "logs")
    assert len(runs) == 4
    seen = set()
    for run in runs:
        metrics = assert_complete_run(run, epochs=1)
        cfg = metrics["config"]["model"]
        seen.add((cfg["name"], cfg["act"]))
        logged = wandb_model_config(run)
        assert (logged["name"], logged["act"]) == (cfg["name"], cfg["act"])
    assert seen == {("hybrid", "mish"), ("hybrid", "relu6"), ("resnet50", "mish"), ("resnet50", "relu6")}
    # Same command again: every job is complete, so each one is skipped and nothing is rewritten.
    before = {r: (r / "metrics.json").stat().st_mtime_ns for r in runs}
    out = run_cli(sweep, tmp_path)
    assert "already completed" in out.stdout + out.stderr
    assert before == {r: (r / "metrics.json").stat().st_mtime_ns for r in runs}


@pytest.mark.slow
def test_learning_is_real(tmp_path: Path, mini_archive: Path) -> None:
    """Overfit two real batches: training loss must fall and accuracy rise."""
    run_cli(
        [
            *TINY,
            *SMALL_HYBRID,
            f"data.archive={mini_archive}",
            "debug=overfit",
            "trainer.max_epochs=10",
            "optim.lr=0.003",
            "logger=csv",
            "sched=constant",
        ],
        tmp_path,
    )
    (run,) = run_dirs(tmp_path / "logs")
    rows = read_epochs_csv(run / "epochs.csv")
    first, last = rows[0], rows[-1]
    assert last["train/loss"] < 0.5 * first["train/loss"], (first, last)
    assert last["train/acc"] >= first["train/acc"] + 0.4, (first, last)


def test_validation_errors_name_the_key(tmp_path: Path) -> None:
    cases = {
        "optim.lr=0": "optim.lr",
        "data.batch_size=0": "data.batch_size",
        "trainer.max_epochs=0": "trainer.max_epochs",
        "trainer.precision=16-mixed": "trainer.precision",
        "trainer.sync_batchnorm=true": "trainer.sync_batchnorm",
        "rerun=always": "rerun",
        "seed=-1": "seed",
    }
    for override, key in cases.items():
        cfg = compose_cfg(["trainer=cpu", override])
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_config(cfg)
    validate_config(compose_cfg(["trainer=cpu"]))  # the defaults are valid


def test_struct_mode_rejects_typos() -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="widht"):
        compose_cfg(["model.widht=2"])
    with pytest.raises(ConfigCompositionException, match="resnet51"):
        compose_cfg(["model=resnet51"])
    with pytest.raises(ConfigCompositionException, match="mishh"):
        compose_cfg(["act=mishh"])


def test_act_group_sets_model_activation() -> None:
    assert compose_cfg(["model=resnet50", "act=mish"]).model.act == "mish"
    assert compose_cfg(["model=hybrid"]).model.act == "mish"  # the report's hybrid default
    cfg = compose_cfg([])
    assert cfg.optim.lr == pytest.approx(0.00024) and cfg.optim.weight_decay == pytest.approx(1e-5)
    assert cfg.data.batch_size == 32 and cfg.sched.scheduler.T_max == 10


def test_cli_error_before_data_is_touched(tmp_path: Path) -> None:
    out = run_cli(["optim.lr=-1"], tmp_path, check=False)
    assert out.returncode != 0
    assert "optim.lr=-1" in out.stderr + out.stdout
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_eval_refuses_checkpoint_of_another_model(tmp_path: Path, mini_archive: Path) -> None:
    run_cli(
        [
            *TINY,
            *SMALL_HYBRID,
            f"data.archive={mini_archive}",
            "debug=limit",
            "trainer.max_epochs=1",
            "logger=csv",
        ],
        tmp_path,
    )
    (run,) = run_dirs(tmp_path / "logs")
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["signature"]
    bad = run_cli(
        [
            *TINY,
            "model=resnet34",
            "mode=eval",
            f"ckpt_path={ckpt}",
            f"data.archive={mini_archive}",
            "logger=csv",
        ],
        tmp_path,
        check=False,
    )
    assert bad.returncode != 0
    assert "does not match" in bad.stderr + bad.stdout and "model.name" in bad.stderr + bad.stdout
    run_cli(
        [
            *TINY,
            *SMALL_HYBRID,
            "mode=eval",
            f"ckpt_path={ckpt}",
            f"data.archive={mini_archive}",
            "logger=csv",
        ],
        tmp_path,
    )
    (evaluated,) = [r for r in run_dirs(tmp_path / "logs") if r != run]
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["mode"] == "eval" and metrics["status"] == "completed"
    assert evaluated.name.startswith("eval-last-") and run.name[:30] in evaluated.name  # named after the ckpt
    assert (
        json.loads((run / "metrics.json").read_text())["mode"] == "train"
    )  # the training folder is untouched


def test_config_tree_groups() -> None:
    conf = REPO / "conf"
    stems = {
        g: {p.stem for p in (conf / g).glob("*.yaml")} for g in ("act", "optim", "sched", "trainer", "logger")
    }
    assert stems["act"] == {"relu", "relu6", "mish", "silu", "gelu"}
    assert stems["optim"] == {"adam", "sgd", "adamw"}
    assert {"cosine", "constant", "onecycle", "cosine_full"} <= stems["sched"]
    assert {"default", "cpu", "gpu", "ddp"} <= stems["trainer"]
    assert {"csv", "wandb", "both"} <= stems["logger"]
    for name in ("sgd", "adamw"):
        assert compose_cfg([f"optim={name}"]).optim._target_.startswith("torch.optim.")
    # the one-cycle schedule as the module builds it: warm-up to optim.lr, then anneal far below it
    cfg = compose_cfg(["sched=onecycle", "optim.lr=0.01"])
    optimizer = instantiate(cfg.optim)(params=[torch.nn.Parameter(torch.zeros(1))])
    scheduler = instantiate(cfg.sched.scheduler)(optimizer=optimizer, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = max(range(100), key=lrs.__getitem__)
    assert lrs[0] == pytest.approx(0.01 / 25) and lrs[peak] == pytest.approx(0.01) and 20 <= peak <= 30
    assert lrs[-1] < 1e-5 and cfg.sched.interval == "step"


@pytest.mark.slow
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path: Path, mini_archive: Path) -> None:
    """``seed`` + ``trainer.deterministic`` make a run repeatable: same seed, same losses to the last bit."""
    common = [
        *TINY,
        *SMALL_HYBRID,
        f"data.archive={mini_archive}",
        "debug=limit",
        "trainer.max_epochs=1",
        "logger=none",
        "trainer.deterministic=true",
    ]
    losses = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        run_cli([*common, f"seed={seed}", f"hydra.run.dir={tmp_path / name}"], tmp_path)
        (row,) = read_epochs_csv(tmp_path / name / "epochs.csv")
        losses[name] = (row["train/loss"], row["val/loss"])
    assert losses["a"] == losses["b"]
    assert losses["a"] != losses["c"]
