"""OmegaConf resolvers used by ``conf/`` (registered by ``run.py`` before Hydra composes)."""

from __future__ import annotations

from omegaconf import OmegaConf


def cuda_device_count() -> int:
    """Visible CUDA GPUs, at least 1 (the job count of ``hydra/launcher=parallel_gpus``)."""
    import torch

    return max(1, torch.cuda.device_count())


def job_gpu() -> int:
    """The GPU of this sweep job: job number modulo the visible GPUs (``trainer=gpu_per_job``)."""
    from hydra.core.hydra_config import HydraConfig

    num = HydraConfig.get().job.num if HydraConfig.initialized() else 0
    return int(num or 0) % cuda_device_count()


def register() -> None:
    from imagenette_lab.run_identity import job_dirname

    OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)
    OmegaConf.register_new_resolver("cuda_device_count", cuda_device_count, replace=True)
    OmegaConf.register_new_resolver("job_gpu", job_gpu, replace=True)
