"""The report's experiments: every ``conf/experiment/*.yaml`` composes at both scales into valid
jobs, runs through ``run.py -m`` on the real mini archive, and its artefact renders from that tiny sweep."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from imagenette_lab.callbacks import read_epochs_csv
from imagenette_lab.config_checks import validate_config
from imagenette_lab.report import EXPERIMENTS, catalogue, expand_sweep, load_runs, make_arms, render
from imagenette_lab.report.build import published_for
from imagenette_lab.report.catalogue import no_cpu_form, sweep_at
from imagenette_lab.report.claims import CLAIMS
from imagenette_lab.report.runs import arm_key, natural_key
from imagenette_lab.report.sweep import main as sweep_main
from imagenette_lab.resolvers import register as register_resolvers
from imagenette_lab.run_identity import flatten
from tests.test_train import REPO, run_cli

register_resolvers()  # run.py does this before Hydra composes: optim=sgd's linear scaling reads batch_scaled_lr

EXPERIMENT_DIR = REPO / "conf" / "experiment"
PRESETS = {"cpu_train"}  # conf/experiment files that are presets, not report reproductions
# experiment -> number of arms (seeds apart) of its sweep at (full, quick) scale
ARMS = {
    "architectures": 6,
    "table1": 3,
    "dropout": 12,
    "lr_schedule": 2,
    "activation": 2,
    "blurpool": 2,
    "resize": 8,
    "batch_size": 4,
    "optimizer": 3,
    "label_noise": 3,
    "dataset_size": 4,
    "normalize": 2,
}


def compose_job(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def sweep_jobs(name: str, scale: str) -> list[dict[str, str]]:
    cfg = compose_job([f"experiment={name}", f"scale={scale}"])
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    return expand_sweep(params, [f"experiment={name}", f"scale={scale}"])


def test_every_report_experiment_has_a_config_and_a_report_spec() -> None:
    configs = {p.stem for p in EXPERIMENT_DIR.glob("*.yaml")} - PRESETS
    assert configs == set(EXPERIMENTS), "conf/experiment/*.yaml and imagenette_lab.report.EXPERIMENTS differ"


def test_experiments_name_their_sweep_folder() -> None:
    """Sweeps land in logs/multiruns/<experiment>/<scale>. Needs ``_self_`` listed before ``experiment`` in
    conf/config.yaml's defaults: otherwise the root config's own values (``experiment_name: adhoc``,
    ``callbacks.clock.acc_thresholds``) override the experiment's."""
    for name in EXPERIMENTS:
        cfg = compose_job([f"experiment={name}"])
        assert cfg.experiment_name == name, (
            f"experiment={name} composes experiment_name={cfg.experiment_name!r}: move `- _self_` above "
            "`- experiment: null` in conf/config.yaml's defaults"
        )


NO_CPU_FORM = {n for n in EXPERIMENTS if no_cpu_form(n)}  # the files' `# no-cpu-form:` lines


@pytest.mark.parametrize(
    ("name", "scale"),
    [(n, s) for n in sorted(ARMS) for s in ("full", "cpu", "quick") if not (s == "cpu" and n in NO_CPU_FORM)],
)
def test_every_arm_composes_into_a_valid_job(name: str, scale: str) -> None:
    jobs = sweep_jobs(name, scale)
    assert {j["seed"] for j in jobs} == {"1", "2", "3"}, "three seeds by default"
    arms = {tuple((k, v) for k, v in sorted(j.items()) if k != "seed") for j in jobs}
    assert len(arms) == ARMS[name] and len(jobs) == 3 * ARMS[name]
    for arm in arms:
        cfg = compose_job([f"{k}={v}" for k, v in arm] + ["seed=1"])
        validate_config(cfg)
        assert isinstance(cfg.data.crop, int) and 0 < cfg.data.crop <= cfg.data.resize, (arm, cfg.data.crop)
        assert cfg.scale_name == scale
        if name != "resize":  # the scale's own input size and length
            want = {"quick": (40, 32, 4), "cpu": (96, 84, 15), "full": (280, 224, 30)}[scale]
            assert (cfg.data.resize, cfg.data.crop, cfg.trainer.max_epochs) == want
        if scale == "cpu":  # every cpu form runs the stand-in, progressively resized
            assert (cfg.model.name, cfg.model.width, cfg.data.progressive.start) == ("resnet18", 0.5, 56)
        if (
            cfg.model.name == "hybrid"
        ):  # single-model ablations narrow the hybrid for the CPU; the rest do not
            narrow = scale == "quick" and name not in ("architectures", "table1")
            assert cfg.model.width == (0.5 if narrow else 1.0)


def _arm_values(name: str, scale: str, key: str) -> list[str]:
    return sorted({j[key] for j in sweep_jobs(name, scale)}, key=natural_key)


def test_sweeps_match_the_report() -> None:
    assert set(_arm_values("architectures", "full", "model")) == {
        "googlenet",
        "mobilenetv2",
        "resnet34",
        "resnet50",
        "resnet50d",
        "hybrid",
    }
    assert _arm_values("resize", "full", "data.resize") == [
        "150",
        "200",
        "250",
        "280",
        "300",
        "350",
        "400",
        "450",
    ]
    assert _arm_values("batch_size", "full", "data.batch_size") == ["32", "64", "96", "128"]
    assert _arm_values("label_noise", "full", "data.label_noise") == ["0", "5", "50"]
    # The crop is scaled with the resize: 0.8 x resize, the report's 224/280, at both scales.
    for scale, base in (("full", 280), ("quick", 40)):
        for value in _arm_values("resize", scale, "data.resize"):
            cfg = compose_job(["experiment=resize", f"scale={scale}", f"data.resize={value}"])
            assert cfg.data.crop == round(0.8 * int(value))
        assert compose_job(["experiment=resize", f"scale={scale}", f"data.resize={base}"]).data.crop == round(
            0.8 * base
        )
    # lr_schedule: ResNet50 at a constant 0.001 vs cosine; the quick form anneals over its whole run.
    assert _arm_values("lr_schedule", "full", "model") == _arm_values("lr_schedule", "quick", "model") == ["resnet50"]
    cfg = compose_job(["experiment=lr_schedule", "model=resnet50"])
    assert cfg.model.name == "resnet50" and cfg.model.width == 1.0 and cfg.optim.lr == pytest.approx(0.001)
    assert _arm_values("lr_schedule", "full", "sched") == ["constant", "cosine"]
    assert _arm_values("lr_schedule", "quick", "sched") == ["constant", "cosine_full"]
    cosine = compose_job(["experiment=lr_schedule", "sched=cosine"])
    assert cosine.sched.scheduler.T_max == 10
    # dropout: one probability for blocks and head, with and without BatchNorm.
    cfg = compose_job(["experiment=dropout", "model.block_drop_rate=0.2", "model.norm=none"])
    assert (
        cfg.model.drop_rate == pytest.approx(0.2) and cfg.model.norm == "none" and cfg.model.name == "hybrid"
    )
    # activation: relu6 vs mish on the hybrid, time to low accuracies recorded for the quick scale.
    assert [compose_job(["experiment=activation", f"act={a}"]).model.act for a in ("relu6", "mish")] == [
        "relu6",
        "mish",
    ]
    thresholds = list(compose_job(["experiment=activation"]).callbacks.clock.acc_thresholds)
    assert thresholds == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9], (
        "see test_experiments_name_their_sweep_folder"
    )
    assert compose_job(["experiment=optimizer", "optim=adam"]).optim.lr == pytest.approx(0.00024)
    assert _arm_values("dataset_size", "full", "data.train_fraction") == ["0.25", "0.5", "0.75", "1.0"]
    assert _arm_values("normalize", "full", "data.normalize") == ["dataset", "imagenet"]


def _arm_cfg(name: str, arm: str, *extra: str) -> DictConfig:
    return compose_job([f"experiment={name}", f"{arm_key(name)}={arm}", *extra])


def test_two_setting_arms_compose_as_the_report_needs() -> None:
    """Arms that change two things at once (conf/experiment/arm/<experiment>/): Table 1's second ResNet50 is
    Section IV.4's lr 0.001 with cosine; SGD at He et al.'s 0.1 unscaled and linearly scaled to the batch;
    the no-BN dropout arms with and without the zero-init fix."""
    assert _arm_values("table1", "full", arm_key("table1")) == ["hybrid", "resnet50", "resnet50_lr1e-3"]
    got = {a: _arm_cfg("table1", a) for a in ("hybrid", "resnet50", "resnet50_lr1e-3")}
    assert [(c.model.name, c.optim.lr) for c in got.values()] == [
        ("hybrid", pytest.approx(0.00024)), ("resnet50", pytest.approx(0.00024)), ("resnet50", pytest.approx(0.001)),
    ]
    assert {c.sched.scheduler.T_max for c in got.values()} == {10} and got["hybrid"].model.width == 1.0
    # SGD: He et al.'s 0.1 at batch 256; sgd_linear scales it by batch / 256 at every scale and batch
    assert _arm_values("optimizer", "full", arm_key("optimizer")) == ["adam", "sgd", "sgd_linear"]
    assert _arm_cfg("optimizer", "adam").optim._target_ == "torch.optim.Adam"
    sgd = _arm_cfg("optimizer", "sgd")
    assert sgd.optim._target_ == "torch.optim.SGD" and sgd.optim.lr == pytest.approx(0.1)
    for extra, batch in (([], 32), (["scale=quick"], 64), (["data.batch_size=128"], 128)):
        linear = _arm_cfg("optimizer", "sgd_linear", *extra)
        assert linear.data.batch_size == batch and linear.optim.lr == pytest.approx(0.1 * batch / 256)
        assert linear.optim.momentum == pytest.approx(0.9) and linear.optim._target_ == "torch.optim.SGD"
    # optim=sgd scales when asked, outside the experiment too
    asked = compose_job(["optim=sgd", 'optim.lr="${batch_scaled_lr:0.1,256,${data.batch_size}}"', "data.batch_size=64"])
    assert asked.optim.lr == pytest.approx(0.025)
    # dropout without BN: the report's init, and the zero-init fix as its own arm
    assert _arm_values("dropout", "full", arm_key("dropout")) == ["batch", "none", "none_zero_init"]
    for arm, norm, zero in (("batch", "batch", False), ("none", "none", False), ("none_zero_init", "none", True)):
        cfg = _arm_cfg("dropout", arm, "model.width=0.25", "model.rb_groups=4")
        assert (cfg.model.norm, cfg.model.zero_init_last) == (norm, zero)
        net = instantiate(cfg.model)
        zeroed = sum(isinstance(m, torch.nn.Conv2d) and not m.weight.any() for m in net.modules())
        assert zeroed == (34 if zero else 0)  # both passes' projections of the hybrid's 17 blocks


def test_unlisted_resize_fails_with_a_fix() -> None:
    cfg = compose_job(["experiment=resize", "data.resize=123"])
    with pytest.raises(
        InstantiationException, match=r"data\.crop=.*add it to crop_of in conf/experiment/resize\.yaml"
    ):
        instantiate(cfg.data)


# ------------------------------------------------------------------------------------------ real runs
SMALL_HYBRID = {"model.width": "0.25", "model.rb_groups": "4"}
# Per experiment: what the tiny test sweep changes, and how many arms that leaves. Wide sweeps are cut to a few arms (each arm composes
# above); models that the experiment sweeps keep their real size (no width key on ResNets).
TEST_SWEEP: dict[str, dict[str, str]] = {
    "architectures": {"model": "googlenet,resnet50"},  # the full-size hybrid runs in table1
    "table1": {},
    "dropout": {**SMALL_HYBRID, "model.block_drop_rate": "0,0.5"},
    "lr_schedule": {},
    "activation": SMALL_HYBRID,
    "blurpool": SMALL_HYBRID,
    "resize": {**SMALL_HYBRID, "scale": "quick", "data.resize": "21,40"},  # crop from the experiment's table
    "batch_size": {**SMALL_HYBRID, "data.batch_size": "8,16"},
    "optimizer": SMALL_HYBRID,
    "label_noise": {**SMALL_HYBRID, "data.label_noise": "0,50"},
    "dataset_size": {**SMALL_HYBRID, "data.train_fraction": "0.5,1.0"},
    "normalize": SMALL_HYBRID,
}
TEST_ARMS = {"dropout": 6, "table1": 3, "optimizer": 3}  # others: 2
TINY_RUN = {
    "trainer": "cpu",
    "data.resize": "40",
    "data.crop": "32",
    "data.batch_size": "8",
    "data.num_workers": "0",
    "data.persistent_workers": "false",
    "trainer.enable_progress_bar": "false",
    "trainer.enable_model_summary": "false",
    "debug": "limit",
    "trainer.max_epochs": "1",
    "logger": "csv",
    "seed": "1",
    # no checkpoints: the full-size hybrid's would be ~0.5 GB per save
    "~callbacks.model_checkpoint": None,
    "~callbacks.last_checkpoint": None,
    "+trainer.enable_checkpointing": "false",
}


@pytest.fixture(scope="module")
def tiny_sweeps(tmp_path_factory: pytest.TempPathFactory, mini_archive: Path) -> tuple[Path, Path, dict]:
    """Every experiment run once (one seed, 1 short epoch) through ``run.py -m`` into one log folder, then
    every artefact rendered with ``render``. Returns (log dir, results dir, {experiment: run.py output})."""
    tmp = tmp_path_factory.mktemp("experiments")
    outputs = {}
    for name, extra in TEST_SWEEP.items():
        over = {**TINY_RUN, **extra}
        if name == "resize":
            over.pop("data.crop")
        args = ["-m", f"experiment={name}", f"data.archive={mini_archive}"]
        args += [k if v is None else f"{k}={v}" for k, v in over.items()]
        proc = run_cli(args, tmp, check=False)
        outputs[name] = (proc.returncode, proc.stdout[-2000:] + proc.stderr[-4000:])
    results = tmp / "results"
    render([tmp / "logs" / "multiruns"], results, claims=True)
    return tmp / "logs", results, outputs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TEST_SWEEP))
def test_experiment_runs_and_renders(name: str, tiny_sweeps: tuple[Path, Path, dict]) -> None:
    logs, results, outputs = tiny_sweeps
    rc, out = outputs[name]
    assert rc == 0, f"run.py -m experiment={name} failed:\n{out}"
    runs = [r for r in load_runs(logs / "multiruns") if r.experiment == name]
    scale = "quick" if name == "resize" else "full"
    n_arms = TEST_ARMS.get(name, 2)
    assert len(runs) == n_arms and all(r.completed and r.scale == scale for r in runs), [
        (r.source, r.status, r.error) for r in runs
    ]
    arms = make_arms(runs, EXPERIMENTS[name].order)
    assert len(arms) == n_arms

    page = (results / scale / f"{name}.md").read_text()
    spec = EXPERIMENTS[name]
    assert page.startswith(f"# {spec.title} — {scale} scale")
    assert spec.claim in page
    table = page.split("## Accuracy", 1)[1].split("\n\n")[1].splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [row[0] for row in rows] == [a.label for a in arms]
    for row, arm in zip(rows, arms, strict=True):
        cell = dict(zip(header, row, strict=True))
        assert cell["n"] == "1"
        # one seed: the value itself (no ± std), equal to the run's metrics.json (best) and epochs.csv (last)
        run = arm.completed[0]
        assert float(cell["val acc, best epoch (%)"]) == pytest.approx(100 * run.final("val/acc"), abs=0.051)
        last = read_epochs_csv(Path(run.source) / "epochs.csv")[-1]["val/acc"]
        assert float(cell["val acc, last epoch (%)"]) == pytest.approx(100 * last, abs=0.051)
        pub = published_for(arm, spec)
        if pub is not None:  # the report's number beside ours
            assert cell["report (%)"] == pub.fmt()
    assert "needs at least 2 seeds per arm" in page  # one seed: reported, not tested
    # where the numbers come from and where the page departs from the report; no machine path anywhere
    assert "- **Data:** archive `imagenette2-224-mini.tgz` → folder `imagenette2-224-mini`, 200 train / 100 val" in page
    assert "## Where this departs from the report" in page and "the full scale's 30 epochs are our assumption" in page
    assert str(logs.parent) not in page and str(REPO) not in page
    for kind in spec.figures:
        png = results / scale / f"{name}_{kind}.png"
        assert png.is_file() and png.stat().st_size > 10_000, png
        assert f"]({name}_{kind}.png)" in page
    if name == "table1":
        assert "## Per-class accuracy (Table 1)" in page and "| tench |" in page and "| 93.5 |" in page
        assert "resnet50_lr1e-3: report (%)" in page and "Section IV.4" in page
    if name == "optimizer":  # the linearly scaled SGD arm ran at 0.1 x 8 / 256
        assert sorted(r.config("optim.lr") for r in runs) == pytest.approx([0.00024, 0.1 * 8 / 256, 0.1])
        assert "| sgd_linear | 0.003125 | 8 |" in page
    if name == "dropout":
        assert {(r.config("model.norm"), r.config("model.zero_init_last")) for r in runs} == {
            ("batch", False), ("none", False), ("none", True)}
        assert "arm=none_zero_init" in page and "block_drop_rate=0.5" in page and "zero-initializes the last conv" in page
    if name == "label_noise":
        assert "**What this tests.**" in page and "replaced on purpose" in page
    if name == "dataset_size":
        assert sorted(r.config("data.train_fraction") for r in runs) == [0.5, 1.0]
    if name == "normalize":
        assert sorted(r.config("data.normalize") for r in runs) == ["dataset", "imagenet"]
    if name == "activation":
        assert "## Time to accuracy" in page and "epochs to 80%" in page
    if name == "batch_size":
        assert "epoch of lowest val loss" in page
    if name == "resize":  # quick-scale caveat and the two swept sizes with their own crops
        assert "quick scale — what it can and cannot say" in page
        assert sorted(r.config("data.crop") for r in runs) == [17, 32]
    if name in ("table1", "architectures", "lr_schedule", "activation"):
        assert "report (%)" in header


@pytest.mark.slow
def test_claims_cover_every_experiment(tiny_sweeps: tuple[Path, Path, dict]) -> None:
    """CLAIMS.md, rendered from the same tiny sweeps: one row per claim, a verdict per scale run, the page
    linked; claims of experiments that ran are judged (one seed: not resolved), the others are not yet run."""
    _, results, _ = tiny_sweeps
    text = (results / "CLAIMS.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(CLAIMS)
    header = next(line for line in text.splitlines() if line.startswith("| # |"))
    assert "verdict, full" in header and "verdict, quick" in header  # resize ran at the quick scale
    full = {name for name in TEST_SWEEP if name != "resize"}
    for claim, row in zip(CLAIMS, rows, strict=True):
        assert claim.text in row
        if claim.experiment in full:
            assert f"[page](full/{claim.experiment}.md)" in row
            assert f"**not yet run** — `make {claim.experiment} SCALE=full`" not in row
        if claim.experiment == "resize":
            assert "**not yet run** — `make resize SCALE=full`" in row and "[page](quick/resize.md)" in row
        if claim.experiment is None:
            assert row.count("**not tested here**") == 2
    counts = next(r for c, r in zip(CLAIMS, rows, strict=True) if c.experiment == "any")
    assert "200 train / 100 val images" in counts and "**does not hold**" in counts  # the mini archive


def test_make_targets_and_help_come_from_the_experiment_files() -> None:
    """`make <experiment>` and its `make help` line are generated from conf/experiment/*.yaml (each file's
    `# make-help:` line): the targets are exactly the report's experiments, each with its own help."""
    out = subprocess.run(["make", "-s", "--no-print-directory", "experiments-help"], cwd=REPO, text=True,
                         capture_output=True, check=True).stdout
    lines = dict(re.sub(r"\x1b\[[0-9;]*m", "", line).strip().split(maxsplit=1) for line in out.splitlines())
    assert set(lines) == set(EXPERIMENTS) and all(len(text) > 20 for text in lines.values())
    for name in ("activation", "table1"):
        cmd = subprocess.run(["make", "-n", "--no-print-directory", name, "SCALE=quick", "SEEDS=1"], cwd=REPO,
                             text=True, capture_output=True, check=True).stdout
        assert f"-m imagenette_lab.report.sweep {name} --scale quick --seeds 1" in cmd


def test_experiments_without_a_cpu_form_say_why_and_make_refuses_them(capsys: pytest.CaptureFixture) -> None:
    """An experiment whose sweep does not compose at scale=cpu must carry a `# no-cpu-form:` line, and
    `make <it> SCALE=cpu` stops before any run with that reason."""
    assert "resize" in NO_CPU_FORM and "activation" not in NO_CPU_FORM
    for name in EXPERIMENTS:
        assert sweep_at(name, "cpu") is not None or no_cpu_form(name), f"{name}: no cpu sweep and no reason"
    assert sweep_main(["architectures", "--scale", "cpu", "--no-render"]) == 2
    err = capsys.readouterr().err
    assert "architectures has no cpu form" in err and "SCALE=quick" in err


def test_readme_experiments_table_is_generated_from_the_experiment_files() -> None:
    """README.md's experiments table is `make readme`'s output: an edited experiment file without
    `make readme` fails here."""
    text = (REPO / "README.md").read_text()
    block = text.split(catalogue.BEGIN, 1)[1].split(catalogue.END, 1)[0].strip()
    table = catalogue.experiment_table()
    assert block == table, "README.md's experiments table is stale: run `make readme`"
    assert all(f"`make {name}`" in table for name in EXPERIMENTS)
    assert "| `make resize` |" in table and table.split("| `make resize` |")[1].split("\n")[0].endswith("| full, quick |")


def test_cpu_preset_runs_unchanged_on_imagewoof() -> None:
    """Issue 12, item 5: nothing of the CPU recipe is tied to ImageNette. `data=imagewoof` under
    `experiment=cpu_train` changes the dataset key only (classes, CSV and URLs follow from it); every
    recipe value (model, optimizer, schedule, sizes, progressive resizing, epochs) is the same job."""
    jobs = {}
    for data in ("imagenette", "imagewoof"):
        cfg = compose_job(["experiment=cpu_train", f"data={data}", "data.archive=some.tgz"])
        validate_config(cfg)
        cfg = OmegaConf.to_container(cfg, resolve=False)
        cfg.pop("hydra")
        jobs[data] = flatten(cfg)
    differ = {k for k in jobs["imagenette"].keys() | jobs["imagewoof"].keys()
              if jobs["imagenette"].get(k) != jobs["imagewoof"].get(k)}
    assert differ == {"data.dataset"}, differ
    woof = jobs["imagewoof"]
    assert woof["model.name"] == "resnet18" and woof["trainer.max_epochs"] == jobs["imagenette"]["trainer.max_epochs"]
