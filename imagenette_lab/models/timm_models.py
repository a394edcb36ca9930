"""ResNet-18/34/50/50-D and MobileNetV2 built by timm, with the ablation flags timm does not cover added.

timm already takes ``act_layer``, ``norm_layer``, ``aa_layer`` and ``drop_rate``. What it leaves out, and
this module adds after construction (each is a swap of a layer timm leaves as a placeholder or a stride):

* ``blurpool``: timm's ``aa_layer`` anti-aliases the blocks' strided 3x3 convs and the ResNet max-pool
  but not the stem conv nor the strided shortcut; those get the same BlurPool here so *every* stride-2
  reduction is blurred (Zhang 2019's fully anti-aliased variant).
* ``block_drop_rate``: timm's only in-block regularizers are DropBlock (ResNet stages 3-4) and drop-path;
  the report's "dropout in all bottlenecks" goes in each ResNet block's DropBlock slot (``drop_block``, an
  Identity by default: a Dropout there is still the block's one in-block drop) and, in MobileNetV2, in
  front of each block's linear projection (:func:`add_dropout_before_projection`, a named wrapper: timm's
  MobileNetV2 blocks have no drop slot, and their empty squeeze-excite slot is left alone).
* ``zero_init_last`` (only with ``norm='none'``): timm's ResNet zero-inits each residual branch's last BN so
  blocks start as identity; without BN that is impossible, so the flag zero-initializes the branch's last
  conv instead (same intent; MobileNetV2's residual blocks get the same). Off by default: the report had
  no such fix, and its no-BN arms are the ones it saw fail to learn.
"""

from __future__ import annotations

from collections import OrderedDict

import timm
import torch.nn as nn
from timm.layers import make_divisible
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.efficientnet import EfficientNet, _gen_mobilenet_v2
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from .layers import BlurPool, act_layer, dropout, norm_act_layer, norm_layer

RESNET_CHANNELS = (64, 128, 256, 512)  # timm's stage widths (a bottleneck's inner width) at width 1
RESNET_STEM_WIDTH = {"resnet50d": 32}  # timm's stem width where it is not 64 (the deep stem's first convs)


def build_resnet(
    variant: str,
    num_classes: int,
    *,
    act: str,
    drop_rate: float,
    block_drop_rate: float,
    norm: str,
    blurpool: bool,
    zero_init_last: bool = False,
    width: float = 1.0,
) -> ResNet:
    """timm's ``resnet18``/``resnet34``/``resnet50``/``resnet50d`` from scratch, with the ablation flags
    applied; ``width`` scales the stem and every stage's channels (timm's ``stem_width``/``channels``,
    rounded to multiples of 8)."""
    kwargs: dict[str, object] = dict(act_layer=act_layer(act), norm_layer=norm_layer(norm), drop_rate=drop_rate)
    if width != 1.0:
        kwargs["channels"] = tuple(make_divisible(c * width, 8) for c in RESNET_CHANNELS)
        kwargs["stem_width"] = make_divisible(RESNET_STEM_WIDTH.get(variant, 64) * width, 8)
    if blurpool:
        kwargs["aa_layer"] = BlurPool
    model = timm.create_model(variant, pretrained=False, num_classes=num_classes, **kwargs)
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    for block in blocks:
        # timm's DropBlock slot: after the bottleneck's 3x3 conv + BN (a basic block's first 3x3),
        # before its activation
        block.drop_block = dropout(block_drop_rate)
        if zero_init_last and norm == "none":
            last_conv = block.conv2 if isinstance(block, BasicBlock) else block.conv3
            nn.init.zeros_(last_conv.weight)
    if blurpool:
        _blur_resnet_stem_and_shortcuts(model, blocks)
    return model


def _blur_resnet_stem_and_shortcuts(model: ResNet, blocks: list[nn.Module]) -> None:
    """Blur the strided convs timm's ``aa_layer`` leaves alone (stem and projection shortcuts).

    Strides are changed in place so the convs keep timm's initialization; padding already gives
    "same" outputs at stride 1 for every kernel involved (7x7 p3, 3x3 p1, 1x1 p0).
    """
    if isinstance(model.conv1, nn.Conv2d):  # 7x7 stem: conv s1 -> BN -> act -> blur -> max -> blur,
        model.conv1.stride = (1, 1)  # i.e. Zhang's own anti-aliased ResNet stem
        model.maxpool = nn.Sequential(BlurPool(model.conv1.out_channels), *model.maxpool)
    else:  # ResNet-D deep stem: the first 3x3 conv carries the stride; blur after its activation
        stem = list(model.conv1)
        stem[0].stride = (1, 1)
        model.conv1 = nn.Sequential(*stem[:3], BlurPool(stem[0].out_channels), *stem[3:])
    for block in blocks:
        shortcut = block.downsample
        if shortcut is None or block.stride == 1:
            continue
        if isinstance(shortcut[0], nn.AvgPool2d):  # ResNet-D: 2x2 average pool -> blur pool (Zhang 2019)
            shortcut[0] = BlurPool(shortcut[1].in_channels)
        else:  # blur before the 1x1 projection: they commute, and blurring the narrower input is cheaper
            shortcut[0].stride = (1, 1)
            block.downsample = nn.Sequential(BlurPool(shortcut[0].in_channels), *shortcut)


def build_mobilenetv2(
    num_classes: int,
    *,
    act: str,
    drop_rate: float,
    block_drop_rate: float,
    norm: str,
    blurpool: bool,
    width: float,
    zero_init_last: bool = False,
) -> EfficientNet:
    """timm's MobileNetV2 (Sandler et al. 2018) from scratch, with the ablation flags applied.

    timm registers only fixed widths (``mobilenetv2_050/075/100/140``), so the model comes from timm's
    generator that they all call, which takes any channel multiplier; ``width=1.0`` is exactly
    ``timm.create_model('mobilenetv2_100')`` (the tests assert it).
    """
    kwargs: dict[str, object] = dict(act_layer=act_layer(act), drop_rate=drop_rate)
    norm_act = norm_act_layer(norm, act)
    if norm != "batch":  # timm's own BatchNorm-act otherwise, so the default model is timm's exactly
        kwargs["norm_layer"] = norm_act
    if blurpool:
        kwargs["aa_layer"] = BlurPool
    model = _gen_mobilenet_v2("mobilenetv2_100", width, num_classes=num_classes, **kwargs)
    for block in model.modules():
        if isinstance(block, (InvertedResidual, DepthwiseSeparableConv)):
            if zero_init_last and norm == "none" and block.has_skip:  # as for ResNet: blocks start as identity
                nn.init.zeros_(
                    block.conv_pwl.weight if isinstance(block, InvertedResidual) else block.conv_pw.weight
                )
            add_dropout_before_projection(block, block_drop_rate)
    if blurpool:  # the stride-2 stem conv is outside timm's aa_layer: conv s1 -> BN -> act -> blur
        model.conv_stem.stride = (1, 1)
        model.bn1 = nn.Sequential(model.bn1, BlurPool(model.conv_stem.out_channels))
    return model


class DropoutThen(nn.Sequential):
    """``dropout`` then ``layer``: where timm's block has no slot for the report's in-block dropout."""

    def __init__(self, dropout_layer: nn.Module, layer: nn.Module) -> None:
        super().__init__(OrderedDict(dropout=dropout_layer, layer=layer))


def add_dropout_before_projection(block: InvertedResidual | DepthwiseSeparableConv, rate: float) -> None:
    """The report's "dropout in all bottlenecks" for a MobileNetV2 block: after the depthwise conv and its
    activation (and timm's empty squeeze-excite slot), on the input of the linear 1x1 projection. A no-op at
    ``rate=0``, so the default model is timm's exactly."""
    if rate == 0:
        return
    name = "conv_pwl" if isinstance(block, InvertedResidual) else "conv_pw"  # the block's projection
    setattr(block, name, DropoutThen(dropout(rate), getattr(block, name)))

