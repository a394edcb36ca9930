"""``ImagenetteDataModule``: ImageNette / ImageWoof with the report's transforms, verified before use."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from imagenette_lab import resume
from imagenette_lab.data.cache import ImageCache, cache_dir
from imagenette_lab.data.cache_build import build_cache, caching_decoder
from imagenette_lab.data.datasets import CachedCropDataset, ImageListDataset
from imagenette_lab.data.errors import CorruptImagesError
from imagenette_lab.data.prefetch import PrefetchLoader
from imagenette_lab.data.sources import DATASETS, VARIANTS, file_lock, resolve_source
from imagenette_lab.data.stats import channel_stats, image_sizes, stratified_subset
from imagenette_lab.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchAugment,
    ProgressiveResize,
    TransformSpec,
    reference_transform,
)
from imagenette_lab.data.validation import (
    NORMALIZE,
    ON_CORRUPT,
    PIPELINES,
    choice,
    int_at_least,
)
from imagenette_lab.data.verify import NOISE_LEVELS, SPLITS, Row, VerifiedDataset, verify_dataset

log = logging.getLogger(__name__)

class ImagenetteDataModule(L.LightningDataModule):
    """ImageNette (or ImageWoof) train/val loaders with the report's transforms.

    ``prepare_data()`` (rank 0) resolves the source (``root`` > ``archive`` > official download),
    extracts it, verifies it against the label CSV and decodes every image (remembered per file, so a
    rerun only stats the files), then builds the resize cache when ``pipeline="cached"``.
    ``setup()`` builds the datasets on every rank.

    Batches reaching the model are ``(float32 (B, 3, crop, crop) normalized, int64 (B,))``:

    * ``pipeline="pil"``: the torchvision reference runs per image in the loader workers;
    * ``pipeline="cached"``: the loader yields uint8 crops sliced from the resize cache in the main
      process (``num_workers`` is not used: worker IPC would cost more than the slicing; with CUDA a
      thread slices ``prefetch_batches`` batches ahead into pinned memory, see :mod:`.prefetch`) and
      :meth:`on_after_batch_transfer` (Lightning calls it after moving the batch to the device) flips,
      normalizes and erases the whole batch on that device when ``trainer.training``, and only
      normalizes otherwise. Without a trainer, call :meth:`device_transform` yourself.

    Validation crops are centred by default (``val_crop="center"``); the report literally used the
    training RandomCrop for validation too (``val_crop="random"``), which makes validation accuracy a
    random variable. Constructor arguments are the keys of ``conf/data/imagenette.yaml``.

    ``train_fraction < 1`` trains on a seeded, class-stratified subset of the training split (nested across
    fractions for one seed; validation is always the whole split). ``normalize="dataset"`` replaces
    ``mean``/``std`` by the per-channel statistics of the whole training split after Resize, computed once
    and kept beside the resize cache (see :mod:`imagenette_lab.data.stats`). ``progressive`` (``start``,
    ``epochs``, ``step``) trains the early epochs on smaller images (:class:`.transforms.ProgressiveResize`).

    Random streams: shuffling, training crops, validation crops and the device-side augmentation each
    have their own generator per rank, seeded from ``seed`` by :func:`imagenette_lab.resume.stream_seed`
    and continued from epoch to epoch. :meth:`state_dict` (Lightning puts it into every checkpoint) holds
    all of them, every rank's, so a resumed run draws exactly what the uninterrupted run would have.
    Exact for the cached pipeline and for ``pipeline=pil`` without persistent workers; persistent PIL
    workers keep their own RNG across epochs, which no checkpoint can capture.
    """

    def __init__(
        self,
        dataset: str = "imagenette",
        variant: str = "320",
        root: str | Path | None = None,
        archive: str | Path | None = None,
        data_dir: str | Path = "data",
        num_classes: int = 10,
        label_noise: int = 0,
        on_corrupt: str = "error",
        pipeline: str = "cached",
        resize: int = 280,
        crop: int = 224,
        val_crop: str = "center",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        hflip_p: float = 0.5,
        erase_p: float = 0.5,
        erase_scale: Sequence[float] = (0.02, 0.33),
        erase_ratio: Sequence[float] = (0.3, 3.3),
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_batches: int | None = None,
        drop_last: bool = True,
        seed: int = 0,
        mirror: str | None = None,
        train_fraction: float = 1.0,
        normalize: str = "imagenet",
        progressive: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        choice("dataset", dataset, list(DATASETS))
        variant = str(variant)
        choice("variant", variant, VARIANTS)
        choice("label_noise", label_noise, NOISE_LEVELS)
        choice("on_corrupt", on_corrupt, ON_CORRUPT)
        choice("pipeline", pipeline, PIPELINES)
        choice("normalize", normalize, NORMALIZE)
        stratified_subset([], train_fraction, 0)  # validates data.train_fraction before any data is touched
        self.spec = DATASETS[dataset]
        if num_classes != len(self.spec.classes):
            raise ValueError(
                f"data.num_classes={num_classes} but dataset={dataset} has {len(self.spec.classes)} classes"
            )
        int_at_least("batch_size", batch_size, 1)
        int_at_least("num_workers", num_workers, 0)
        int_at_least("prefetch_batches", prefetch_batches, 0, allow_none=True)
        self.transform_spec = TransformSpec(  # checks its own values
            resize=resize,
            crop=crop,
            val_crop=val_crop,
            mean=mean,  # type: ignore[arg-type]  # any 3 numbers: the spec makes them a tuple
            std=std,  # type: ignore[arg-type]
            hflip_p=hflip_p,
            erase_p=erase_p,
            erase_scale=erase_scale,  # type: ignore[arg-type]
            erase_ratio=erase_ratio,  # type: ignore[arg-type]
        )
        self.variant = variant
        self.root = root
        self.archive = archive
        self.data_dir = Path(data_dir).expanduser()
        self.label_noise = label_noise
        self.on_corrupt = on_corrupt
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.prefetch_batches = prefetch_batches
        self.drop_last = bool(drop_last)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"data.seed={seed!r} (the run's seed) must be an integer >= 0")
        self.seed = seed
        self.mirror = mirror
        self.train_fraction = float(train_fraction)
        self.normalize = normalize
        self.augment = BatchAugment(self.transform_spec)
        self.progressive = ProgressiveResize.from_config(progressive, crop)
        # seeded for this process's rank in setup(); the "augment" stream lives on the batches' device
        self.streams = resume.RandomStreams(seed, cpu=("shuffle", "train_crop", "val_crop"))
        # filled by setup()
        self.verified: VerifiedDataset | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.train_files: list[Path] = []
        self.val_files: list[Path] = []
        self.train_labels = torch.empty(0, dtype=torch.int64)  # labels used for training (label_noise applied)
        self.train_clean_labels = torch.empty(0, dtype=torch.int64)  # the clean labels of the same files
        self.val_labels = torch.empty(0, dtype=torch.int64)  # always clean

    # ------------------------------------------------------------------------------- properties
    @property
    def class_names(self) -> list[str]:
        """Human-readable class names in label order (sorted WordNet ids)."""
        return self.spec.class_names

    @property
    def num_classes(self) -> int:
        """Number of classes (10 for both datasets)."""
        return len(self.spec.classes)

    @property
    def dataset_root(self) -> Path:
        """The verified extracted folder (after ``setup``)."""
        return self._require().root

    # ------------------------------------------------------------------------------- preparation
    def _resolve(self, prepare: bool) -> Path:
        return resolve_source(
            self.spec,
            root=self.root,
            archive=self.archive,
            variant=self.variant,
            data_dir=self.data_dir,
            mirror=self.mirror,
            prepare=prepare,
        )

    def _verify(self, root: Path) -> VerifiedDataset:
        cached = self.pipeline == "cached"  # then the cache build is the verification's decode
        decode_first = caching_decoder(self.data_dir, self.transform_spec.resize) if cached else None
        verified = verify_dataset(root, self.spec, self.num_classes, self.data_dir / "verified", None, decode_first)
        if verified.unreadable:
            bad = sorted(verified.unreadable)
            if self.on_corrupt == "error":
                listing = "\n  ".join(f"{root / p}: {verified.unreadable[p]}" for p in bad)
                raise CorruptImagesError(
                    f"{len(bad)} image(s) under {root} cannot be decoded:\n  {listing}\nReplace them "
                    f"(re-extract the archive) or set data.on_corrupt=skip to train without them.",
                    [str(root / p) for p in bad],
                )
            log.warning("data.on_corrupt=skip: leaving out %d unreadable image(s) under %s", len(bad), root)
        return verified

    def _usable(self, verified: VerifiedDataset, split: str) -> list[Row]:
        return [r for r in verified.split(split) if r.path not in verified.unreadable]

    def _caches(self, verified: VerifiedDataset) -> dict[str, ImageCache]:
        return {
            split: build_cache(
                verified.root,
                [r.path for r in self._usable(verified, split)],
                cache_dir(self.data_dir, verified.root, split, self.transform_spec.resize),
                self.transform_spec.resize,
            )
            for split in SPLITS
        }

    def _record(self, verified: VerifiedDataset, name: str) -> Path:
        """A statistics file kept beside the resize caches of this dataset folder."""
        return cache_dir(self.data_dir, verified.root, "train", self.transform_spec.resize).parent / name

    def _dataset_stats(self, verified: VerifiedDataset, caches: dict[str, ImageCache]) -> dict[str, Any]:
        resize = self.transform_spec.resize
        return channel_stats(verified.root, [r.path for r in self._usable(verified, "train")], resize,
                             self._record(verified, f"stats-train-{resize}px.json"), caches.get("train"))

    def prepare_data(self) -> None:
        """Fetch, extract, verify every image, (``pipeline=cached``) build the resize cache and
        (``normalize=dataset``) compute the training split's mean/std."""
        with file_lock(self.data_dir / ".prepare.lock"):
            verified = self._verify(self._resolve(prepare=True))
            caches = self._caches(verified) if self.pipeline == "cached" else {}
            if self.normalize == "dataset":
                self._dataset_stats(verified, caches)

    def setup(self, stage: str | None = None) -> None:
        """Build the train/val datasets (labels from the CSV, ``label_noise`` for training)."""
        # run.py sets the datamodule up before a trainer exists (rank 0): Lightning's own setup call then
        # reseeds the streams for the other DDP ranks; a stream seeded for its rank is never reseeded
        self.streams.seed_for(self._rank())
        if self.verified is not None:
            return  # Lightning calls setup once per stage (fit, validate, test); the data is the same
        with file_lock(self.data_dir / ".prepare.lock"):
            verified = self._verify(self._resolve(prepare=False))
            caches = self._caches(verified) if self.pipeline == "cached" else {}  # built by prepare_data
            if self.normalize == "dataset":  # computed by prepare_data: read back here
                stats = self._dataset_stats(verified, caches)
                self.transform_spec = replace(self.transform_spec, mean=tuple(stats["mean"]), std=tuple(stats["std"]))
                self.augment = BatchAugment(self.transform_spec)  # Normalize of both pipelines reads the spec
        train_rows, val_rows = self._usable(verified, "train"), self._usable(verified, "val")
        keep = stratified_subset([r.wnid for r in train_rows], self.train_fraction, self.seed)  # all when 1.0
        index = {w: i for i, w in enumerate(self.spec.wnids)}
        labels = torch.tensor([index[r.noisy[self.label_noise]] for r in train_rows])  # the whole split
        self.train_files = [verified.root / train_rows[i].path for i in keep]
        self.train_labels = labels[keep]
        self.train_clean_labels = torch.tensor([index[train_rows[i].wnid] for i in keep])
        self.val_files = [verified.root / r.path for r in val_rows]
        self.val_labels = torch.tensor([index[r.wnid] for r in val_rows])
        spec = self.transform_spec
        if self.pipeline == "pil":
            self.train_set = ImageListDataset(
                self.train_files, self.train_labels.tolist(), reference_transform(spec, True)
            )
            self.val_set = ImageListDataset(
                self.val_files, self.val_labels.tolist(), reference_transform(spec, False)
            )
        else:
            # separate train and validation crop streams: how many validation batches run (sanity checks,
            # limit_val_batches) must not move the training crops
            whole = CachedCropDataset(
                caches["train"], labels, spec.crop, True, generator=self.streams.cpu["train_crop"]
            )
            # the cache holds the whole split (one cache for every fraction): a subset indexes into it
            self.train_set = whole if len(keep) == len(train_rows) else Subset(whole, keep)
            self.val_set = CachedCropDataset(
                caches["val"], self.val_labels, spec.crop, spec.val_crop == "random", self.streams.cpu["val_crop"]
            )
        self.verified = verified
        log.info("%s: %d train (train_fraction=%g) / %d val images, label_noise=%d%% (%d training labels differ "
                 "from the clean ones), normalize=%s: mean %s, std %s", verified.root.name, len(self.train_files),
                 self.train_fraction, len(val_rows), self.label_noise,
                 int((self.train_labels != self.train_clean_labels).sum()), self.normalize,
                 [round(v, 4) for v in spec.mean], [round(v, 4) for v in spec.std])

    @property
    def normalization(self) -> dict[str, Any]:
        """The per-channel mean/std the batches are normalized with (after ``setup``), and where they came from."""
        spec = self.transform_spec
        return {"normalize": self.normalize, "mean": list(spec.mean), "std": list(spec.std)}

    def image_sizes(self) -> dict[str, Any]:
        """Stored image sizes per split, ``{split: {"images", "min": [h, w], "max": [h, w], "square"}}``, read
        from the file headers once per dataset folder (after ``setup``): which archive a result came from."""
        verified = self._require()
        splits = {s: [r.path for r in self._usable(verified, s)] for s in SPLITS}
        return image_sizes(verified.root, splits, self._record(verified, "image-sizes.json"))

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _require(self) -> VerifiedDataset:
        if self.verified is None:
            raise RuntimeError("call prepare_data() and setup() before using the datamodule's data")
        return self.verified

    # ------------------------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        self._require()
        # The cached pipeline slices crops in the main process: a memory-mapped slice costs less than
        # shipping the crop from a worker process through shared memory (measured: worker IPC alone
        # caps below the in-process slicing rate), so num_workers only applies to the pil pipeline.
        workers = self.num_workers if self.pipeline == "pil" else 0
        if self.pipeline == "cached":
            loader, extra = PrefetchLoader, {"prefetch_batches": self.resolved_prefetch_batches}
        else:
            loader, extra = DataLoader, {}
        return loader(
            dataset,
            **extra,
            batch_size=self.batch_size,
            shuffle=train,
            # one generator for the whole run: each epoch gets a new, reproducible permutation (and, with
            # workers, new worker seeds: the DataLoader draws its base seed from it at every epoch)
            generator=self.streams.cpu["shuffle"] if train else None,
            drop_last=self.drop_last and train,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
        )

    @property
    def resolved_prefetch_batches(self) -> int:
        """Cached pipeline: batches sliced ahead in a thread; auto (None) = 2 with CUDA, 0 on a CPU (where
        the thread would only take a core from the training step)."""
        if self.prefetch_batches is not None:
            return self.prefetch_batches
        return 2 if torch.cuda.is_available() else 0

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training batches; the last incomplete batch dropped when ``drop_last``."""
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in file order."""
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """The official split has no test set: the validation set doubles as test set."""
        return self._loader(self.val_set, train=False)

    # ------------------------------------------------------------------------------- device-side ops
    def device_transform(
        self, batch: tuple[torch.Tensor, torch.Tensor], train: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached pipeline, on the batch's device (GPU or CPU): uint8 crops -> normalized float32 (flip + erase
        too when ``train``)."""
        images, labels = batch
        generator = self.streams.device_stream("augment", images.device, self._rank()) if train else None
        return self.augment(images, train=train, generator=generator), labels

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning hook, on the device: :meth:`device_transform` for the cached pipeline, then (training, either
        pipeline) the epoch's progressive resizing."""
        train = self.trainer is not None and self.trainer.training
        if self.pipeline == "cached":
            batch = self.device_transform(batch, train=train)
        if train:  # identity in the epochs at data.crop (and always when data.progressive.start is null)
            images, labels = batch
            batch = self.progressive(images, self.trainer.current_epoch), labels
        return batch

    # ------------------------------------------------------------------------------- random-stream state
    def state_dict(self) -> dict[str, Any]:
        """Every rank's random-stream states (Lightning saves this in checkpoints; call on all ranks)."""
        return {"seed": self.seed, "ranks": resume.gather_per_rank(self.streams.states())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the random streams of a checkpoint (Lightning calls this after ``setup``)."""
        if state_dict.get("seed") != self.seed:  # e.g. mode=eval of another seed's checkpoint: keep ours
            log.warning("the checkpoint's data streams were seeded with seed=%s, this run has seed=%s: they are "
                        "not restored", state_dict.get("seed"), self.seed)
            return
        world = self.trainer.world_size if self.trainer is not None else 1
        mine = resume.pick_rank(list(state_dict["ranks"]), self._rank(), world, "data streams")
        self.streams.set_states(mine or {})
