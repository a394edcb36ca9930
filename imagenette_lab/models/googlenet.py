"""GoogLeNet (Inception v1, Szegedy et al. 2015) built by torchvision, with the ablation flags.

torchvision's ``GoogLeNet`` takes its three building blocks as ``blocks=[conv, inception, aux]``. Its own
conv block hard-codes BatchNorm + ``F.relu`` and its aux head an ``F.relu``, so the conv block here is
timm's ``ConvNormAct`` (activation, norm and anti-aliasing as layers) and two thin subclasses add what
torchvision has no argument for: dropout on each Inception block's output and the aux head's activation.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import ConvNormAct
from torchvision.models.googlenet import GoogLeNet as TVGoogLeNet
from torchvision.models.googlenet import Inception as TVInception
from torchvision.models.googlenet import InceptionAux as TVInceptionAux

from .layers import BlurPool, LayerFactory, dropout, max_blur_pool


class Inception(TVInception):
    """torchvision's Inception block followed by dropout on its concatenated output (``block_drop_rate``)."""

    def __init__(self, *args: int, drop_rate: float = 0.0, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.drop = dropout(drop_rate)  # probability; on all four branches' concatenation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(super().forward(x))


class InceptionAux(TVInceptionAux):
    """torchvision's auxiliary head with the network's activation instead of its hard-coded ``F.relu``."""

    def __init__(self, *args: object, act_layer: type[nn.Module] = nn.ReLU, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision fixes the 4x4 pooled grid, so the head works at any input size
        x = torch.flatten(self.conv(nn.functional.adaptive_avg_pool2d(x, (4, 4))), 1)
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class GoogLeNet(TVGoogLeNet):
    """Inception v1 from scratch, torchvision layout (including its 3x3 "5x5" branch).

    ``forward`` returns logits of shape (B, num_classes) except in training with ``aux_logits=True``,
    where it returns the plain tuple ``(logits, aux1_logits, aux2_logits)``: the extra members are the
    auxiliary heads' logits (after inception4a and 4d), whose cross-entropy the training loop adds with
    weight 0.3 each (Szegedy et al. 2015).
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        aux_logits: bool = False,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: LayerFactory | None = None,
        blurpool: bool = False,
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
        aux_drop_rate: float = 0.7,
    ):
        # drop_rate / block_drop_rate / aux_drop_rate: dropout probabilities before the classifier, on every
        # Inception block's output, and inside the aux heads (0.7 as in Szegedy et al. and torchvision)
        # torchvision's BasicConv2d: BatchNorm with eps 1e-3 (unitless variance floor)
        norm_layer = norm_layer or partial(nn.BatchNorm2d, eps=1e-3)
        conv = partial(
            ConvNormAct, act_layer=act_layer, norm_layer=norm_layer, aa_layer=BlurPool if blurpool else None
        )
        super().__init__(
            num_classes=num_classes,
            aux_logits=aux_logits,
            init_weights=True,  # torchvision's truncated-normal init (its default, stated to skip a warning)
            blocks=[
                conv,
                partial(Inception, conv_block=conv, drop_rate=block_drop_rate),
                partial(InceptionAux, conv_block=conv, act_layer=act_layer),
            ],
            dropout=drop_rate,
            dropout_aux=aux_drop_rate,
        )
        if blurpool:  # conv1's stride is blurred by ConvNormAct's aa_layer; the four max-pools here
            for name in ("maxpool1", "maxpool2", "maxpool3", "maxpool4"):
                setattr(self, name, max_blur_pool(getattr(self, name)))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, aux2, aux1 = self._forward(x)  # torchvision's order puts aux2 first
        if self.training and self.aux_logits:
            return logits, aux1, aux2
        return logits
