"""The report's transforms (Section III), as a torchvision reference and as batched device ops.

Reference (``data.pipeline: pil``), per image with torchvision transforms v2 on PIL images:

* train: Resize(shorter side) -> RandomCrop -> RandomHorizontalFlip -> to float [0, 1] -> Normalize
  -> RandomErasing (value 0, i.e. the mean colour after normalisation);
* val: Resize(shorter side) -> CenterCrop (or RandomCrop, see ``val_crop``) -> to float -> Normalize.

Fast path (``data.pipeline: cached``): the deterministic Resize is done once into the cache, the crop is
a slice of the cached uint8 image in the loader, and :class:`BatchAugment` does flip -> normalize ->
erase on whole batches on the training device, drawing from the same distributions as the reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

from imagenette_lab.data.validation import VAL_CROPS, choice, int_at_least, pair

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # per-channel mean of [0, 1] pixels
IMAGENET_STD = (0.229, 0.224, 0.225)  # per-channel std of [0, 1] pixels
ERASE_ATTEMPTS = 10  # boxes torchvision's RandomErasing tries before giving up on an image


@dataclass(frozen=True)
class TransformSpec:
    """Every number of the report's transforms; both pipelines are built from one of these."""

    resize: int = 280  # px, shorter side after Resize
    crop: int = 224  # px, side of the square crop
    val_crop: str = "center"  # center | random (the report's literal choice)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel mean of [0, 1] pixels
    std: tuple[float, float, float] = IMAGENET_STD  # per-channel std of [0, 1] pixels
    hflip_p: float = 0.5  # probability of a horizontal flip (train)
    erase_p: float = 0.5  # probability of RandomErasing (train)
    erase_scale: tuple[float, float] = (0.02, 0.33)  # fraction of the crop area erased
    erase_ratio: tuple[float, float] = (0.3, 3.3)  # aspect ratio (h / w) range of the erased box

    def __post_init__(self) -> None:
        """Check every value once, naming its ``data.*`` key; config lists become tuples."""
        int_at_least("crop", self.crop, 1)
        int_at_least("resize", self.resize, self.crop, low_name="data.crop")
        choice("val_crop", self.val_crop, VAL_CROPS)
        for key in ("hflip_p", "erase_p"):
            value = getattr(self, key)
            if isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"data.{key}={value!r} is a probability and must lie in [0, 1]")
            object.__setattr__(self, key, float(value))
        if min(std := as_triple(self.std, "std")) <= 0:
            raise ValueError(f"data.std={list(self.std)} must be positive")
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "mean", as_triple(self.mean, "mean"))
        object.__setattr__(self, "erase_scale", pair("erase_scale", self.erase_scale, 0.0, 1.0))
        object.__setattr__(self, "erase_ratio", pair("erase_ratio", self.erase_ratio, 0.0, float("inf")))


def resized_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """(h, w) after Resize(shorter): same rule as torchvision (the longer side is truncated)."""
    if width <= height:
        return int(shorter * height / width), shorter
    return shorter, int(shorter * width / height)


def center_crop_origin(height: int, width: int, crop: int) -> tuple[int, int]:
    """(top, left) of a centred ``crop`` x ``crop`` box, rounded exactly as torchvision's CenterCrop."""
    return round((height - crop) / 2.0), round((width - crop) / 2.0)


def reference_transform(spec: TransformSpec, train: bool) -> v2.Compose:
    """The per-image torchvision pipeline of the report, for a PIL image (any size, any aspect)."""
    resize = v2.Resize(spec.resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)]
    if train:
        return v2.Compose(
            [
                resize,
                v2.RandomCrop(spec.crop),
                v2.RandomHorizontalFlip(spec.hflip_p),
                *to_float,
                v2.RandomErasing(spec.erase_p, scale=spec.erase_scale, ratio=spec.erase_ratio, value=0.0),
            ]
        )
    crop = v2.CenterCrop(spec.crop) if spec.val_crop == "center" else v2.RandomCrop(spec.crop)
    return v2.Compose([resize, crop, *to_float])


@dataclass(frozen=True)
class BatchDraws:
    """The random choices of one training batch (so tests can replay the reference with them)."""

    flip: Tensor  # bool (B,): flip image b horizontally
    erase: Tensor  # int64 (B, 4): top, left, height, width of the erased box; height 0 = not erased


class BatchAugment(nn.Module):
    """Flip -> normalize -> random erasing for a uint8 (B, 3, H, W) batch, on the batch's device.

    Written by hand although kornia has batch augmentations with per-image parameters: ours draws
    exactly what torchvision's per-image reference draws (torchvision's RandomErasing puts one box on
    the entire batch when given one; timm's loops over images with Python's RNG), so the cached pipeline
    and the ``pil`` reference are the same distribution, a test checks it, and no dependency is added
    for three small ops. The draws follow torchvision's RandomErasing exactly: with probability ``erase_p``,
    up to 10 attempts of (area fraction ~ U(scale), log aspect ~ U(log ratio)), the first box that
    fits strictly inside the image wins, its corner uniform over the valid positions.
    """

    def __init__(self, spec: TransformSpec) -> None:
        super().__init__()
        self.spec = spec
        # (x / 255 - mean) / std folded into one multiply-subtract: x * scale - shift
        std = torch.tensor(spec.std, dtype=torch.float64)
        mean = torch.tensor(spec.mean, dtype=torch.float64)
        self.register_buffer("scale", (1.0 / (255.0 * std)).float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (mean / std).float().view(1, 3, 1, 1), persistent=False)

    def sample(
        self, batch: int, height: int, width: int, device: torch.device, generator: torch.Generator | None
    ) -> BatchDraws:
        """Draw flips and erase boxes for ``batch`` images of ``height`` x ``width``."""
        s = self.spec

        def rand(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator, device=device)

        flip = rand(batch) < s.hflip_p
        apply = rand(batch) < s.erase_p
        area = height * width
        scale = s.erase_scale[0] + (s.erase_scale[1] - s.erase_scale[0]) * rand(batch, ERASE_ATTEMPTS)
        lo, hi = math.log(s.erase_ratio[0]), math.log(s.erase_ratio[1])
        aspect = torch.exp(lo + (hi - lo) * rand(batch, ERASE_ATTEMPTS))
        # float64 + round-half-even, as torchvision's ``int(round(math.sqrt(...)))``
        h = torch.sqrt(area * scale.double() * aspect.double()).round().long()
        w = torch.sqrt(area * scale.double() / aspect.double()).round().long()
        fits = (h < height) & (w < width)
        first = fits.long().argmax(dim=1, keepdim=True)  # first attempt that fits (0 if none does)
        h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
        apply &= fits.any(dim=1)
        top = (rand(batch) * (height - h + 1)).floor().long()
        left = (rand(batch) * (width - w + 1)).floor().long()
        h, w = h * apply, w * apply
        return BatchDraws(flip=flip, erase=torch.stack([top, left, h, w], dim=1))

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 -> float32 in [0, 1] -> (x - mean) / std, like ToDtype(scale=True) + Normalize."""
        if self.scale.device != images.device:
            self.to(images.device)  # once per device, not one tiny copy per batch
        x = images.to(torch.float32)
        return x.mul_(self.scale).sub_(self.shift)

    def forward(
        self,
        images: Tensor,
        train: bool,
        generator: torch.Generator | None = None,
        draws: BatchDraws | None = None,
    ) -> Tensor:
        """Return the normalized float batch; in ``train`` mode also flipped and erased per image."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a uint8 (B, 3, H, W) batch, got {images.dtype} {tuple(images.shape)}")
        if not train:
            return self.normalize(images)
        b, _, height, width = images.shape
        if draws is None:
            draws = self.sample(b, height, width, images.device, generator)
        flip = draws.flip.to(images.device).view(b, 1, 1, 1)
        x = self.normalize(torch.where(flip, images.flip(-1), images))
        top, left, h, w = draws.erase.to(images.device).unbind(1)
        rows = torch.arange(height, device=images.device).view(1, height)
        cols = torch.arange(width, device=images.device).view(1, width)
        in_rows = (rows >= top.view(b, 1)) & (rows < (top + h).view(b, 1))  # (B, H)
        in_cols = (cols >= left.view(b, 1)) & (cols < (left + w).view(b, 1))  # (B, W)
        box = in_rows.view(b, 1, height, 1) & in_cols.view(b, 1, 1, width)
        return x.masked_fill_(box, 0.0)


def progressive_side(epoch: int, start: int, end: int, first_epoch: int, last_epoch: int, step: int) -> int:
    """Training image side (px) at ``epoch`` under progressive resizing: ``start`` up to ``first_epoch``,
    ``end`` from ``last_epoch`` on, linear in between, rounded to the nearest multiple of ``step`` (and kept
    within [start, end]): few distinct shapes, so a compiled model recompiles only a few times."""
    if epoch >= last_epoch:
        return end
    t = min(1.0, max(0.0, (epoch - first_epoch) / max(1, last_epoch - first_epoch)))
    side = round((start + t * (end - start)) / step) * step
    return int(min(end, max(start, side)))


@dataclass(frozen=True)
class ProgressiveResize:
    """Progressive resizing (the low-resolution-first schedule of FFCV's and fast.ai's fast ImageNet recipes):
    early epochs train on smaller images, which costs about the square of the side less per image, and the
    last epochs at ``data.crop``, the side validation uses. Written here because it is five lines on top of
    our batch pipeline (timm has no epoch-driven equivalent).

    The training crop is still cut at ``data.crop`` from the ``data.resize`` image; the whole batch is then
    scaled down to :func:`progressive_side` with antialiased bilinear interpolation, the same as Resize to
    ``resize * side / crop`` followed by a ``side`` crop: the same content, fewer pixels. ``start=None`` is off.
    """

    start: int | None = None  # px, side of the first epoch's training images; None = every epoch at crop
    end: int = 224  # px, data.crop
    first_epoch: int = 0  # epochs at ``start`` before the ramp begins
    last_epoch: int = 0  # first epoch at ``end``
    step: int = 8  # px, sides are multiples of it

    def __post_init__(self) -> None:
        if self.start is None:
            return
        if isinstance(self.start, bool) or not isinstance(self.start, int) or not 8 <= self.start <= self.end:
            raise ValueError(f"data.progressive.start={self.start!r} must be null (off) or an integer side in px "
                             f"between 8 and data.crop={self.end}")
        if not 0 <= self.first_epoch <= self.last_epoch:
            raise ValueError(f"data.progressive.epochs=[{self.first_epoch}, {self.last_epoch}] must be two epoch "
                             "indices 0 <= first <= last (the ramp from start to data.crop)")
        if self.step < 1:
            raise ValueError(f"data.progressive.step={self.step!r} must be a positive number of px")

    @classmethod
    def from_config(cls, progressive: Mapping[str, Any] | None, crop: int) -> ProgressiveResize:
        """From ``data.progressive`` (``{start, epochs: [first, last], step}``; None = off) and ``data.crop``."""
        prog = dict(progressive or {})
        if set(prog) - {"start", "epochs", "step"} or len(prog.get("epochs", (0, 0))) != 2:
            raise ValueError(f"data.progressive={prog} must have keys start (px or null), epochs ([first, last]) "
                             "and step (px)")
        first, last = prog.get("epochs", (0, 0))
        return cls(prog.get("start"), crop, int(first), int(last), int(prog.get("step", 8)))

    def side(self, epoch: int) -> int:
        """Side (px) of the training images in ``epoch`` (0-based)."""
        if self.start is None:
            return self.end
        return progressive_side(epoch, self.start, self.end, self.first_epoch, self.last_epoch, self.step)

    def __call__(self, images: Tensor, epoch: int) -> Tensor:
        """Scale a float (B, C, crop, crop) batch down to this epoch's side (unchanged when it is ``crop``)."""
        side = self.side(epoch)
        if side == images.shape[-1]:
            return images
        return F.interpolate(images, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def as_triple(values: Sequence[float], key: str) -> tuple[float, float, float]:
    """Validate a per-channel config list (mean/std) and return it as a tuple."""
    vals = tuple(float(v) for v in values)
    if len(vals) != 3:
        raise ValueError(f"data.{key}={list(values)} must have 3 values, one per RGB channel")
    return vals  # type: ignore[return-value]
