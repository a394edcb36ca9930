"""The report's "Modified MobileNetV2": MobileNetV2's macro structure with a two-pass hybrid block.

Written here because no library has it; it is assembled from timm layers (``ConvNormAct``,
``create_aa``, ``create_classifier``, ``make_divisible``). Section II of the report, read literally:

* Every block sums three branches, ``out = IR(x) + RB(x) + shortcut(x)``, with no activation after
  the sum (MobileNetV2's linear bottleneck).
* IR, MobileNetV2's inverted residual: 1x1 expand to ``h = t * c_in`` (omitted when t = 1), 3x3
  depthwise carrying the stride, 1x1 linear projection to ``c_out``.
* RB, a ResNet bottleneck with "the same number of intermediate channels for both passes", so the same
  ``h``: 1x1 ``c_in -> h`` carrying the stride ("down sampling at the start of every block", i.e. the
  original ResNet v1 placement), 3x3 ``h -> h``, 1x1 ``h -> c_out`` linear projection.
* shortcut: identity when the shape is unchanged, else 1x1 conv with the stride + BN.
* BatchNorm after every conv, the activation (Mish) after every conv but the two projections.

Where the report is silent: the RB's 3x3 is a dense conv (``rb_groups=1``; a 3x3 over ``h = 6 c_in``
channels is what makes the model heavier than ResNet-50: 44.7 M parameters, ~5.8 GMACs at 224 px);
``width`` scales every layer but the 1280-channel head conv as MobileNetV2 does (channels rounded to
multiples of 8, the head kept at 1280 for ``width < 1``); the stride-2 shortcut is a projection, as in
ResNet, since an identity cannot change shape. ``rb_groups > 1`` and ``width < 1`` give lighter variants
for CPU runs; neither is in the report.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, create_aa, create_classifier, make_divisible

from .layers import LayerFactory, dropout

# MobileNetV2's body (Sandler et al. 2018, Table 2; the report's appendix table). Per stage:
# t = expansion ratio (h / c_in), c = output channels, n = blocks, s = stride of the stage's first block
MOBILENETV2_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32  # channels of the 3x3 stride-2 stem conv
HEAD_CHANNELS = 1280  # channels of the 1x1 conv before global pooling
CHANNEL_DIVISOR = 8  # channel counts are rounded to multiples of this, as in MobileNetV2


class HybridBlock(nn.Module):
    """``IR(x) + RB(x) + shortcut(x)``: inverted residual and ResNet bottleneck on one input.

    ``drop_rate`` (probability) puts a dropout in both passes after their 3x3 conv and its activation,
    right before the linear projection: the report's "dropout in all bottlenecks".
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int,
        exp_ratio: int,
        *,
        rb_groups: int = 1,
        act_layer: type[nn.Module] = nn.Mish,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        aa_layer: type[nn.Module] | None = None,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        mid_chs = in_chs * exp_ratio  # h, shared by both passes
        if mid_chs % rb_groups:
            raise ValueError(
                f"rb_groups={rb_groups} does not divide the {mid_chs} intermediate channels of a "
                f"{in_chs}->{out_chs} hybrid block; pick a divisor of every block's width (e.g. 1, 2, 4 or 8)"
            )
        conv = partial(ConvNormAct, act_layer=act_layer, norm_layer=norm_layer)
        self.ir = nn.Sequential(
            OrderedDict(
                expand=conv(in_chs, mid_chs, 1) if exp_ratio != 1 else nn.Identity(),
                dw=conv(mid_chs, mid_chs, 3, stride=stride, groups=mid_chs, aa_layer=aa_layer),
                drop=dropout(drop_rate),
                project=conv(mid_chs, out_chs, 1, apply_act=False),
            )
        )
        self.rb = nn.Sequential(
            OrderedDict(
                reduce=conv(in_chs, mid_chs, 1, stride=stride, aa_layer=aa_layer),
                conv=conv(mid_chs, mid_chs, 3, groups=rb_groups),
                drop=dropout(drop_rate),
                project=conv(mid_chs, out_chs, 1, apply_act=False),
            )
        )
        if stride == 1 and in_chs == out_chs:
            self.shortcut: nn.Module = nn.Identity()
        else:  # blur (if any) before the 1x1 projection: they commute, and the narrower input is cheaper
            use_aa = aa_layer is not None and stride > 1
            self.shortcut = nn.Sequential(
                create_aa(aa_layer, in_chs, stride=stride, enable=use_aa),
                conv(in_chs, out_chs, 1, stride=1 if use_aa else stride, apply_act=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ir(x) + self.rb(x) + self.shortcut(x)


class HybridMobileNetV2(nn.Module):
    """MobileNetV2 whose bottlenecks are ``HybridBlock`` s (the report's final model).

    Args:
        num_classes: classifier outputs.
        width: channel multiplier (MobileNetV2's alpha, > 0: create_model checks it); channels rounded to multiples of 8.
        rb_groups: groups of the ResNet pass's 3x3 conv (1 = the report's dense conv).
        act_layer: activation after every conv but the projections (stem and head included).
        norm_layer: norm(-act) factory for timm's ``ConvNormAct``; ``layers.norm_act_layer('none', ...)``
            removes BatchNorm.
        aa_layer: anti-aliasing (BlurPool) for every stride-2 conv, or None.
        drop_rate: dropout probability before the classifier.
        block_drop_rate: dropout probability inside both passes of every block.
        zero_init_last: zero-init both passes' projection convs so every block starts as its shortcut; the
            ``model.zero_init_last`` flag (``norm='none'`` only), where nothing else keeps the three-branch
            sums from growing block after block (with BN, each pass is normalized). Off by default: the
            report had no such fix.
        stages: (t, c, n, s) rows of the body, MobileNetV2's by default.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        width: float = 1.0,
        rb_groups: int = 1,
        act_layer: type[nn.Module] = nn.Mish,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        aa_layer: type[nn.Module] | None = None,
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
        zero_init_last: bool = False,
        stages: Sequence[tuple[int, int, int, int]] = MOBILENETV2_STAGES,
    ):
        super().__init__()

        def chs(c: int) -> int:
            return make_divisible(c * width, CHANNEL_DIVISOR)

        layer_kwargs = dict(act_layer=act_layer, norm_layer=norm_layer)
        in_chs = chs(STEM_CHANNELS)
        self.stem = ConvNormAct(3, in_chs, 3, stride=2, aa_layer=aa_layer, **layer_kwargs)
        stage_modules = []
        for t, c, n, s in stages:
            blocks = []
            for i in range(n):
                out_chs = chs(c)
                blocks.append(
                    HybridBlock(
                        in_chs,
                        out_chs,
                        s if i == 0 else 1,
                        t,
                        rb_groups=rb_groups,
                        aa_layer=aa_layer,
                        drop_rate=block_drop_rate,
                        **layer_kwargs,
                    )
                )
                in_chs = out_chs
            stage_modules.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stage_modules)
        # MobileNetV2 never narrows the last conv below 1280 (Sandler et al., Section 4)
        self.num_features = max(HEAD_CHANNELS, chs(HEAD_CHANNELS))
        self.head = ConvNormAct(in_chs, self.num_features, 1, **layer_kwargs)
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type="avg")
        self.drop = dropout(drop_rate)
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        # He init on fan-out for convs as in torchvision's MobileNetV2 and timm's ResNet; BN and the
        # classifier keep PyTorch's defaults (gamma 1, beta 0; uniform Linear)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, HybridBlock):
                    nn.init.zeros_(m.ir.project.conv.weight)
                    nn.init.zeros_(m.rb.project.conv.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.global_pool(self.forward_features(x))))
