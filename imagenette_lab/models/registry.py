"""``create_model``: the report's networks by name, from scratch, with the ablation flags validated.

Flags mean the same on every model:

* ``act``: every activation of the network, stem and head included (None = the architecture's own).
* ``drop_rate``: dropout probability before the classifier.
* ``block_drop_rate``: dropout probability inside every bottleneck / Inception block.
* ``norm``: ``batch`` (BatchNorm after every conv) or ``none`` (removed).
* ``blurpool``: anti-aliased downsampling (Zhang 2019) on every stride-2 conv and pool.
* ``width``: channel multiplier (mobilenetv2, hybrid, resnet18).
* ``zero_init_last``: with ``norm='none'``, zero-initialize the last conv of every residual branch so each
  block starts as its shortcut. A fix the report did not have, so off by default (the report's setting).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .googlenet import GoogLeNet
from .hybrid import HybridMobileNetV2
from .layers import BlurPool, act_layer, norm_act_layer
from .timm_models import build_mobilenetv2, build_resnet


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: how to build the model and which extra arguments it takes."""

    build: Callable[..., nn.Module]  # called with num_classes and every flag resolved
    default_act: str
    what: str  # one line for docs/models.md
    built_from: str
    takes_width: bool = False
    arch_kwargs: dict[str, object] = field(default_factory=dict)  # extra kwargs and their defaults


def _resnet(variant: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, **flags: object) -> nn.Module:
        return build_resnet(variant, num_classes, **flags)

    return build


def _mobilenetv2(num_classes: int, **flags: object) -> nn.Module:
    return build_mobilenetv2(num_classes, **flags)


def _googlenet(
    num_classes: int, *, act: str, norm: str, blurpool: bool, width: float, aux_logits: bool, zero_init_last: bool,
    **drops: float,
) -> nn.Module:
    if zero_init_last:
        raise ValueError("zero_init_last=True is not supported by 'googlenet': it has no residual branches to zero")
    return GoogLeNet(
        num_classes,
        aux_logits=aux_logits,
        act_layer=act_layer(act),
        norm_layer=norm_act_layer(norm, act, bn_eps=1e-3),
        blurpool=blurpool,
        **drops,
    )


def _hybrid(num_classes: int, *, act: str, norm: str, blurpool: bool, **kwargs: object) -> nn.Module:
    return HybridMobileNetV2(
        num_classes,
        act_layer=act_layer(act),
        norm_layer=norm_act_layer(norm, act),
        aa_layer=BlurPool if blurpool else None,
        **kwargs,
    )


_REGISTRY: dict[str, ModelSpec] = {
    "resnet18": ModelSpec(
        _resnet("resnet18"),
        "relu",
        "ResNet-18, basic blocks (He et al. 2015); not in the report: the CPU preset's model (make train)",
        "timm",
        takes_width=True,
    ),
    "resnet34": ModelSpec(
        _resnet("resnet34"),
        "relu",
        "ResNet-34, basic blocks (He et al. 2015), torchvision v1.5 layout",
        "timm",
    ),
    "resnet50": ModelSpec(
        _resnet("resnet50"),
        "relu",
        "ResNet-50, bottlenecks (He et al. 2015), torchvision v1.5 layout",
        "timm",
    ),
    "resnet50d": ModelSpec(
        _resnet("resnet50d"),
        "relu",
        "ResNet-50-D (He et al. 2018): deep 3-conv stem, avg-pool downsampling shortcut",
        "timm",
    ),
    "mobilenetv2": ModelSpec(
        _mobilenetv2,
        "relu6",
        "MobileNetV2 (Sandler et al. 2018), the report's appendix table",
        "timm",
        takes_width=True,
    ),
    "googlenet": ModelSpec(
        _googlenet,
        "relu",
        "GoogLeNet / Inception v1 (Szegedy et al. 2015); aux heads off by default",
        "torchvision (+ timm ConvNormAct)",
        arch_kwargs={"aux_logits": False},
    ),
    "hybrid": ModelSpec(
        _hybrid,
        "mish",
        "the report's Modified MobileNetV2: every block sums inverted residual + ResNet bottleneck + shortcut",
        "our code from timm layers",
        takes_width=True,
        arch_kwargs={"rb_groups": 1},
    ),
}

MODEL_NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))
def common_flags() -> tuple[str, ...]:
    """The flags every model takes: :func:`create_model`'s keyword-only parameters (the signature is the list)."""
    return tuple(p.name for p in inspect.signature(create_model).parameters.values() if p.kind is p.KEYWORD_ONLY)


def model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; unknown names list the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    return _REGISTRY[name]


def _takers(flag: str) -> list[str]:
    return [
        n
        for n in MODEL_NAMES
        if (_REGISTRY[n].takes_width if flag == "width" else flag in _REGISTRY[n].arch_kwargs)
    ]


def _check_rate(flag: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{flag}={value!r} must be a probability in [0, 1)")
    return float(value)


def create_model(
    name: str,
    num_classes: int = 10,
    *,
    act: str | None = None,
    drop_rate: float = 0.0,
    block_drop_rate: float = 0.0,
    norm: str = "batch",
    blurpool: bool = False,
    width: float | None = None,
    zero_init_last: bool = False,
    **arch_kwargs: object,
) -> nn.Module:
    """Build registry model ``name`` from scratch (random init, never pretrained).

    Args:
        name: one of ``MODEL_NAMES``.
        num_classes: classifier outputs.
        act: one of ``ACTIVATIONS`` for every activation, or None for the architecture's default
            (ReLU for ResNets and GoogLeNet, ReLU6 for MobileNetV2, Mish for hybrid).
        drop_rate: dropout probability before the classifier.
        block_drop_rate: dropout probability inside every bottleneck / Inception block.
        norm: ``batch`` or ``none``.
        blurpool: anti-alias every stride-2 conv and pool with BlurPool (Zhang 2019).
        width: channel multiplier (mobilenetv2, hybrid, resnet18); None = 1.0.
        zero_init_last: only with ``norm='none'``: zero-init the last conv of every residual branch (blocks
            start as their shortcut). False = the report's setting, which had no such fix.
        **arch_kwargs: ``aux_logits`` (googlenet), ``rb_groups`` (hybrid).

    Returns:
        The model. Its forward returns logits (B, num_classes), except googlenet with ``aux_logits=True``
        in training mode, which returns ``(logits, aux1_logits, aux2_logits)``.
    """
    spec = model_spec(name)
    unknown = sorted(set(arch_kwargs) - set(spec.arch_kwargs))
    for flag in unknown:
        takers = _takers(flag)
        if takers:
            raise ValueError(f"{flag!r} is not supported by {name!r}; models that take it: {takers}")
        valid = sorted(common_flags() + tuple(spec.arch_kwargs))
        raise TypeError(f"unknown flag {flag!r} for model {name!r}; valid flags: {valid}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive int")
    # act and norm are checked where they become layers (layers.act_layer / norm_layer / norm_act_layer)
    if not isinstance(blurpool, bool):
        raise ValueError(f"blurpool={blurpool!r} must be true or false")
    if not isinstance(zero_init_last, bool):
        raise ValueError(f"zero_init_last={zero_init_last!r} must be true or false")
    if zero_init_last and norm != "none":
        raise ValueError(
            f"zero_init_last=True only applies with norm='none' (got norm={norm!r}): with BatchNorm each branch is "
            "normalized already; set norm=none or leave zero_init_last=false"
        )
    if width is not None:
        if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
            raise ValueError(f"width={width!r} must be a number > 0 (a channel multiplier)")
        if width != 1.0 and not spec.takes_width:
            raise ValueError(
                f"'width' is not supported by {name!r} (it has no width multiplier); "
                f"models that take it: {_takers('width')}"
            )
    if "rb_groups" in arch_kwargs:
        groups = arch_kwargs["rb_groups"]
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"rb_groups={groups!r} must be a positive int (1 = dense 3x3, the report's)")
    if "aux_logits" in arch_kwargs and not isinstance(arch_kwargs["aux_logits"], bool):
        raise ValueError(f"aux_logits={arch_kwargs['aux_logits']!r} must be true or false")
    return spec.build(
        num_classes,
        act=act or spec.default_act,
        drop_rate=_check_rate("drop_rate", drop_rate),
        block_drop_rate=_check_rate("block_drop_rate", block_drop_rate),
        norm=norm,
        blurpool=blurpool,
        width=float(width or 1.0),
        zero_init_last=zero_init_last,
        **{**spec.arch_kwargs, **arch_kwargs},
    )


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, img_size: int) -> int:
    """Multiply-accumulates of one eval-mode forward on a ``img_size`` x ``img_size`` RGB image.

    Counted by PyTorch's FlopCounterMode (convolutions and matmuls; MACs = FLOPs / 2). The model is
    left in the train/eval mode it came in.
    """
    was_training = model.training
    param = next(model.parameters())
    x = torch.zeros(1, 3, img_size, img_size, device=param.device, dtype=param.dtype)
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
