"""ImageNette / ImageWoof data: sources, verification, the report's transforms, the fast cache and the DataModule."""

from imagenette_lab.data.archives import ArchiveCheck
from imagenette_lab.data.cache import ImageCache
from imagenette_lab.data.cache_build import build_cache
from imagenette_lab.data.datamodule import ImagenetteDataModule
from imagenette_lab.data.datasets import CachedCropDataset, ImageListDataset
from imagenette_lab.data.errors import (
    ArchiveError,
    ChecksumError,
    CorruptImagesError,
    DataError,
    DownloadError,
    LayoutError,
    MissingArchiveError,
    UnsafeArchiveError,
)
from imagenette_lab.data.sources import DATASETS, DatasetSpec, resolve_source
from imagenette_lab.data.transforms import BatchAugment, BatchDraws, TransformSpec, reference_transform
from imagenette_lab.data.verify import NOISE_LEVELS, verify_dataset

__all__ = [
    "DATASETS",
    "NOISE_LEVELS",
    "ArchiveCheck",
    "ArchiveError",
    "BatchAugment",
    "BatchDraws",
    "CachedCropDataset",
    "ChecksumError",
    "CorruptImagesError",
    "DataError",
    "DatasetSpec",
    "DownloadError",
    "ImageCache",
    "ImageListDataset",
    "ImagenetteDataModule",
    "LayoutError",
    "MissingArchiveError",
    "TransformSpec",
    "UnsafeArchiveError",
    "build_cache",
    "reference_transform",
    "resolve_source",
    "verify_dataset",
]
