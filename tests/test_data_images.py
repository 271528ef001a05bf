"""AgeDB-DIR / IMDB-WIKI-DIR source: label file, decoding, bad images, augmentation."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from raydir.config import Config
from raydir.data import images
from raydir.data.base import TARGET

PIL = pytest.importorskip("PIL", reason="Pillow (the 'vision' extra) not installed")
from PIL import Image  # noqa: E402


def _make_agedb(folder: Path, n: int = 20, bad: tuple[int, ...] = ()) -> Path:
    """``n`` small images in the AgeDB layout (<folder>/AgeDB/<file>, agedb.csv), with
    deterministic pixel content; rows in ``bad`` get a file that is not an image."""
    rng = np.random.default_rng(0)
    (folder / "AgeDB").mkdir(parents=True, exist_ok=True)
    splits = ["train"] * (n - 6) + ["val"] * 3 + ["test"] * 3
    with open(folder / "agedb.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["age", "path", "split"])
        for i in range(n):
            ext = "png" if i % 2 else "jpg"
            rel = f"AgeDB/{i:03d}_Person_{20 + i}_f.{ext}"
            if i in bad:
                (folder / rel).write_bytes(b"not an image")
            else:
                h, w_ = 20 + i, 30 + 2 * i  # varied sizes, some non-square
                Image.fromarray(rng.integers(0, 256, (h, w_, 3), dtype=np.uint8)).save(folder / rel)
            w.writerow([20 + i, rel, splits[i]])
    return folder


def _cfg(path, **image) -> Config:
    return Config.from_dict({"data": {"source": "agedb-dir", "path": str(path), "image": image}})


# -- label file ----------------------------------------------------------------------------
def test_real_agedb_csv_split_counts(shared_data, agedb_ages):
    if not (shared_data / "agedb-dir" / "agedb.csv").is_file():
        pytest.skip("AgeDB-DIR label file not in the shared data")
    tables = images.read_label_table(str(shared_data / "agedb-dir"), "agedb-dir")
    assert {s: t.num_rows for s, t in tables.items()} == {"train": 12208, "val": 2140, "test": 2140}
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(tables[split].column(TARGET).to_numpy(), agedb_ages[split])
    # val / test are capped at 30 per age (balanced); train is not.
    for split in ("val", "test"):
        counts = images.AGE_BINS.histogram(tables[split].column(TARGET).to_numpy())
        assert counts.max() == 30
    assert images.AGE_BINS.histogram(tables["train"].column(TARGET).to_numpy()).max() > 30


def test_label_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="agedb.csv not found"):
        images.read_label_table(str(tmp_path), "agedb-dir")
    (tmp_path / "imdb_wiki.csv").write_text("age,file,split\n30,a.jpg,train\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['path'\]; present: \['age', 'file', 'split'\]"):
        images.read_label_table(str(tmp_path), "imdb-wiki-dir")
    (tmp_path / "agedb.csv").write_text("age,path,split\n30,a.jpg,train\n31,b.jpg,dev\n")
    with pytest.raises(ValueError, match=r"also holds \['dev'\]"):
        images.read_label_table(str(tmp_path), "agedb-dir")
    (tmp_path / "agedb.csv").write_text("age,path,split\n30,a.jpg,train\n31,b.jpg,val\n")
    with pytest.raises(ValueError, match="no rows with split 'test'"):
        images.read_label_table(str(tmp_path), "agedb-dir")
    (tmp_path / "agedb.csv").write_text("age,path,split\nold,a.jpg,train\n31,b.jpg,val\n3,c,test\n")
    with pytest.raises(ValueError, match=r"column 'age' should be numeric; 1 row\(s\)"):
        images.read_label_table(str(tmp_path), "agedb-dir")


def test_decode_image_resizes_to_rgb():
    gray = np.arange(12 * 7, dtype=np.uint8).reshape(12, 7)
    out = images.decode_image(gray, 8)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all()  # gray -> RGB replicates the channel


# -- through Ray ---------------------------------------------------------------------------
@pytest.mark.ray
def test_load_small_agedb_layout(tmp_path, ray_session):
    folder = _make_agedb(tmp_path / "agedb")
    data = images.load(_cfg(folder, size=16))
    assert {s: ds.count() for s, ds in data.splits.items()} == {"train": 14, "val": 3, "test": 3}
    assert data.input_kind == "image" and data.input_columns == ["image"] and data.raw_columns == ["image"]
    assert data.default_bins == images.AGE_BINS and data.default_shots is None
    assert data.meta["skipped_images"] == 0 and data.meta["image_size"] == 16
    batch = data.splits["val"].take_batch(3, batch_format="numpy")
    assert set(batch) == {"image", TARGET}
    assert batch["image"].shape == (3, 16, 16, 3) and batch["image"].dtype == np.uint8
    # Same pixels as decoding the file directly (what the logged model does from a path).
    row = sorted(zip(batch[TARGET], batch["image"]), key=lambda r: r[0])[0]
    age = int(row[0])
    rel = next((folder / "AgeDB").glob(f"*_{age}_f.*")).relative_to(folder)
    direct = images.preprocess({"path": [str(rel)]}, size=16, root=str(folder))["image"][0]
    np.testing.assert_array_equal(row[1], direct)


@pytest.mark.ray
def test_bad_image_error_names_the_file(tmp_path, ray_session):
    folder = _make_agedb(tmp_path / "agedb", bad=(5,))
    with pytest.raises(Exception, match=r"cannot read image .*AgeDB/005_Person_25_f\.png.*bad_images=skip"):
        images.load(_cfg(folder, size=8))


@pytest.mark.ray
def test_bad_image_skip_policy_counts(tmp_path, ray_session):
    folder = _make_agedb(tmp_path / "agedb", bad=(2, 5, 17))
    (folder / "AgeDB" / "000_Person_20_f.jpg").unlink()  # a missing file is unreadable too
    data = images.load(_cfg(folder, size=8, bad_images="skip"))
    assert data.meta["skipped_images"] == 4
    assert data.meta["skipped_per_split"] == {"train": 3, "val": 0, "test": 1}
    assert "AgeDB/005_Person_25_f.png" in data.meta["skipped_examples"]
    assert {s: ds.count() for s, ds in data.splits.items()} == {"train": 11, "val": 3, "test": 2}
    assert data.meta["rows"] == {"train": 11, "val": 3, "test": 2}


# -- augmentation --------------------------------------------------------------------------
def test_augment_eval_is_normalisation_only():
    x = torch.randint(0, 256, (2, 6, 5, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = images.augment_batch(x, train=False)
    assert out.shape == (2, 3, 6, 5) and out.dtype == torch.float32
    mean = torch.tensor(images.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(images.IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(out[1], (x[1].permute(2, 0, 1).float() / 255 - mean) / std)


def _reference_augment(x, gen, padding):
    """Per-image loop: the same draws as augment_batch, applied one image at a time."""
    n, h, w, _ = x.shape
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = []
    for i in range(n):
        p = torch.zeros(h + 2 * padding, w + 2 * padding, 3, dtype=torch.uint8)
        p[padding:padding + h, padding:padding + w] = x[i]
        crop = p[oy[i]:oy[i] + h, ox[i]:ox[i] + w]
        out.append(crop.flip(1) if flip[i] else crop)
    return images.augment_batch(torch.stack(out), train=False)


def test_augment_train_crop_flip_matches_loop_and_is_seeded():
    x = torch.randint(0, 256, (6, 9, 7, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a = images.augment_batch(x, torch.Generator().manual_seed(3), train=True, padding=2)
    b = images.augment_batch(x, torch.Generator().manual_seed(3), train=True, padding=2)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, _reference_augment(x, torch.Generator().manual_seed(3), 2))
    assert not torch.equal(a, images.augment_batch(x, train=False))


def test_augment_rejects_bad_input():
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        images.augment_batch(torch.zeros(2, 3, 8, 8))
    with pytest.raises(TypeError, match="'generator'"):
        images.augment_batch(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), train=True)
