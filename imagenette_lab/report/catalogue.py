"""The README's table of report experiments, generated from ``conf/experiment/*.yaml``: each file's
``# make-help:`` line and the sweep it composes at each scale. Written by hand (no library renders a Hydra
sweep as a table); ``make readme`` rewrites the table, and a test fails when README.md drifts from it.

``python -m imagenette_lab.report.catalogue [README.md]`` rewrites the block between :data:`BEGIN` and
:data:`END` in place.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from imagenette_lab.provenance import PROJECT_ROOT

from .tables import Table

CONF = PROJECT_ROOT / "conf"
SCALES = ("full", "cpu", "quick")  # the order the table shows them in
PRESETS = frozenset({"cpu_train"})  # experiment files that are not sweeps (docs/makefile_experiments.mk)
BEGIN = "<!-- experiments: generated from conf/experiment/*.yaml by `make readme`; edit those files, not this table -->"
END = "<!-- /experiments -->"


def experiment_names() -> list[str]:
    return sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if p.stem not in PRESETS)


def _comment(name: str, tag: str) -> str | None:
    """The text of the experiment file's ``# <tag>:`` comment line, if it has one."""
    for line in (CONF / "experiment" / f"{name}.yaml").read_text().splitlines():
        if line.startswith(f"# {tag}:"):
            return line.split(":", 1)[1].strip()
    return None


def help_line(name: str) -> str:
    """The experiment file's ``# make-help:`` line (what ``make help`` prints)."""
    if (text := _comment(name, "make-help")) is None:
        raise ValueError(f"conf/experiment/{name}.yaml has no `# make-help:` line; add one (make help prints it)")
    return text


def no_cpu_form(name: str) -> str | None:
    """Why the experiment has no ``scale=cpu`` form (its ``# no-cpu-form:`` line), or None when it has one
    (or is not an experiment file)."""
    if not (CONF / "experiment" / f"{name}.yaml").is_file():
        return None
    return _comment(name, "no-cpu-form")


def sweep_at(name: str, scale: str) -> dict[str, str] | None:
    """The swept keys and values of ``make <name> SCALE=<scale>``, and under ``""`` the model it trains when
    the sweep does not choose one (None: the experiment has no form at that scale, i.e. its sweep reads a
    per-scale table without an entry for it)."""
    base = [f"experiment={name}", f"scale={scale}"]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=base, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # the sweep's values may interpolate hydra's runtime choices
            params = {str(k): str(v) for k, v in (OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
                                                  or {}).items()}
            # the model may be swept or chosen by arm files: compose every arm that can choose one
            choosers = [[f"{k}={v.strip()}" for v in vs.split(",")] for k, vs in params.items()
                        if k == "model" or k.startswith("experiment/arm/")]
            models = {_model(compose("config", overrides=[*base, *arm])) for arm in itertools.product(*choosers)}
    except OmegaConfBaseException:
        return None
    finally:
        GlobalHydra.instance().clear()
    model = models.pop() if len(models) == 1 else "(the arms')"
    return {"": model, **{_shown_key(k): v for k, v in params.items()}}


def _model(cfg: DictConfig) -> str:
    width = float(cfg.model.width)
    return f"{cfg.model.name}" + ("" if width == 1.0 else f" ×{width:g}")


def _shown_key(key: str) -> str:
    """``experiment/arm/table1@_global_`` -> ``arm`` (the arm files under conf/experiment/arm/table1/)."""
    return "arm" if key.startswith("experiment/arm/") else key


def _values(values: str) -> str:
    return ", ".join(v.strip() for v in values.split(","))


def _model_cell(sweeps: dict[str, dict[str, str]]) -> str:
    """The model each scale trains (``×w``: channel width), or "swept" when the arms choose it."""
    first, *others = sweeps
    shown = sweeps[first]
    cell = shown[""]
    for scale in others:
        if sweeps[scale][""] != shown[""]:
            cell += f"; at {scale}: {sweeps[scale]['']}"
    return cell


def _sweep_cell(name: str, sweeps: dict[str, dict[str, str]]) -> str:
    first, *others = sweeps
    shown = {k: v for k, v in sweeps[first].items() if k and not (k == "model" and "," not in v)}  # model: own column
    cell = "; ".join(f"`{k}`: {_values(v)}" for k, v in shown.items() if k != "seed")
    cell = cell or "(one configuration)"
    if "arm" in shown:
        cell += f" (`conf/experiment/arm/{name}/`)"
    for scale in others:  # another scale's sweep, only where it differs
        differs = {k: v for k, v in sweeps[scale].items()
                   if k not in ("", "seed") and not (k == "model" and "," not in v) and shown.get(k) != v}
        if differs:
            cell += f"; at {scale}: " + "; ".join(f"`{k}`: {_values(v)}" for k, v in differs.items())
    return cell


def experiment_table() -> str:
    """The Markdown table: target, what it reproduces (``# make-help:``), sweep, seeds, scales."""
    rows = []
    for name in experiment_names():
        sweeps = {s: sw for s in SCALES
                  if not (s == "cpu" and no_cpu_form(name)) and (sw := sweep_at(name, s)) is not None}
        if not sweeps:
            raise ValueError(f"experiment={name} composes at no scale ({', '.join(SCALES)})")
        seeds = _values(next(iter(sweeps.values())).get("seed", "(not swept)"))
        rows.append([f"`make {name}`", help_line(name), _model_cell(sweeps), _sweep_cell(name, sweeps), seeds,
                     ", ".join(sweeps)])
    table = Table(["make target", "report -> artefact (its `# make-help:` line)", "model", "swept arms",
                   "seeds", "scales"], rows, prose=True)
    return table.markdown()


def update_readme(path: Path) -> bool:
    """Rewrite the generated block of ``path``; True when it changed."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no generated experiments block; put the two lines {BEGIN!r} and {END!r} "
                         "where the table belongs")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{experiment_table()}\n{END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PROJECT_ROOT / "README.md"
    print(f"{target}: {'updated' if update_readme(target) else 'already current'}")
