"""The two pipelines' map-style datasets: decoded JPEGs (``pil``) and crops sliced from the resize cache
(``cached``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info
from torchvision.datasets.folder import pil_loader

from imagenette_lab.data.cache import ImageCache
from imagenette_lab.data.transforms import center_crop_origin


class ImageListDataset(Dataset):
    """(image, label) from a list of files, decoded with PIL to RGB (grayscale/CMYK converted)."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], transform: Callable) -> None:
        self.files = list(files)
        self.labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(pil_loader(str(self.files[i]))), self.labels[i]



class CachedCropDataset(Dataset):
    """Square uint8 crops sliced out of an :class:`ImageCache`: ``(uint8 (3, crop, crop), label)``.

    With ``random_crop`` the corner is uniform over all valid positions, as ``v2.RandomCrop``; otherwise
    the crop is centred as ``v2.CenterCrop``. Draws come from ``generator`` in the main process (each
    epoch continues the stream, so crops differ between epochs yet repeat for a given seed) and from the
    per-worker seeded global RNG inside DataLoader worker processes (a copied generator would repeat
    the same draws in every worker).
    """

    def __init__(
        self,
        cache: ImageCache,
        labels: Sequence[int],
        crop: int,
        random_crop: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        if len(labels) != len(cache):
            raise ValueError(f"{len(labels)} labels for {len(cache)} cached images")
        small = np.flatnonzero((cache.shapes < crop).any(axis=1)) if len(cache) else []
        if small.size:
            raise ValueError(
                f"cached images smaller than data.crop={crop}: {[cache.relpaths[i] for i in small[:5]]}"
            )
        self.cache = cache
        self.labels = [int(v) for v in labels]
        self.crop = crop
        self.random_crop = random_crop
        self.generator = generator

    def __len__(self) -> int:
        return len(self.cache)

    def origin(self, i: int) -> tuple[int, int]:
        """(top, left) of the crop of image ``i``: drawn like v2.RandomCrop, or centred."""
        h, w = self.cache.shape(i)
        if not self.random_crop:
            return center_crop_origin(h, w, self.crop)
        generator = self.generator if get_worker_info() is None else None
        u = torch.rand(2, generator=generator).tolist()  # one call for both offsets: half the overhead
        return int(u[0] * (h - self.crop + 1)), int(u[1] * (w - self.crop + 1))

    def crop_at(self, i: int, top: int, left: int) -> torch.Tensor:
        """The (3, crop, crop) uint8 crop of image ``i`` with its corner at (top, left)."""
        img = self.cache.image(i)[:, top : top + self.crop, left : left + self.crop]
        return torch.from_numpy(np.ascontiguousarray(img))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.crop_at(i, *self.origin(i)), self.labels[i]
