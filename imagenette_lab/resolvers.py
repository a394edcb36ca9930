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


def batch_scaled_lr(base_lr: float, base_batch: int, batch: int) -> float:
    """``${batch_scaled_lr:LR,BASE_BATCH,BATCH}``: a learning rate given for BASE_BATCH images per step, scaled
    linearly to BATCH (Goyal et al. 2017): LR x BATCH / BASE_BATCH, e.g. He et al.'s SGD lr 0.1 at batch 256
    is 0.0125 at batch 32 (``conf/experiment/arm/optimizer/sgd_linear.yaml``)."""
    for name, value in (("base_lr", base_lr), ("base_batch", base_batch), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"batch_scaled_lr: {name}={value!r} must be a number > 0")
    return float(base_lr) * batch / base_batch


def register() -> None:
    from imagenette_lab.run_identity import job_dirname

    OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)
    OmegaConf.register_new_resolver("cuda_device_count", cuda_device_count, replace=True)
    OmegaConf.register_new_resolver("job_gpu", job_gpu, replace=True)
    OmegaConf.register_new_resolver("batch_scaled_lr", batch_scaled_lr, replace=True)
