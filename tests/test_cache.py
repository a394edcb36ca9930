"""The cached data path (decode + resize once, crop by slicing, batch augmentation on the device).

Real images only: the mini archive, re-cut to random non-square sizes so that the cache has to keep
variable-size images whole and the resize both shrinks and enlarges.
"""

from __future__ import annotations

import gc
import logging
import pickle
import random
from collections import Counter
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from imagenette_lab.data import BatchAugment, ImagenetteDataModule, TransformSpec, _parallel, build_cache
from imagenette_lab.data.cache import cache_dir, open_cache
from imagenette_lab.data.cache_build import load_resized
from imagenette_lab.data.transforms import reference_transform, resized_size

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
RESIZE, CROP = 96, 80  # px: small enough for 2 CPU cores, and the crop really moves inside the image
TOLERANCE = (
    1e-5  # max |cached - reference| of normalized pixels: float rounding only, the uint8 pixels are identical
)


def make_dm(data_dir: Path, root: Path, **kwargs: object) -> ImagenetteDataModule:
    base = dict(root=root, data_dir=data_dir, resize=RESIZE, crop=CROP, batch_size=8, num_workers=0)
    return ImagenetteDataModule(**{**base, "pipeline": "cached", **kwargs})


def ready(dm: ImagenetteDataModule) -> ImagenetteDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture
def ragged_root(mini_copy: Path) -> Path:
    """The mini set with every image cut to a random size and aspect ratio (40..224 px sides)."""
    rng = random.Random(1)
    for path in sorted(mini_copy.glob("*/*/*.JPEG")):
        w = rng.randint(40, 224)
        h = max(40, min(224, int(w * rng.choice([0.25, 0.6, 1.0, 1.7, 3.0]))))
        left, top = rng.randint(0, 224 - w), rng.randint(0, 224 - h)
        Image.open(path).convert("RGB").crop((left, top, left + w, top + h)).save(path, quality=90)
    return mini_copy


def reference_train(
    path: Path, spec: TransformSpec, top: int, left: int, flip: bool, box: list[int]
) -> torch.Tensor:
    """The ``pil`` pipeline's train transform with the crop/flip/erase draws fixed."""
    img = F.resize(Image.open(path).convert("RGB"), [spec.resize], antialias=True)
    img = F.crop(img, top, left, spec.crop, spec.crop)
    if flip:
        img = F.horizontal_flip(img)
    x = F.normalize(F.to_dtype(F.to_image(img), torch.float32, scale=True), spec.mean, spec.std)
    if box[2] > 0:
        x = F.erase(x, *box, v=torch.tensor(0.0))
    return x


def test_reference_transform_is_the_reports_pipeline() -> None:
    """The functional replay above mirrors what ``reference_transform`` really does (types and numbers)."""
    spec = TransformSpec(resize=RESIZE, crop=CROP)
    train = reference_transform(spec, train=True).transforms
    assert [type(t) for t in train] == [
        v2.Resize,
        v2.RandomCrop,
        v2.RandomHorizontalFlip,
        v2.ToImage,
        v2.ToDtype,
        v2.Normalize,
        v2.RandomErasing,
    ]
    assert train[0].size == [RESIZE] and train[0].antialias and train[1].size == (CROP, CROP)
    assert train[2].p == 0.5 and train[6].p == 0.5 and train[6].scale == (0.02, 0.33)
    assert train[6].ratio == (0.3, 3.3) and train[6].value == [0.0]
    val = reference_transform(spec, train=False).transforms
    assert [type(t) for t in val] == [v2.Resize, v2.CenterCrop, v2.ToImage, v2.ToDtype, v2.Normalize]


def test_cache_keeps_variable_size_images_whole(tmp_path: Path, ragged_root: Path) -> None:
    dm = ready(make_dm(tmp_path, ragged_root))
    cache = dm.train_set.cache
    shapes = set()
    for i, rel in enumerate(cache.relpaths):
        with Image.open(ragged_root / rel) as im:
            expected = resized_size(im.height, im.width, RESIZE)
        assert cache.shape(i) == expected and min(expected) == RESIZE
        shapes.add(expected)
        if i % 10 == 0:  # the very pixels of the reference resize
            assert np.array_equal(
                cache.image(i), np.asarray(load_resized(ragged_root / rel, RESIZE)).transpose(2, 0, 1)
            )
    assert len(shapes) > 50 and any(h > 2 * w for h, w in shapes) and any(w > 2 * h for h, w in shapes)
    # a spawned DataLoader worker gets the cache pickled without its mapping and maps the same build
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.directory == cache.directory and np.array_equal(clone.image(5), cache.image(5))


@pytest.mark.parametrize("device", DEVICES)
def test_cached_equals_pil_reference_for_same_draws(tmp_path: Path, ragged_root: Path, device: str) -> None:
    dm = ready(make_dm(tmp_path, ragged_root, erase_p=1.0))
    spec, data = dm.transform_spec, dm.train_set
    rng = random.Random(2)
    idx = rng.sample(range(len(data)), 48)
    origins = []
    for i in idx:
        h, w = data.cache.shape(i)
        origins.append((rng.randint(0, h - CROP), rng.randint(0, w - CROP)))
    images = torch.stack([data.crop_at(i, *origin) for i, origin in zip(idx, origins, strict=True)]).to(
        device
    )
    draws = dm.augment.sample(
        len(idx), CROP, CROP, torch.device(device), torch.Generator(device).manual_seed(0)
    )
    assert draws.flip.any() and not draws.flip.all() and (draws.erase[:, 2] > 0).sum() > 40
    out = dm.augment.to(device)(images, train=True, draws=draws).cpu()
    diffs = []
    for k, i in enumerate(idx):
        flip, box = bool(draws.flip[k]), draws.erase[k].tolist()
        ref = reference_train(ragged_root / data.cache.relpaths[i], spec, *origins[k], flip, box)
        diffs.append((out[k] - ref).abs().max().item())
    print(f"max |cached - pil| = {max(diffs):.2e}")
    assert max(diffs) <= TOLERANCE, f"max deviation {max(diffs):.2e}"
    # the erased boxes are really there and nothing else is zero
    assert (out == 0).sum().item() == sum(int(h * w * 3) for _, _, h, w in draws.erase.tolist())

    val = dm.augment(images, train=False).cpu()
    ref_val = [
        F.normalize(F.to_dtype(images[k].cpu(), torch.float32, scale=True), spec.mean, spec.std)
        for k in range(len(idx))
    ]
    assert (val - torch.stack(ref_val)).abs().max().item() <= TOLERANCE


def test_validation_center_crop_matches_reference(tmp_path: Path, ragged_root: Path) -> None:
    dm = ready(make_dm(tmp_path, ragged_root))
    ref = reference_transform(dm.transform_spec, train=False)
    images, labels = next(iter(dm.val_dataloader()))
    images, _ = dm.device_transform((images, labels), train=False)
    for k, path in enumerate(dm.val_files[:8]):
        expected = ref(Image.open(path).convert("RGB"))
        assert (images[k] - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("device", DEVICES)
def test_batch_draws_follow_torchvision_distributions(device: str) -> None:
    """Flip/erase draws vs torchvision's RandomErasing: same probability, box area, aspect and position."""
    spec = TransformSpec(resize=RESIZE, crop=CROP)
    ours = BatchAugment(spec).sample(
        20000, CROP, CROP, torch.device(device), torch.Generator(device).manual_seed(1)
    )
    torch.manual_seed(1)
    tv = v2.RandomErasing(p=1.0, scale=spec.erase_scale, ratio=spec.erase_ratio, value=0.0)
    probe = [torch.zeros(3, CROP, CROP)]
    theirs = torch.tensor(
        [[p["i"], p["j"], p["h"], p["w"]] for p in (tv.make_params(probe) for _ in range(4000))]
    )
    erased = ours.erase[ours.erase[:, 2] > 0].cpu().double()
    theirs = theirs[theirs[:, 2] < CROP].double()  # h == crop marks torchvision's "no box fitted"

    def stats(e: torch.Tensor) -> torch.Tensor:
        area = e[:, 2] * e[:, 3] / CROP**2
        aspect = torch.log(e[:, 2] / e[:, 3])
        rows, cols = (e[:, 0] + e[:, 2] / 2) / CROP, (e[:, 1] + e[:, 3] / 2) / CROP
        return torch.stack([area.mean(), area.std(), aspect.mean(), aspect.std(), rows.mean(), cols.mean()])

    assert ours.flip.double().mean().item() == pytest.approx(0.5, abs=0.015)
    assert len(erased) / 20000 == pytest.approx(0.5, abs=0.015)
    # ~5 standard errors of the 4000 torchvision draws for each statistic
    tolerance = torch.tensor([0.008, 0.006, 0.06, 0.03, 0.015, 0.015], dtype=torch.float64)
    gap = (stats(erased) - stats(theirs)).abs()
    assert (gap <= tolerance).all(), f"ours {stats(erased)} vs torchvision {stats(theirs)}"
    assert erased[:, 2].max() < CROP and erased[:, 3].max() < CROP
    assert ((erased[:, 0] + erased[:, 2]) <= CROP).all() and ((erased[:, 1] + erased[:, 3]) <= CROP).all()


def test_same_label_order_and_fresh_crops_each_epoch(tmp_path: Path, mini_root: Path) -> None:
    pil = ready(make_dm(tmp_path, mini_root, pipeline="pil", seed=5))
    cached = ready(make_dm(tmp_path, mini_root, seed=5))
    for _ in range(2):  # same shuffling, epoch after epoch
        pil_labels = torch.cat([y for _, y in pil.train_dataloader()])
        cached_labels = torch.cat([y for _, y in cached.train_dataloader()])
        assert torch.equal(pil_labels, cached_labels)
    assert torch.equal(
        torch.cat([y for _, y in pil.val_dataloader()]), torch.cat([y for _, y in cached.val_dataloader()])
    )
    data = ready(make_dm(tmp_path, mini_root, seed=5)).train_set
    first = [data.origin(i) for i in range(50)]
    second = [data.origin(i) for i in range(50)]
    assert first != second  # crops move between epochs
    again = ready(make_dm(tmp_path, mini_root, seed=5)).train_set
    assert [again.origin(i) for i in range(50)] == first  # ... reproducibly for a given seed
    x, y = next(iter(cached.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (8, 3, CROP, CROP) and y.dtype == torch.int64


def test_cache_reuse_staleness_and_resize_sweep(
    tmp_path: Path, mini_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imagenette_lab")
    dm = ready(make_dm(tmp_path, mini_copy))
    directory = cache_dir(tmp_path, mini_copy, "train", RESIZE)
    first = dm.train_set.cache.directory
    assert first.parent == directory and first.name.startswith("build-")
    stamp = (first / "pixels.u8").stat().st_mtime_ns
    caplog.clear()
    again = ready(make_dm(tmp_path, mini_copy))
    assert "reusing cache" in caplog.text and "built cache" not in caplog.text
    assert again.train_set.cache.directory == first and (first / "pixels.u8").stat().st_mtime_ns == stamp

    # a resize sweep: one cache per size, side by side
    other = ready(make_dm(tmp_path, mini_copy, resize=RESIZE + 16))
    assert first.is_dir() and cache_dir(tmp_path, mini_copy, "train", RESIZE + 16).is_dir()
    assert other.train_set.cache.shape(0) != dm.train_set.cache.shape(0)

    # change one source image: the cache notices and is rebuilt with the new pixels, in a new folder
    rel = dm.train_set.cache.relpaths[7]
    old_pixels = dm.train_set.cache.image(7).copy()
    Image.open(mini_copy / rel).convert("RGB").transpose(Image.Transpose.ROTATE_90).crop(
        (0, 0, 200, 120)
    ).save(mini_copy / rel)
    relpaths = dm.train_set.cache.relpaths
    assert open_cache(directory, mini_copy, relpaths, RESIZE) is None
    caplog.clear()
    fresh = ready(make_dm(tmp_path, mini_copy)).train_set.cache
    assert "stale" in caplog.text and fresh.directory != first
    assert fresh.shape(7) == resized_size(120, 200, RESIZE)
    assert np.array_equal(
        fresh.image(7), np.asarray(load_resized(mini_copy / rel, RESIZE)).transpose(2, 0, 1)
    )
    assert not list(directory.glob(".building*"))
    # the old build is still mapped by dm and again: kept, and still the old pixels
    assert first.is_dir() and np.array_equal(dm.train_set.cache.image(7), old_pixels)

    # once nobody maps them, the next build removes both superseded builds
    superseded = fresh.directory
    del dm, again, fresh
    gc.collect()
    (mini_copy / rel).touch()
    newest = build_cache(mini_copy, relpaths, directory, RESIZE)
    assert not first.exists() and not superseded.exists()
    assert {p.name for p in directory.iterdir() if not p.name.startswith(".")} == {
        "current.json",
        newest.directory.name,
    }


def test_failed_build_leaves_no_cache(tmp_path: Path, mini_copy: Path) -> None:
    relpaths = sorted(p.relative_to(mini_copy).as_posix() for p in mini_copy.glob("val/*/*.JPEG"))
    broken = mini_copy / relpaths[40]
    broken.write_bytes(broken.read_bytes()[:2000])
    target = tmp_path / "cache" / "val"
    with pytest.raises(OSError, match="truncated"):
        build_cache(mini_copy, relpaths, target, RESIZE)
    assert open_cache(target, mini_copy, relpaths, RESIZE) is None
    assert [p.name for p in target.iterdir() if p.name != ".build.lock"] == []  # no pointer, no build


def test_damaged_build_fails_the_check_and_is_rebuilt(tmp_path: Path, mini_root: Path) -> None:
    relpaths = sorted(p.relative_to(mini_root).as_posix() for p in mini_root.glob("val/*/*.JPEG"))
    target = tmp_path / "cache" / "val"
    built = build_cache(mini_root, relpaths, target, RESIZE, workers=1)
    damaged, expected = built.directory, built.image(99).copy()
    del built
    gc.collect()
    pixels = damaged / "pixels.u8"
    pixels.write_bytes(pixels.read_bytes()[:-1000])  # e.g. a disk that lost the end of the file
    assert open_cache(target, mini_root, relpaths, RESIZE) is None
    fresh = build_cache(mini_root, relpaths, target, RESIZE, workers=1)
    assert fresh.directory != damaged and not damaged.exists()
    assert np.array_equal(fresh.image(99), expected)


def test_skipped_corrupt_images_stay_out_of_the_cache(tmp_path: Path, mini_copy: Path) -> None:
    victim = sorted((mini_copy / "train" / "n03888257").glob("*.JPEG"))[0]
    victim.write_bytes(victim.read_bytes()[:3000])
    dm = ready(make_dm(tmp_path, mini_copy, on_corrupt="skip"))
    assert (
        len(dm.train_set) == 199
        and victim.relative_to(mini_copy).as_posix() not in dm.train_set.cache.relpaths
    )


class _Probe(L.LightningModule):
    """A linear classifier that records what the DataModule's device hook hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * CROP * CROP, 10)
        self.seen: list[tuple[str, torch.dtype, int]] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        self.seen.append(("train", x.dtype, int((x == 0).flatten(1).any(1).sum())))
        return nn.functional.cross_entropy(self.fc(x.flatten(1)), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, _ = batch
        self.seen.append(("val", x.dtype, int((x == 0).flatten(1).any(1).sum())))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)  # lr: step size


def test_lightning_calls_the_device_hook(tmp_path: Path, mini_root: Path) -> None:
    dm = make_dm(tmp_path, mini_root, erase_p=1.0)
    probe = _Probe()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        val_check_interval=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(probe, datamodule=dm)
    train = [s for s in probe.seen if s[0] == "train"]
    val = [s for s in probe.seen if s[0] == "val"]
    assert len(train) == 3 and len(val) == 2
    assert all(dtype == torch.float32 for _, dtype, _ in probe.seen)
    assert all(erased == 8 for _, _, erased in train)  # erase_p=1: every training image has its box
    assert all(erased == 0 for _, _, erased in val)  # validation: normalize only


def test_a_first_cached_run_decodes_each_image_once(
    tmp_path: Path, mini_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verification and the resize cache share one decode: on a fresh folder each JPEG is decoded once,
    and a rerun decodes none (the verification record and the cache are both reused)."""
    monkeypatch.setattr(_parallel, "available_cpus", lambda: 1)  # decode in this process, where it is counted
    decoded: Counter[str] = Counter()
    load = ImageFile.ImageFile.load

    def counting_load(self: ImageFile.ImageFile) -> object:
        if self.tile:  # pixels still to decode (a loaded image has no tiles left)
            decoded[Path(self.filename).relative_to(mini_copy).as_posix()] += 1
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    dm = ready(make_dm(tmp_path, mini_copy))
    everything = sorted(p.relative_to(mini_copy).as_posix() for p in mini_copy.glob("*/*/*.JPEG"))
    assert len(everything) == 300 and sorted(decoded) == everything
    assert set(decoded.values()) == {1}, [p for p, n in decoded.items() if n > 1][:5]
    assert len(dm.train_set) == 200 and len(dm.val_set) == 100
    decoded.clear()
    ready(make_dm(tmp_path, mini_copy))
    assert not decoded
