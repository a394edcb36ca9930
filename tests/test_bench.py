"""``benchmarks/bench.py`` (``make bench``): a quick run on the real mini archive writes real numbers."""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench.py"
OTHER_SECTION = "## GPU: NVIDIA H200, 139 GiB\n\nkept from an earlier CUDA run: 1,234 images/s\n"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The script imported as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("bench_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, mini_archive: Path) -> dict:
    """One ``bench.quick=true`` run of the real script on the mini archive at 64 px crops."""
    tmp = tmp_path_factory.mktemp("bench")
    md, raw = tmp / "BENCH.md", tmp / "bench.json"
    # an earlier GPU section: a CPU run must rewrite only its own section and keep this one
    md.write_text(f"# old\n<!-- bench:cuda:start -->\n{OTHER_SECTION}<!-- bench:cuda:end -->\n")
    args = [
        f"data.archive={mini_archive}",
        f"paths.data_dir={tmp / 'data'}",
        "data.resize=72",
        "data.crop=64",
        "bench.quick=true",
        "bench.device=cpu",
        f"bench.output={md}",
        f"bench.json={raw}",
    ]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"md": md.read_text(), "json": json.loads(raw.read_text()), "stdout": proc.stdout}


def _cells(md: str, heading: str) -> list[list[str]]:
    """Body rows of the first table after ``heading``."""
    block = md.split(heading, 1)[1]
    rows = [ln for ln in block.split("\n\n", 2)[1].splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in rows[2:]]


def _number(cell: str) -> float:
    return float(re.sub(r"[,x]", "", cell.split()[0]))


def test_quick_run_measures_real_positive_numbers(quick_run: dict) -> None:
    raw = quick_run["json"]
    pil, cached = raw["loader"]
    assert (pil["pipeline"], pil["workers"], cached["pipeline"]) == ("pil", 0, "cached")
    for r in (pil, cached):
        assert len(r["window_images_per_s"]) == 2 and min(r["window_images_per_s"]) > 0  # quick: 2 windows
        assert r["images_per_s"] == pytest.approx(statistics.median(r["window_images_per_s"]))
        assert r["rss_main_mib"] >= r["rss_start_mib"] > 50
    # Speed itself is the benchmark's verdict, not this test's: only check the numbers are real.
    assert cached["images_per_s"] > 0 and pil["images_per_s"] > 0
    assert cached["augmented_images_per_s"] > 0
    (step,) = raw["step"]
    assert step["model"] == "mobilenetv2" and step["library"] == "timm mobilenetv2_100"
    assert step["ours"] > 0 and step["library_images_per_s"] > 0 and step["timed_steps"] >= 2
    ours_s, library_s = step["step_s"]  # per-step seconds, paired round by round
    assert len(ours_s) == len(library_s) == step["timed_steps"] and min(ours_s + library_s) > 0
    assert step["ratio"] == pytest.approx(
        statistics.median(b / a for a, b in zip(ours_s, library_s, strict=True))
    )
    assert step["ours"] == pytest.approx(4 / statistics.median(ours_s))  # batch 4 / median step time
    assert step["same_layers"] is True  # ours is timm's MobileNetV2 exactly
    assert 2.0 < step["params_m"] < 2.5  # MobileNetV2 with a 10-class head: 2.24 M parameters
    (e2e,) = raw["e2e"]
    assert e2e["size"] == 64 and e2e["pipeline"] == "cached, prefetch 0" and e2e["model_only"] > 0 and e2e["e2e"] > 0
    assert {c["result"] for c in raw["checks"]} <= {"PASS", "FAIL"} and len(raw["checks"]) == 3
    assert raw["machine"]["torch_threads"] == 1 and raw["config"]["bench"]["batch_size"] == 4


def test_quick_run_times_the_cpu_presets_knobs(quick_run: dict) -> None:
    """The knobs part times conf/experiment/cpu_train's own model, batch and optimizer, then each variant."""
    knobs = quick_run["json"]["knobs"]
    assert knobs["experiment"] == "cpu_train" and knobs["model"]["name"] == "resnet18"
    assert knobs["model"]["width"] == 0.5 and 2.0 < knobs["params_m"] < 3.0  # the preset's half-width ResNet-18
    default, both, small = knobs["rows"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        batch = compose("config", overrides=["experiment=cpu_train"]).data.batch_size  # the preset's
    # `default` is the preset as a CPU run resolves it (trainer=cpu): fp32, NHWC, eager, foreach Adam
    assert (default["name"], default["batch"], default["bf16"]) == ("default", batch, False)
    assert default["channels_last"] and not (default["compile"] or default["fused"])
    assert (both["name"], both["channels_last"], both["fused"], both["batch"]) == (
        "channels_last=false+fused", False, True, batch)
    assert (small["name"], small["batch"], small["channels_last"]) == ("batch=2", 2, True)  # the rest as default
    for row in knobs["rows"]:
        assert len(row["step_s"]) == row["timed_steps"] >= 2 and min(row["step_s"]) > 0
        assert row["images_per_s"] == pytest.approx(row["batch"] / statistics.median(row["step_s"]))
    assert default["ratio"] == 1.0
    assert small["ratio"] == pytest.approx(  # paired by round: images/s over default's in the same round
        statistics.median((2 / a) / (batch / d) for a, d in zip(small["step_s"], default["step_s"], strict=True))
    )
    rows = _cells(quick_run["md"], "### Training knobs")
    assert [r[0] for r in rows] == ["default", "channels_last=false+fused", "batch=2"] and rows[0][7] == "1.00x"
    assert all(_number(r[6]) > 0 for r in rows)
    assert quick_run["md"].index("## CPU:") < quick_run["md"].index("## CPU training knobs:")


def test_markdown_has_context_tables_and_verdicts(quick_run: dict) -> None:
    md, raw = quick_run["md"], quick_run["json"]
    assert md.startswith("# Benchmarks") and "## CPU:" in md and "quick smoke run" in md
    for needle in (
        "- date: ",
        "load average",
        "torch " + raw["machine"]["versions"]["torch"],
        "bench.quick=true",
        "AMD" if "AMD" in raw["machine"]["cpu"] else "logical cores",
    ):
        assert needle in md, needle
    loader = _cells(md, "### Loader")
    assert [r[0].split(" ")[0] for r in loader] == ["pil", "cached", "cached"]
    assert all(_number(r[3]) > 0 for r in loader)
    (step,) = _cells(md, "### Training step")
    assert step[0] == "mobilenetv2" and _number(step[3]) > 0 and step[5] == "yes" and _number(step[6]) > 0
    assert step[-1] in ("PASS", "FAIL")
    (e2e,) = _cells(md, "### End to end")
    assert _number(e2e[3]) > 0 and _number(e2e[4]) > 0 and e2e[-1] in ("PASS", "FAIL")
    targets = _cells(md, "### Targets")
    assert len(targets) == 3 and all(r[-1] in ("PASS", "FAIL") for r in targets)
    assert "### Targets" in quick_run["stdout"]  # the same section is printed
    # the GPU section of the earlier run survives the CPU run
    assert OTHER_SECTION in md and md.index("## CPU") < md.index("## GPU")


def test_bad_arguments_name_the_key(bench: ModuleType) -> None:
    cases = {
        "bench.device=tpu": "bench.device",
        "bench.modelz=[resnet50]": "modelz",
        "bench.models=[resnet51]": "bench.models",
        "bench.sizes=[16]": "bench.sizes",
        "bench.precision=fp16": "bench.precision",
        "bench.parts=[loader,train]": "bench.parts",
        "bench.knob_variants=[turbo]": "unknown setting 'turbo'",
        "bench.knob_variants=[batch=0]": "batch=32",
        "bench.knob_crop=8": "bench.knob_crop",
        "--quick": "key=value",
    }
    for arg, key in cases.items():
        with pytest.raises(bench.BenchConfigError, match=re.escape(key)):
            bench.load_config([arg])


def test_quick_preset_yields_to_explicit_arguments(bench: ModuleType) -> None:
    cfg = bench.load_config(["bench.quick=true", "bench.batch_size=2", "data.crop=96"])
    assert cfg.bench.batch_size == 2 and cfg.bench.models == ["mobilenetv2"] and cfg.bench.output is None
    assert cfg.data.crop == 96 and cfg.data.seed == 0  # data config interpolations resolve
    full = bench.load_config([])
    assert full.bench.batch_size is None and full.bench.output == "BENCHMARKS.md"
    bench.resolve_auto(full.bench)
    assert full.bench.batch_size in (8, 256) and full.bench.precision in ("fp32", "bf16")
    assert ("knobs" in full.bench.parts) == (not torch.cuda.is_available())  # the CPU preset's rows: CPU only
    gpu = bench.load_config(["bench.parts=[knobs]"])
    gpu.bench.device = "cuda"
    with pytest.raises(bench.BenchConfigError, match=re.escape("bench.device=cpu")):
        bench.resolve_auto(gpu.bench)


def test_update_markdown_replaces_its_section_and_stale_placeholders(
    bench: ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "B.md"
    bench.update_markdown(path, "cpu", "## CPU: first\n")
    first = path.read_text()
    assert "## CPU: first" in first and bench.NO_RUN["cuda"] in first  # no GPU run yet: the placeholder
    assert bench.NO_RUN["gpu-check"] in first and "Not measured" in bench.NO_RUN["gpu-check"]
    bench.update_markdown(path, "cpu-knobs", "## CPU training knobs: first\n")
    assert "## CPU: first" in path.read_text()  # a knobs-only run keeps the main CPU section
    bench.update_markdown(path, "cuda", "## GPU: H200\n")
    bench.update_markdown(path, "cpu", "## CPU: second\n")
    text = path.read_text()
    assert "## GPU: H200" in text and "## CPU: second" in text and "## CPU: first" not in text
    assert "## CPU training knobs: first" in text
    assert [text.index(f"<!-- bench:{k}:start -->") for k in bench.SECTIONS] == sorted(
        text.index(f"<!-- bench:{k}:start -->") for k in bench.SECTIONS)
    with pytest.raises(ValueError, match=re.escape("unknown BENCHMARKS.md section")):
        bench.update_markdown(path, "tpu", "## TPU: x\n")
    assert bench.NO_RUN["cuda"] not in text and text.count("<!-- bench:cpu:start -->") == 1
    # an old placeholder (no device in its title) is rewritten with the current one
    path.write_text(text.replace("## GPU: H200", "## GPU\n\nold wording"))
    bench.update_markdown(path, "cpu", "## CPU: third\n")
    assert "old wording" not in path.read_text() and bench.NO_RUN["cuda"] in path.read_text()
    # prose written between and after the parts (what a table means, how it was made) survives an update
    notes = "\nWhat the knobs table says.\n\n"
    marked = path.read_text().replace("<!-- bench:cpu-knobs:end -->\n", "<!-- bench:cpu-knobs:end -->\n" + notes)
    path.write_text(marked + "\nClosing words.\n")
    bench.update_markdown(path, "cpu-knobs", "## CPU training knobs: second\n")
    text = path.read_text()
    assert notes in text and text.endswith("Closing words.\n") and "## CPU training knobs: second" in text
