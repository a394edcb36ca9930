"""CPU training knobs (part ``knobs``): images/s of the CPU preset's training step with
channels_last, torch.compile, a fused optimizer, bf16 autocast and the batch size changed, side by side in
one run, as ratios to the preset's own settings (what ``make train`` on a CPU does today).

The model, crop, batch and optimizer come from ``conf/experiment/<bench.knob_experiment>.yaml`` (Hydra
composes it as ``run.py`` would, device defaults resolved for the CPU), so the rows follow the preset
when it changes. Inputs are synthetic batches already in memory: the loader's cost per image does not
depend on these knobs (the ``e2e`` part measures it).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from benchmarks.config import NUM_CLASSES, REPO, parse_variant
from benchmarks.step import OptimizerFactory, StepSetup, TrainStep, _free
from imagenette_lab.config_checks import resolve_runtime
from imagenette_lab.models import count_params

TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before bench.threads changes it: what `make train` gets


@dataclass(frozen=True)
class Variant:
    """One column of settings; ``name`` is how the bench arguments spelt it."""

    name: str
    batch: int  # images per step
    channels_last: bool
    compile: bool
    fused: bool  # the optimizer's fused (single-kernel) implementation
    bf16: bool  # bf16 autocast (trainer.precision=bf16-mixed)

    def setup(self) -> StepSetup:
        return StepSetup(torch.device("cpu"), "bf16" if self.bf16 else "fp32", self.channels_last, self.compile)


def load_preset(name: str) -> DictConfig:
    """``run.py experiment=<name>``'s config with the CPU's device defaults filled in."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={name}", "trainer.accelerator=cpu"])
    except Exception as err:  # Hydra names the missing option; say which bench key chose it
        raise ValueError(f"bench.knob_experiment={name!r}: {err}") from err
    finally:
        GlobalHydra.instance().clear()
    resolve_runtime(cfg)
    return cfg


def make_variants(names: list[str], preset: DictConfig) -> list[Variant]:
    """The preset's own settings first (``default``), then each of ``names`` applied on top of them."""
    base = Variant(
        name="default",
        batch=int(preset.data.batch_size),
        channels_last=bool(preset.module.channels_last),
        compile=bool(preset.module.compile),
        fused=bool(preset.optim.get("fused") or False),
        bf16="bf16" in str(preset.trainer.precision),
    )
    out = [base]
    for name in names:
        settings = asdict(base) | parse_variant(name) | {"name": name}
        out.append(Variant(**settings))
    return out


def optimizer_factory(optim: DictConfig, fused: bool) -> OptimizerFactory:
    """The preset's optimizer (Hydra ``_partial_``) with ``fused`` set."""
    spec = OmegaConf.to_container(optim, resolve=True)
    spec["fused"] = fused
    partial = instantiate(spec)
    return lambda params: partial(params=params)


def bench_knobs(cfg: DictConfig) -> dict[str, Any]:
    """Time every variant's training step, round after round (order flipped each round), and give each its
    images/s and its median per-round ratio to ``default`` (both saw the same machine load)."""
    b = cfg.bench
    preset = load_preset(str(b.knob_experiment))
    crop = int(b.knob_crop or preset.data.crop)
    variants = make_variants([str(v) for v in b.knob_variants], preset)
    threads = int(b.knob_threads or TORCH_DEFAULT_THREADS)
    outer_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        steppers, batches, warmup_s = [], [], []
        for v in variants:
            torch.manual_seed(cfg.seed)  # every variant starts from the same weights
            steppers.append(TrainStep(instantiate(preset.model), v.setup(), optimizer_factory(preset.optim, v.fused)))
            batches.append((torch.randn(v.batch, 3, crop, crop), torch.randint(0, NUM_CLASSES, (v.batch,))))
        params_m = count_params(steppers[0].model) / 1e6
        for step, (x, y) in zip(steppers, batches, strict=True):
            start = time.perf_counter()
            for _ in range(b.knob_warmup):  # compile, allocator growth, first-touch of the weights
                step(x, y)
            warmup_s.append(time.perf_counter() - start)
        times: list[list[float]] = [[] for _ in variants]
        order, rounds, start = list(range(len(variants))), 0, time.perf_counter()
        while rounds < b.knob_steps or (time.perf_counter() - start < b.knob_seconds and rounds < b.max_steps):
            for i in order if rounds % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                steppers[i](*batches[i])
                times[i].append(time.perf_counter() - t0)
            rounds += 1
            print(f"  knobs round {rounds}: {time.perf_counter() - start:.0f} s", flush=True)
    finally:
        torch.set_num_threads(outer_threads)
        del steppers
        _free(torch.device("cpu"))
    rows = []
    for v, t, warm in zip(variants, times, warmup_s, strict=True):
        # paired per round: images/s of this variant over images/s of default in the same round
        ratio = statistics.median((v.batch / a) / (variants[0].batch / d) for a, d in zip(t, times[0], strict=True))
        rows.append({**asdict(v), "images_per_s": v.batch / statistics.median(t), "ratio": ratio,
                     "timed_steps": len(t), "warmup_s": warm, "step_s": t})
        print(f"  knobs {v.name}: {rows[-1]['images_per_s']:.1f} images/s ({ratio:.2f}x default)", flush=True)
    return {
        "experiment": str(b.knob_experiment),
        "model": OmegaConf.to_container(preset.model, resolve=True),
        "params_m": params_m,
        "optimizer": str(preset.optim._target_),
        "crop": crop,
        "threads": threads,
        "rows": rows,
    }

