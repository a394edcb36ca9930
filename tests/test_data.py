"""ImagenetteDataModule on real images: sources, extraction, verification, labels, transforms, errors.

Every broken input is built in a tmp dir from the real mini archive (300 JPEGs, 20 train + 10 val per
class). The data path runs at 64 px / 56 px crops to stay cheap on 2 cores; the full 224 archive is
prepared once in the slow test.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import io
import json
import logging
import multiprocessing
import os
import random
import shutil
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from imagenette_lab.data import (
    ArchiveCheck,
    ArchiveError,
    ChecksumError,
    CorruptImagesError,
    DownloadError,
    ImagenetteDataModule,
    LayoutError,
    MissingArchiveError,
    UnsafeArchiveError,
)
from imagenette_lab.data.archives import check_archive, download_archive, published_checks
from imagenette_lab.data.prefetch import PrefetchLoader
from imagenette_lab.data.sources import DATASETS, VARIANTS, extract_once
from imagenette_lab.data.transforms import ProgressiveResize, progressive_side

REPO = Path(__file__).resolve().parents[1]
WNIDS = DATASETS["imagenette"].wnids
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
SMALL = dict(resize=64, crop=56, batch_size=8, num_workers=0, pipeline="pil")  # px, px, images, procs


def make_dm(data_dir: Path, **kwargs: object) -> ImagenetteDataModule:
    return ImagenetteDataModule(data_dir=data_dir, **{**SMALL, **kwargs})


def ready(dm: ImagenetteDataModule) -> ImagenetteDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def csv_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "noisy_imagenette.csv", newline="") as f:
        return list(csv.DictReader(f))


def truncate(path: Path, keep: float = 0.4) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served by a real HTTP server on 127.0.0.1 (the download path without internet)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None  # keep pytest output clean
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------ happy path
def test_archive_extract_verify_batches(
    tmp_path: Path, mini_archive: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imagenette_lab")
    dm = ready(make_dm(tmp_path, archive=mini_archive))
    root = tmp_path / "imagenette2-224-mini"
    assert dm.dataset_root == root and (root / "train" / WNIDS[0]).is_dir()
    assert "data source: local archive" in caplog.text
    assert len(dm.train_set) == 200 and len(dm.val_set) == 100
    assert dm.class_names[:3] == ["tench", "English springer", "cassette player"] and dm.num_classes == 10

    low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
    seen = []
    for images, labels in dm.train_dataloader():
        assert images.shape == (8, 3, 56, 56) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and labels.shape == (8,)
        assert (images >= low - 1e-5).all() and (images <= high + 1e-5).all()
        seen.append(labels)
    # one epoch sees every training label once (200 = 25 full batches, nothing dropped)
    assert torch.equal(torch.cat(seen).sort().values, dm.train_labels.sort().values)
    assert torch.bincount(dm.train_labels, minlength=10).tolist() == [20] * 10
    images, labels = next(iter(dm.val_dataloader()))
    assert torch.equal(labels, dm.val_labels[:8])  # validation keeps file order
    assert torch.equal(next(iter(dm.test_dataloader()))[1], labels)  # no official test split: val
    folder_labels = [WNIDS.index(p.parent.name) for p in dm.val_files[:8]]
    assert labels.tolist() == folder_labels
    assert images.std() > 0.3  # real pixels, not a constant

    # second run: nothing extracted or decoded again (same folder, same marker, same verification record)
    marker = tmp_path / "imagenette2-224-mini.tgz.extracted.json"
    record = next((tmp_path / "verified").glob("*.json"))
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (root, marker, record)]
    caplog.clear()
    again = ready(make_dm(tmp_path, archive=mini_archive))
    assert again.dataset_root == root
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (root, marker, record)] == before
    assert "reusing" in caplog.text and "unchanged since the last verification" in caplog.text
    assert "decoding" not in caplog.text and f"extracted {mini_archive} ->" not in caplog.text


def test_touched_archive_reuses_its_extraction_a_changed_one_does_not(
    tmp_path: Path, mini_archive: Path, mini_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A shared disk copied again gives the archive a new date: same bytes, so no second extraction (nor
    cache); other bytes are extracted into a new folder and the old one is kept."""
    caplog.set_level(logging.INFO, logger="imagenette_lab")
    archive = tmp_path / "archives" / mini_archive.name
    archive.parent.mkdir()
    shutil.copy2(mini_archive, archive)
    data_dir = tmp_path / "data"
    first = extract_once(archive, data_dir)
    marker = data_dir / f"{archive.name}.extracted.json"
    assert json.loads(marker.read_text())["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()

    os.utime(archive, ns=(time.time_ns(), time.time_ns()))
    caplog.clear()
    assert extract_once(archive, data_dir) == first
    assert "the same bytes" in caplog.text and f"extracted {archive} ->" not in caplog.text
    assert json.loads(marker.read_text())["mtime_ns"] == archive.stat().st_mtime_ns  # recorded: next run is quick
    caplog.clear()
    assert extract_once(archive, data_dir) == first and "the same bytes" not in caplog.text

    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:  # the same images, other bytes
        tar.add(mini_root, arcname=mini_root.name)
    second = extract_once(archive, data_dir)
    assert second != first and first.is_dir() and second.is_dir()
    assert "its bytes differ" in caplog.text
    assert sorted(p.relative_to(second) for p in second.rglob("*.JPEG")) == sorted(
        p.relative_to(first) for p in first.rglob("*.JPEG")
    )


def test_seeded_shuffling_is_reproducible_and_changes_per_epoch(tmp_path: Path, mini_root: Path) -> None:
    def epochs(seed: int) -> list[list[int]]:
        dm = ready(make_dm(tmp_path, root=mini_root, seed=seed))
        loader = dm.train_dataloader()
        return [torch.cat([y for _, y in loader]).tolist() for _ in range(2)]

    a, b, c = epochs(1), epochs(1), epochs(2)
    assert a == b  # same seed, same order
    assert a[0] != a[1]  # a new permutation each epoch
    assert a[0] != c[0]


def _prepare_in_child(data_dir: Path, archive: Path) -> None:
    dm = make_dm(data_dir, archive=archive)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 200


def test_parallel_jobs_share_one_data_dir(tmp_path: Path, mini_archive: Path) -> None:
    """Sweep jobs started together: one prepares, the others wait and reuse (no half-deleted folders)."""
    context = multiprocessing.get_context("fork")
    jobs = [context.Process(target=_prepare_in_child, args=(tmp_path, mini_archive)) for _ in range(3)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    assert [job.exitcode for job in jobs] == [0, 0, 0]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "imagenette2-224-mini",
        "imagenette2-224-mini.tgz.extracted.json",
        "verified",
    ]


def test_root_wins_over_archive(tmp_path: Path, mini_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="imagenette_lab")
    dm = ready(make_dm(tmp_path, root=mini_root, archive=tmp_path / "not-there.tgz"))
    assert dm.dataset_root == mini_root
    assert "data source: extracted folder" in caplog.text
    assert not (tmp_path / "imagenette2-224-mini").exists()  # nothing extracted


def test_label_noise_50_follows_the_csv(tmp_path: Path, mini_root: Path) -> None:
    dm = ready(make_dm(tmp_path, root=mini_root, label_noise=50))
    rows = {r["path"]: r for r in csv_rows(mini_root)}
    expected = [
        WNIDS.index(rows[p.relative_to(mini_root).as_posix()]["noisy_labels_50"]) for p in dm.train_files
    ]
    assert dm.train_labels.tolist() == expected
    clean = [WNIDS.index(p.parent.name) for p in dm.train_files]
    assert dm.train_clean_labels.tolist() == clean
    changed = (dm.train_labels != dm.train_clean_labels).float().mean().item()
    assert changed == pytest.approx(0.52, abs=0.005)  # 104 of 200 in the mini CSV: "about half"
    assert dm.val_labels.tolist() == [WNIDS.index(p.parent.name) for p in dm.val_files]  # always clean
    # and the loader really serves the noisy labels
    assert torch.equal(
        torch.cat([y for _, y in dm.train_dataloader()]).sort().values, dm.train_labels.sort().values
    )


def test_imagewoof_config_and_mismatch(tmp_path: Path, mini_root: Path) -> None:
    dm = make_dm(tmp_path, root=mini_root, dataset="imagewoof")
    assert dm.class_names[0] == "Shih-Tzu" and "Samoyed" in dm.class_names and len(dm.class_names) == 10
    assert DATASETS["imagewoof"].url("320") == "https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2-320.tgz"
    # every official archive name maps to a published check: none would be used unchecked
    unchecked = [
        spec.archive_name(v)
        for spec in DATASETS.values()
        for v in VARIANTS
        if not published_checks(spec.archive_name(v))
    ]
    assert unchecked == []
    with pytest.raises(LayoutError, match="set data=imagenette"):
        dm.prepare_data()


# ------------------------------------------------------------------------------------------ subsets, statistics
@pytest.mark.parametrize("pipeline", ["cached", "pil"])
def test_train_fraction_is_a_seeded_stratified_subset(tmp_path: Path, mini_root: Path, pipeline: str) -> None:
    def files(fraction: float, seed: int) -> list[Path]:
        dm = make_dm(tmp_path, root=mini_root, pipeline=pipeline, train_fraction=fraction, seed=seed)
        return ready(dm).train_files

    dm = ready(make_dm(tmp_path, root=mini_root, pipeline=pipeline, train_fraction=0.25, seed=3, label_noise=50))
    full = ready(make_dm(tmp_path, root=mini_root, pipeline=pipeline, seed=3, label_noise=50))
    # 20 training images per class in the mini archive: a quarter is 5 of each, validation untouched
    assert len(dm.train_set) == 50 and len(dm.val_set) == 100 and len(full.train_set) == 200
    assert torch.bincount(dm.train_clean_labels, minlength=10).tolist() == [5] * 10
    assert set(dm.train_files) < set(full.train_files)
    # labels follow the chosen files (noisy ones included), and one epoch serves exactly the subset
    by_file = dict(zip(full.train_files, full.train_labels.tolist(), strict=True))
    assert dm.train_labels.tolist() == [by_file[f] for f in dm.train_files]
    served = torch.cat([y for _, y in dm.train_dataloader()])
    assert len(served) == 48 and set(served.tolist()) <= set(dm.train_labels.tolist())  # drop_last: 6 x 8
    # seeded: same seed, same subset; another seed, another; a smaller fraction nests in a larger one
    assert files(0.25, 3) == dm.train_files and files(0.25, 4) != dm.train_files
    assert set(dm.train_files) < set(files(0.5, 3))
    assert full.train_files == files(1.0, 3)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_prefetching_loader_serves_the_plain_loaders_batches(tmp_path: Path, mini_root: Path, fraction: float) -> None:
    """The cached pipeline's thread-prefetched loader (the GPU default) yields exactly the plain loader's
    batches, epoch after epoch, random validation crops and a train_fraction subset included, and leaves
    the random streams where the plain loader leaves them after full epochs."""
    def epochs(prefetch: int) -> tuple[list[torch.Tensor], dict]:
        dm = ready(make_dm(tmp_path, root=mini_root, pipeline="cached", train_fraction=fraction, val_crop="random",
                           seed=5, prefetch_batches=prefetch))
        assert isinstance(dm.train_dataloader(), PrefetchLoader)
        assert dm.train_dataloader().prefetch_batches == prefetch
        out = []
        for _ in range(2):
            for loader in (dm.train_dataloader(), dm.val_dataloader()):
                for x, y in loader:
                    assert x.dtype == torch.uint8 and y.dtype == torch.int64
                    out += [x, y]
        return out, dm.streams.states()

    plain, plain_states = epochs(0)
    ahead, ahead_states = epochs(2)
    assert len(plain) == len(ahead) > 8
    assert all(torch.equal(a, b) for a, b in zip(plain, ahead, strict=True))
    assert plain_states.keys() == ahead_states.keys()
    assert all(torch.equal(v["state"], ahead_states[k]["state"]) for k, v in plain_states.items())
    # a loop that stops early closes the thread (Lightning's limit_train_batches does this)
    dm = ready(make_dm(tmp_path, root=mini_root, pipeline="cached", prefetch_batches=3))
    first = next(iter(dm.train_dataloader()))
    assert first[0].shape[0] == dm.batch_size
    with pytest.raises(ValueError, match="prefetch_batches"):
        make_dm(tmp_path, root=mini_root, prefetch_batches=-1)


def _pooled_stats(paths: list[Path], resize: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std over every pixel of the images after the reference Resize (independent of the
    data module's cache: PIL decode, torchvision resize, numpy sums)."""
    import numpy as np
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    total, squares, count = np.zeros(3), np.zeros(3), 0
    for path in paths:
        im = F.resize(Image.open(path).convert("RGB"), [resize], interpolation=InterpolationMode.BILINEAR,
                      antialias=True)
        x = np.asarray(im, dtype=np.float64).reshape(-1, 3) / 255
        total, squares, count = total + x.sum(0), squares + (x**2).sum(0), count + len(x)
    mean = total / count
    return mean.tolist(), np.sqrt(squares / count - mean**2).tolist()


def test_normalize_dataset_uses_the_training_split_statistics(tmp_path: Path, mini_copy: Path) -> None:
    dm = ready(make_dm(tmp_path, root=mini_copy, pipeline="cached", normalize="dataset", train_fraction=0.5))
    mean, std = _pooled_stats(sorted(mini_copy.glob("train/*/*.JPEG")), 64)  # the whole split, not the subset
    assert list(dm.transform_spec.mean) == pytest.approx(mean, abs=1e-6)
    assert list(dm.transform_spec.std) == pytest.approx(std, abs=1e-6)
    assert dm.normalization == {"normalize": "dataset", "mean": list(dm.transform_spec.mean),
                                "std": list(dm.transform_spec.std)}
    assert abs(mean[0] - MEAN.flatten()[0].item()) > 1e-3  # ImageNet's are not what was used
    # batches are normalized with them: (x / 255 - mean) / std of the raw uint8 crop
    raw, _ = dm.val_set[0]
    got = dm.device_transform((raw[None], torch.zeros(1, dtype=torch.int64)), train=False)[0][0]
    want = (raw.double() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    # the pil pipeline normalizes with the same numbers (computed without the cache)
    pil = ready(make_dm(tmp_path / "other", root=mini_copy, pipeline="pil", normalize="dataset"))
    assert list(pil.transform_spec.mean) == pytest.approx(mean, abs=1e-6)
    # computed once: the record beside the resize cache is reused as long as the training files are the same
    (record,) = tmp_path.glob("cache/*/stats-train-64px.json")
    stamp = record.stat().st_mtime_ns
    assert list(ready(make_dm(tmp_path, root=mini_copy, normalize="dataset")).transform_spec.mean) == pytest.approx(mean)
    assert record.stat().st_mtime_ns == stamp
    victim = sorted(mini_copy.glob("train/*/*.JPEG"))[0]
    Image.open(victim).convert("RGB").point(lambda v: 255 - v).save(victim, quality=95)  # a changed image
    changed = ready(make_dm(tmp_path, root=mini_copy, normalize="dataset")).transform_spec.mean
    assert record.stat().st_mtime_ns != stamp and list(changed) != pytest.approx(mean, abs=1e-6)
    # and the default stays ImageNet's
    assert ready(make_dm(tmp_path, root=mini_copy)).transform_spec.mean == (0.485, 0.456, 0.406)


# ------------------------------------------------------------------------------------------ images
def test_grayscale_and_cmyk_become_rgb(tmp_path: Path, mini_copy: Path) -> None:
    converted = []
    for i, path in enumerate(sorted((mini_copy / "val" / WNIDS[0]).glob("*.JPEG"))[:4]):
        mode = "L" if i % 2 == 0 else "CMYK"
        Image.open(path).convert(mode).save(path, quality=90)
        converted.append(path.name)
    assert {Image.open(mini_copy / "val" / WNIDS[0] / n).mode for n in converted} == {"L", "CMYK"}
    dm = ready(make_dm(tmp_path, root=mini_copy))
    images, _ = next(iter(dm.val_dataloader()))  # first val batch = the first tench files
    assert images.shape == (8, 3, 56, 56)
    gray = images[0]  # a grayscale source: the three channels carry the same pixels
    torch.testing.assert_close((gray[0] * 0.229 + 0.485), (gray[1] * 0.224 + 0.456), atol=1e-5, rtol=0)


def test_non_square_variable_size_images(tmp_path: Path, mini_copy: Path) -> None:
    rng = random.Random(0)
    shapes = set()
    for path in sorted(mini_copy.glob("*/*/*.JPEG")):
        im = Image.open(path).convert("RGB")
        w = rng.randint(60, 224)
        h = max(40, min(224, int(w * rng.choice([0.3, 0.5, 0.75, 1.33, 2.0, 3.5]))))
        left, top = rng.randint(0, 224 - w), rng.randint(0, 224 - h)
        im.crop((left, top, left + w, top + h)).save(path, quality=92)
        shapes.add((h, w))
    assert len(shapes) > 100 and any(h > 2 * w for h, w in shapes) and any(w > 2 * h for h, w in shapes)
    dm = ready(make_dm(tmp_path, root=mini_copy, val_crop="random"))
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        n = 0
        for images, labels in loader:
            assert images.shape[1:] == (3, 56, 56) and torch.isfinite(images).all()
            n += len(labels)
        assert n in (200, 100)
    # the stored sizes a page quotes (which archive a result came from), read back from the files
    for split, files in (("train", dm.train_files), ("val", dm.val_files)):
        hw = [Image.open(f).size[::-1] for f in files]
        got = dm.image_sizes()[split]
        assert got["images"] == len(files) and got["min"] == [min(h for h, _ in hw), min(w for _, w in hw)]
        assert got["max"] == [max(h for h, _ in hw), max(w for _, w in hw)]
        assert got["square"] == pytest.approx(sum(h == w for h, w in hw) / len(hw))


# ------------------------------------------------------------------------------------------ bad data
def test_corrupt_jpegs_are_all_reported_then_skippable(
    tmp_path: Path, mini_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = [sorted((mini_copy / "train" / w).glob("*.JPEG"))[3] for w in WNIDS[:2]]
    bad.append(sorted((mini_copy / "val" / WNIDS[5]).glob("*.JPEG"))[0])
    for path in bad:
        truncate(path)
    with pytest.raises(CorruptImagesError) as err:
        make_dm(tmp_path, root=mini_copy).prepare_data()
    assert sorted(err.value.paths) == sorted(map(str, bad))
    for path in bad:
        assert str(path) in str(err.value)
    assert "data.on_corrupt=skip" in str(err.value)

    caplog.set_level(logging.WARNING, logger="imagenette_lab")
    dm = ready(make_dm(tmp_path, root=mini_copy, on_corrupt="skip"))
    assert "leaving out 3 unreadable image(s)" in caplog.text
    assert len(dm.train_set) == 198 and len(dm.val_set) == 99
    assert not set(map(str, bad)) & {str(p) for p in dm.train_files + dm.val_files}
    assert sum(len(y) for _, y in dm.val_dataloader()) == 99


def test_image_damaged_after_verification_is_caught(tmp_path: Path, mini_copy: Path) -> None:
    ready(make_dm(tmp_path, root=mini_copy))
    victim = sorted((mini_copy / "val" / WNIDS[9]).glob("*.JPEG"))[2]
    truncate(victim, keep=0.5)
    with pytest.raises(CorruptImagesError, match=victim.name):
        make_dm(tmp_path, root=mini_copy).prepare_data()


def test_missing_and_extra_files_are_listed(tmp_path: Path, mini_copy: Path) -> None:
    gone = sorted((mini_copy / "train" / WNIDS[3]).glob("*.JPEG"))[0]
    gone.unlink()
    stray = mini_copy / "val" / WNIDS[7] / "n03425413_stray.JPEG"
    shutil.copy(sorted((mini_copy / "val" / WNIDS[7]).glob("*.JPEG"))[0], stray)
    with pytest.raises(LayoutError) as err:
        make_dm(tmp_path, root=mini_copy).prepare_data()
    msg = str(err.value)
    assert f"train/{WNIDS[3]}/{gone.name}" in msg and "val/n03425413/n03425413_stray.JPEG" in msg
    assert f"train/{WNIDS[3]}: 20 in the CSV, 19 on disk" in msg
    assert "val/n03425413: 10 in the CSV, 11 on disk" in msg
    assert "1 file(s) listed in the CSV are missing and 1 file(s) on disk are not in the CSV" in msg


def write_csv(root: Path, rows: list[dict[str, str]]) -> None:
    with open(root / "noisy_imagenette.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_csv_that_disagrees_with_files(tmp_path: Path, mini_copy: Path) -> None:
    original = csv_rows(mini_copy)
    rows = [dict(r) for r in original]
    dropped = rows.pop(0)["path"]
    template = next(r for r in rows if r["path"].startswith("train/n01440764/"))
    rows.append({**template, "path": "train/n01440764/n01440764_99999.JPEG"})
    write_csv(mini_copy, rows)
    with pytest.raises(LayoutError) as err:
        make_dm(tmp_path, root=mini_copy).prepare_data()
    assert dropped in str(err.value) and "n01440764_99999.JPEG" in str(err.value)

    # same files, but a clean label that contradicts the folder the file is in
    rows = [dict(r) for r in original]
    rows[5]["noisy_labels_0"] = next(w for w in WNIDS if w != rows[5]["noisy_labels_0"])
    write_csv(mini_copy, rows)
    with pytest.raises(LayoutError, match=r"line 7: noisy_labels_0=n0\d+ but the file is in n0\d+/"):
        make_dm(tmp_path, root=mini_copy).prepare_data()


def test_empty_class_folder(tmp_path: Path, mini_copy: Path) -> None:
    for path in (mini_copy / "val" / WNIDS[4]).glob("*.JPEG"):
        path.unlink()
    with pytest.raises(LayoutError, match=rf"empty class folder\(s\) \['val/{WNIDS[4]}'\]"):
        make_dm(tmp_path, root=mini_copy).prepare_data()


# ------------------------------------------------------------------------------------------ bad archives
def test_missing_archive(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "imagenette2-320.tgz"
    with pytest.raises(
        MissingArchiveError, match=r"data\.archive=.*nowhere/imagenette2-320\.tgz does not exist"
    ):
        make_dm(tmp_path, archive=missing).prepare_data()
    with pytest.raises(MissingArchiveError, match=r"data\.root=.* is not a folder"):
        make_dm(tmp_path, root=tmp_path / "nothing-here").prepare_data()


def test_truncated_archive(tmp_path: Path, mini_archive: Path) -> None:
    broken = tmp_path / "imagenette2-224-mini.tgz"
    broken.write_bytes(mini_archive.read_bytes()[: mini_archive.stat().st_size * 6 // 10])
    with pytest.raises(ArchiveError, match="truncated or corrupt"):
        make_dm(tmp_path / "data", archive=broken).prepare_data()
    assert not (tmp_path / "data" / "imagenette2-224-mini").exists()
    assert not list((tmp_path / "data").glob(".*extracting*"))  # the partial extraction is gone


def test_archive_with_parent_member_is_refused(tmp_path: Path, mini_archive: Path) -> None:
    evil = tmp_path / "evil.tgz"
    with tarfile.open(mini_archive) as src, tarfile.open(evil, "w:gz") as dst:
        payload = next(p for p in src.getnames() if p.endswith(".JPEG"))
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        data = src.extractfile(payload).read()
        escape = tarfile.TarInfo("imagenette2-224-mini/../../escaped.JPEG")
        escape.size = len(data)
        dst.addfile(escape, io.BytesIO(data))
        link = tarfile.TarInfo("imagenette2-224-mini/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        dst.addfile(link)
    data_dir = tmp_path / "data"
    with pytest.raises(UnsafeArchiveError) as err:
        make_dm(data_dir, archive=evil).prepare_data()
    assert "imagenette2-224-mini/../../escaped.JPEG" in str(err.value)
    assert "imagenette2-224-mini/link -> /etc/passwd" in str(err.value) and len(err.value.members) == 2
    assert "nothing was extracted" in str(err.value)
    assert not (tmp_path / "escaped.JPEG").exists() and not (data_dir / "imagenette2-224-mini").exists()


def test_local_archive_with_wrong_checksum(tmp_path: Path, mini_archive: Path) -> None:
    fake = tmp_path / "imagenette2-160.tgz"  # claims to be the official 160 px release
    shutil.copy(mini_archive, fake)
    with pytest.raises(ChecksumError, match=r"does not match the published checksum of imagenette2-160\.tgz"):
        make_dm(tmp_path / "data", archive=fake).prepare_data()


def test_archive_check_catches_a_damaged_copy(tmp_path: Path, mini_archive: Path) -> None:
    """fast.ai's fingerprint (size + md5 of the first MiB) of the real archive vs damaged copies of it."""
    published = (ArchiveCheck.of(mini_archive),)
    good = tmp_path / "good.tgz"
    shutil.copy(mini_archive, good)
    check_archive(good, published, subject="a copy", name=mini_archive.name)  # an identical copy passes
    data = mini_archive.read_bytes()
    assert len(data) > 2 * 2**20  # the archive is larger than the hashed head, so both checks matter
    flipped = tmp_path / "flipped.tgz"  # same size, one byte changed inside the hashed first MiB
    flipped.write_bytes(data[:5000] + bytes([data[5000] ^ 0xFF]) + data[5001:])
    truncated = tmp_path / "truncated.tgz"  # same first MiB, last byte missing
    truncated.write_bytes(data[:-1])
    for bad in (flipped, truncated):
        with pytest.raises(ChecksumError, match=rf"{bad.name}.*does not match the published checksum"):
            check_archive(bad, published, subject=str(bad), name=mini_archive.name)


def test_changed_archive_never_deletes_the_folder_in_use(
    tmp_path: Path, mini_archive: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job reads the extracted folder while the archive changes and another job prepares the data."""
    archive = tmp_path / "src" / mini_archive.name
    archive.parent.mkdir()
    shutil.copy(mini_archive, archive)
    data_dir = tmp_path / "data"
    reader = ready(make_dm(data_dir, archive=archive))
    old_root = reader.dataset_root
    old_files = sorted(p.relative_to(old_root).as_posix() for p in old_root.rglob("*") if p.is_file())
    victim = reader.val_files[0].relative_to(old_root).as_posix()
    original = (old_root / victim).read_bytes()
    batch = next(iter(reader.val_dataloader()))[0]

    # a new release of the archive: the same files, one image flipped
    buffer = io.BytesIO()
    Image.open(io.BytesIO(original)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buffer, "JPEG")
    changed = buffer.getvalue()
    with tarfile.open(mini_archive) as src, tarfile.open(archive, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name.endswith(victim):
                data, member.size = changed, len(changed)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    with open(old_root / victim, "rb") as handle:  # opened mid-epoch, before the other job starts
        caplog.set_level(logging.WARNING, logger="imagenette_lab")
        other = ready(make_dm(data_dir, archive=archive))
        assert handle.read() == original
    new_root = other.dataset_root
    assert new_root != old_root and new_root.parent == data_dir
    assert (new_root / victim).read_bytes() == changed
    assert f"{old_root} is kept for jobs that may still read it" in caplog.text
    # the reader's folder is intact and it still serves the very same batches
    assert sorted(p.relative_to(old_root).as_posix() for p in old_root.rglob("*") if p.is_file()) == old_files
    assert (old_root / victim).read_bytes() == original
    assert torch.equal(next(iter(reader.val_dataloader()))[0], batch)
    # the marker now names the new folder: a third job reuses it without extracting
    caplog.clear()
    caplog.set_level(logging.INFO, logger="imagenette_lab")
    assert ready(make_dm(data_dir, archive=archive)).dataset_root == new_root
    assert f"extracted {archive} ->" not in caplog.text


def test_download_through_local_http_server(
    tmp_path: Path, mini_archive: Path, http_dir: tuple[Path, str]
) -> None:
    served, base = http_dir
    shutil.copy(mini_archive, served / "imagenette2-224-mini.tgz")
    dest = tmp_path / "downloads" / "imagenette2-224-mini.tgz"
    got = download_archive(base + "imagenette2-224-mini.tgz", dest, (ArchiveCheck.of(mini_archive),))
    assert got == dest and dest.read_bytes() == mini_archive.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no .part left behind

    # the published checksum is enforced: the mini archive is not the official 160 px release
    with pytest.raises(ChecksumError, match=r"downloaded from http://127\.0\.0\.1"):
        download_archive(
            base + "imagenette2-224-mini.tgz",
            tmp_path / "x" / "imagenette2-160.tgz",
            published_checks("imagenette2-160.tgz"),
        )
    assert list((tmp_path / "x").iterdir()) == []  # rejected download removed, nothing renamed


def test_failed_download_names_url_and_workaround(tmp_path: Path, http_dir: tuple[Path, str]) -> None:
    _, base = http_dir
    dm = make_dm(tmp_path, variant="160", mirror=base)
    with pytest.raises(DownloadError) as err:
        dm.prepare_data()
    assert f"{base}imagenette2-160.tgz" in str(err.value) and "data.archive=PATH" in str(err.value)
    assert list((tmp_path / "downloads").iterdir()) == []


def test_datamodule_download_checks_published_checksum(
    tmp_path: Path, mini_archive: Path, http_dir: tuple[Path, str]
) -> None:
    served, base = http_dir
    shutil.copy(mini_archive, served / "imagenette2-160.tgz")  # a mirror serving the wrong file
    with pytest.raises(ChecksumError, match=r"imagenette2-160\.tgz"):
        make_dm(tmp_path, variant="160", mirror=base).prepare_data()
    assert not (tmp_path / "downloads" / "imagenette2-160.tgz").exists()


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"label_noise": 7}, "data.label_noise=7 is not one of 0, 1, 5, 25, 50"),
        ({"on_corrupt": "ignore"}, "data.on_corrupt='ignore' is not one of error, skip"),
        ({"pipeline": "dali"}, "data.pipeline='dali' is not one of cached, pil"),
        ({"val_crop": "five"}, "data.val_crop='five' is not one of center, random"),
        ({"variant": "224"}, "data.variant='224' is not one of full, 320, 160"),
        ({"dataset": "imagenet"}, "data.dataset='imagenet' is not one of imagenette, imagewoof"),
        ({"resize": 48}, "data.resize=48 must be an integer >= data.crop=56"),
        ({"num_classes": 5}, "data.num_classes=5 but dataset=imagenette has 10 classes"),
        ({"erase_scale": [0.5, 0.1]}, "data.erase_scale=[0.5, 0.1] must be [min, max]"),
        ({"hflip_p": 1.5}, "data.hflip_p=1.5 is a probability"),
        ({"std": [0.2, 0.2]}, "data.std=[0.2, 0.2] must have 3 values"),
        ({"train_fraction": 0}, "data.train_fraction=0 must be in (0, 1]"),
        ({"train_fraction": 1.5}, "data.train_fraction=1.5 must be in (0, 1]"),
        ({"train_fraction": True}, "data.train_fraction=True must be in (0, 1]"),
        ({"normalize": "per_image"}, "data.normalize='per_image' is not one of imagenet, dataset"),
        ({"progressive": {"start": 64}}, "data.progressive.start=64 must be null (off) or an integer side in px "
                                         "between 8 and data.crop=56"),
        ({"progressive": {"start": 32, "epochs": [4, 2]}}, "data.progressive.epochs=[4, 2] must be two epoch"),
        ({"progressive": {"start": 32, "epoch": [0, 2]}}, "must have keys start (px or null), epochs"),
    ],
)
def test_bad_config_fails_before_touching_data(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        make_dm(tmp_path / "untouched", archive=tmp_path / "missing.tgz", **kwargs)
    assert message in str(err.value)
    assert not (tmp_path / "untouched").exists()


def test_progressive_side_schedule() -> None:
    sides = [progressive_side(e, 56, 84, 2, 8, 8) for e in range(10)]
    assert sides == [56, 56, 56, 64, 64, 72, 72, 80, 84, 84]  # flat, linear ramp rounded to 8 px, exact end
    assert [ProgressiveResize(None, 84).side(e) for e in (0, 5)] == [84, 84]  # off: always data.crop


class _SideRecorder(L.LightningModule):
    """Records the side of every training batch per epoch (a linear head gives it something to train)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 10)
        self.sides: dict[int, set[int]] = {}
        self.means: dict[int, float] = {}
        self.val_sides: set[int] = set()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        images, labels = batch
        self.sides.setdefault(self.current_epoch, set()).add(images.shape[-1])
        self.means.setdefault(self.current_epoch, float(images.mean()))
        return torch.nn.functional.cross_entropy(self.head(images.mean((2, 3))), labels)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.val_sides.add(batch[0].shape[-1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("pipeline", ["cached", "pil"])
def test_progressive_resizing_trains_small_first_and_validates_at_crop(
    tmp_path: Path, mini_root: Path, pipeline: str
) -> None:
    dm = ready(make_dm(tmp_path, root=mini_root, pipeline=pipeline, resize=64, crop=56, batch_size=50,
                       progressive={"start": 32, "epochs": [1, 3], "step": 8}))
    model = _SideRecorder()
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert model.sides == {0: {32}, 1: {32}, 2: {48}, 3: {56}}
    assert model.val_sides == {56}  # validation always at data.crop
    # the scaled-down batch keeps the images' content: normalized means stay near the full-size ones
    assert all(abs(m) < 1.0 for m in model.means.values())


def test_yaml_configs_instantiate(tmp_path: Path, mini_root: Path) -> None:
    cfg = OmegaConf.load(REPO / "conf" / "data" / "imagenette.yaml")
    cfg.data_dir, cfg.seed, cfg.root = str(tmp_path), 3, str(mini_root)
    cfg.update(SMALL)
    dm = ready(instantiate(cfg))
    assert isinstance(dm, ImagenetteDataModule) and dm.seed == 3 and len(dm.train_set) == 200
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        woof = compose("data/imagewoof", overrides=["+paths.data_dir=x", "+seed=0"])
    woof = woof.data if "data" in woof else woof
    assert woof.dataset == "imagewoof" and woof.resize == 280 and woof.batch_size == 32


# ------------------------------------------------------------------------------------------ full size
@pytest.mark.slow
def test_full_archive_prepares_and_yields_batches(tmp_path: Path, full_archive: Path) -> None:
    start = time.perf_counter()
    dm = ready(ImagenetteDataModule(archive=full_archive, data_dir=tmp_path, pipeline="pil", num_workers=0))
    elapsed = time.perf_counter() - start
    assert len(dm.train_set) == 9469 and len(dm.val_set) == 3925
    assert torch.bincount(dm.train_clean_labels).tolist() == [
        963,
        955,
        993,
        858,
        941,
        956,
        961,
        931,
        951,
        960,
    ]
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 3, 224, 224) and labels.shape == (32,)
    print(f"full 224 archive: extract + verify 13,394 images in {elapsed:.1f} s")
