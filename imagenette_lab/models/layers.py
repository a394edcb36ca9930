"""Layer factories shared by every model: activation, normalization, dropout and anti-aliasing.

Each ablation flag resolves here to a layer *factory*, so a network is built with the flag's layer in
place and "off" is an ``nn.Identity`` rather than an ``if`` in ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.nn as nn
from timm.layers import BlurPool2d, create_act_layer, get_act_layer

ACTIVATIONS: tuple[str, ...] = ("relu", "relu6", "mish", "silu", "gelu")
NORMS: tuple[str, ...] = ("batch", "none")

LayerFactory = Callable[..., nn.Module]


def act_layer(name: str) -> type[nn.Module]:
    """The activation class for ``name`` (one of ``ACTIVATIONS``), resolved by timm."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation act={name!r}; choose one of {ACTIVATIONS}")
    return get_act_layer(name)


def dropout(p: float) -> nn.Module:
    """Element-wise dropout with probability ``p``, or ``nn.Identity`` when ``p == 0``."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def no_norm_act(
    num_features: int,
    act_layer: str | type[nn.Module] | None = None,
    apply_act: bool = True,
    inplace: bool = False,
    **_: object,
) -> nn.Module:
    """Norm-act stand-in for ``norm='none'``: keeps only the activation.

    timm's MobileNet builder and ``ConvNormAct`` fuse norm and activation in one "norm-act" layer, so
    removing the norm must keep the activation; timm has no such identity norm-act, hence this factory
    (it takes the norm-act call signature and ignores ``num_features``).
    """
    if not apply_act or act_layer is None:
        return nn.Identity()
    return create_act_layer(act_layer, inplace=inplace)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown normalization norm={norm!r}; choose one of {NORMS}")


def norm_layer(norm: str) -> type[nn.Module]:
    """Plain norm layer class for ``norm`` (timm's ResNet): ``nn.BatchNorm2d``, or ``nn.Identity`` for
    ``'none'`` (timm calls it with the channel count, which Identity ignores)."""
    _check_norm(norm)
    return nn.BatchNorm2d if norm == "batch" else nn.Identity


def norm_act_layer(norm: str, act: str, bn_eps: float = 1e-5) -> LayerFactory:
    """Norm layer to hand to timm's fused norm-act code (``ConvNormAct``, MobileNet builder).

    ``bn_eps`` is BatchNorm's variance epsilon (unitless); GoogLeNet uses 1e-3 like torchvision.
    """
    _check_norm(norm)
    if norm == "batch":
        return partial(nn.BatchNorm2d, eps=bn_eps)
    return partial(no_norm_act, act_layer=act)


class BlurPool(BlurPool2d):
    """timm's BlurPool2d (Zhang 2019: [1, 2, 1] binomial low-pass, then subsample) with replicate padding.

    timm pads with ``reflect``, which cannot pad the 1x1 maps that 32 px inputs reach in the last stage
    (e.g. GoogLeNet's ``maxpool4``); ``replicate`` works at any size and only differs on the border row.
    A class rather than a ``partial`` because timm's ResNet calls ``issubclass`` on its ``aa_layer``.
    """

    def __init__(self, channels: int | None = None, filt_size: int = 3, stride: int = 2, **kwargs: object):
        # filt_size: taps of the binomial filter (3 = Zhang's default "Tri-3"); stride: subsampling factor
        kwargs.setdefault("pad_mode", "replicate")
        super().__init__(channels, filt_size=filt_size, stride=stride, **kwargs)


def max_blur_pool(pool: nn.MaxPool2d, channels: int | None = None) -> nn.Sequential:
    """MaxBlurPool (Zhang 2019) replacing a strided max-pool: dense max (stride 1), then BlurPool.

    Keeps the pool's window and pads by ``(k - 1) // 2`` so the output size matches the original pool's,
    as timm's anti-aliased ResNet stem does; timm has no stand-alone MaxBlurPool module.
    """
    k = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
    stride = pool.stride if isinstance(pool.stride, int) else pool.stride[0]
    return nn.Sequential(nn.MaxPool2d(k, stride=1, padding=(k - 1) // 2), BlurPool(channels, stride=stride))
