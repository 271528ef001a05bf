"""AgeDB-DIR and IMDB-WIKI-DIR: age from a face image.

Files
-----
``data.path`` holds the label file (``agedb.csv`` for agedb-dir, ``imdb_wiki.csv`` for
imdb-wiki-dir, or ``data.image.csv``) with columns ``age``, ``path``, ``split``
(train / val / test); ``path`` is relative to ``data.image.root`` (default: ``data.path``).
Both may be URIs pyarrow understands (s3://, gs://, ...).

To get them: the label files with the paper's balanced val / test splits are in the public
repository https://github.com/YyzHarry/imbalanced-regression (``agedb-dir/data/agedb.csv``,
``imdb-wiki-dir/data/imdb_wiki.csv``). Images: AgeDB from
https://ibug.doc.ic.ac.uk/resources/agedb/ (the authors give the archive password on
request), extracted so that ``<root>/AgeDB/<file>.jpg`` exists; IMDB-WIKI faces from
https://data.vision.ee.ethz.ch/cvl/rrothe/imdb-wiki/ (``imdb_crop`` and ``wiki_crop``), as
the repository's ``imdb-wiki-dir/download_imdb_wiki.py`` does.

What the splits hold
--------------------
``image``: uint8 (size, size, 3) RGB, decoded with Pillow and resized (bilinear) in a Ray
Data ``map_batches`` step, plus ``target`` (age, float64). Decoding is deterministic, so the
prepared splits can be cached as Parquet shards and reused; the random train augmentation
(random crop with zero padding, horizontal flip) and the ImageNet normalisation run later in
the training worker on each batch with :func:`augment_batch` and a seeded generator. An
augmented cache would freeze one draw of the augmentation for every epoch.

An unreadable image stops the load with an error naming the file
(``data.image.bad_images='error'``), or with ``'skip'`` is dropped, counted, logged and
reported in ``meta['skipped_images']`` / ``meta['skipped_examples']``.

Prediction input (``raw_columns``): ``image``, one uint8 HxWx3 RGB array per row, any size;
:func:`preprocess` resizes it exactly as training data was. It also accepts a ``path``
column (files readable from where the model runs) instead.

Bins: one per year, ``Bins.integer(0, 121)`` (ages above 120 clipped into the last bin) --
the reference code's LDS binning for both datasets. Shot regions come from training counts
(many > 100, few < 20). AgeDB-DIR's FDS merges ages below 3 into one bin (``bucket_start``);
that is FDS's binning, not this source's.
"""

from __future__ import annotations

import io
import logging
import math
import time
from functools import lru_cache
from typing import Any

import numpy as np

from raydir.bins import Bins
from raydir.data.base import SPLITS, TARGET, SourceData, filesystem_for, numeric_column

logger = logging.getLogger(__name__)

LABEL_FILES = {"agedb-dir": "agedb.csv", "imdb-wiki-dir": "imdb_wiki.csv"}
COLUMNS = ("age", "path", "split")
IMAGE = "image"
AGE_BINS = Bins.integer(0, 121)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BAD = "_bad"


# -- labels --------------------------------------------------------------------------------
def read_label_table(path: str, source: str = "agedb-dir", csv_name: str = "") -> dict[str, Any]:
    """Per split ('train' / 'val' / 'test') a pyarrow table with ``path`` (str) and
    ``target`` (age, float64), in file order. Errors name the file, missing columns (with
    those present), unknown split values, empty splits and non-numeric ages; empty ages
    become NaN and are left to ``data.nan_policy``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    if not csv_name:
        if source not in LABEL_FILES:
            raise ValueError(f"'source' should be one of {sorted(LABEL_FILES)} (or pass csv_name); got {source!r}.")
        csv_name = LABEL_FILES[source]
    fs, base = filesystem_for(path)
    file = f"{base}/{csv_name}"
    if fs.get_file_info(file).type.name != "File":
        raise FileNotFoundError(
            f"{source} label file {file} not found. It should be a CSV with columns {list(COLUMNS)} "
            f"in 'data.path' ({path}); see raydir.data.images' docstring for the download."
        )
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in COLUMNS},
                                   strings_can_be_null=False)
    try:
        with fs.open_input_stream(file) as f:
            table = pacsv.read_csv(f, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise ValueError(f"cannot parse {source} label file {file} as CSV with a header row: {exc}") from exc
    absent = [c for c in COLUMNS if c not in table.column_names]
    if absent:
        raise ValueError(f"{source} label file {file} lacks column(s) {absent}; present: {table.column_names}.")
    age = numeric_column(table, "age", file)
    split = pc.utf8_trim_whitespace(table.column("split"))
    unknown = sorted(set(pc.unique(split).to_pylist()) - set(SPLITS))
    if unknown:
        raise ValueError(
            f"{source} label file {file}: column 'split' should hold {list(SPLITS)}; it also holds "
            f"{unknown[:10]}. Rename or remove those rows."
        )
    out = {}
    full = pa.table({"path": table.column("path"), TARGET: age})
    for s in SPLITS:
        part = full.filter(pc.equal(split, s))
        if part.num_rows == 0:
            raise ValueError(f"{source} label file {file} has no rows with split '{s}'; every split needs rows.")
        out[s] = part
    return out


# -- decoding ------------------------------------------------------------------------------
def decode_image(data: bytes | np.ndarray, size: int) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) or an HxW[x3|x4] uint8 array -> uint8
    (size, size, 3) RGB, Pillow bilinear resize. Pillow errors propagate."""
    from PIL import Image

    if isinstance(data, np.ndarray):
        img = Image.fromarray(np.ascontiguousarray(data))
    else:
        img = Image.open(io.BytesIO(data))
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


@lru_cache(maxsize=4)
def _root(root: str):
    return filesystem_for(root)


def _read_bytes(root: str, relative: str) -> tuple[bytes, str]:
    fs, base = _root(root)
    full = f"{base}/{relative.lstrip('/')}"
    with fs.open_input_stream(full) as f:
        return f.read(), full


def _decode_batch(batch: dict[str, np.ndarray], *, root: str, size: int, policy: str) -> dict[str, np.ndarray]:
    n = len(batch["path"])
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    bad = np.zeros(n, dtype=np.int8)  # 1 = unreadable (skip policy)
    for i, relative in enumerate(batch["path"]):
        full = f"{root}/{relative}"
        try:
            data, full = _read_bytes(root, str(relative))
            images[i] = decode_image(data, size)
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
            if policy != "skip":
                raise ValueError(
                    f"cannot read image {full} (row path {relative!r}): {type(exc).__name__}: {exc}. "
                    f"Fix or remove the file, or set data.image.bad_images=skip to drop such rows."
                ) from exc
            bad[i] = 1
    out = {k: v for k, v in batch.items()}
    out[IMAGE], out[_BAD] = images, bad
    return out


def preprocess(batch: dict[str, Any], *, size: int, root: str = "") -> dict[str, np.ndarray]:
    """Model inputs from raw columns in one process (what the MLflow model runs at predict
    time): ``image`` (uint8 HxWx3 arrays of any size) or ``path`` (files under ``root``)
    -> {'image': uint8 (n, size, size, 3)}."""
    if IMAGE in batch:
        arrays = [decode_image(np.asarray(a, dtype=np.uint8), size) for a in batch[IMAGE]]
    elif "path" in batch:
        arrays = [decode_image(_read_bytes(root or ".", str(p))[0], size) for p in batch["path"]]
    else:
        raise ValueError(f"image input needs an 'image' (uint8 HxWx3) or 'path' column; present: {list(batch)}.")
    if not arrays:
        return {IMAGE: np.zeros((0, size, size, 3), dtype=np.uint8)}
    return {IMAGE: np.stack(arrays)}


# -- augmentation (in the training worker) -------------------------------------------------
def augment_batch(images, generator=None, train: bool = False, *, padding: int = 8,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 (N, H, W, 3) batch -> normalised float32 (N, 3, H, W) on the same device.

    ``train=True`` first applies a random crop of the zero-padded image (``padding`` pixels
    each side) and a horizontal flip with probability 1/2, drawn from ``generator`` (a
    ``torch.Generator`` on the CPU; required for training, so that a seed fixes the draw).
    """
    import torch
    import torch.nn.functional as F

    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(np.asarray(images))
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"'images' should be a uint8 (N, H, W, 3) batch; got dtype {images.dtype}, shape "
            f"{tuple(images.shape)}."
        )
    x = images
    if train:
        if not isinstance(generator, torch.Generator):
            raise TypeError("'generator' should be a torch.Generator when train=True (seeded augmentation).")
        n, h, w, _ = x.shape
        if padding:
            # [1] crop: one offset per image into the zero-padded batch, gathered in one go
            padded = F.pad(x, (0, 0, padding, padding, padding, padding))
            oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
            ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
            rows = oy[:, None] + torch.arange(h, device=x.device)
            cols = ox[:, None] + torch.arange(w, device=x.device)
            x = padded[torch.arange(n, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
        # [2] flip
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device)[:, None, None]
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device)[:, None, None]
    return (x.permute(0, 3, 1, 2).float().div(255.0) - m) / s


# -- the source ----------------------------------------------------------------------------
def load(cfg) -> SourceData:
    """AgeDB-DIR / IMDB-WIKI-DIR splits with decoded, resized ``image`` and ``target``."""
    import pyarrow as pa
    import ray.data
    from ray.data.expressions import col

    source, image_cfg = cfg.data.source, cfg.data.image
    tables = read_label_table(cfg.data.path, source, image_cfg.csv)
    root = image_cfg.root or cfg.data.path
    tagged = pa.concat_tables([
        tables[s].append_column("split", pa.array([s] * tables[s].num_rows, pa.string()))
        for s in SPLITS
    ])
    n = tagged.num_rows
    step = max(1, math.ceil(n / max(1, math.ceil(n / 500))))
    ds = ray.data.from_arrow([tagged.slice(i, step) for i in range(0, n, step)])
    start = time.perf_counter()
    ds = ds.map_batches(_decode_batch, batch_format="numpy", batch_size=128,
                        fn_kwargs={"root": root, "size": image_cfg.size,
                                   "policy": image_cfg.bad_images}).materialize()
    seconds = time.perf_counter() - start
    rate = n / seconds if seconds > 0 else float("inf")
    logger.info("%s: decoded %d images to %dx%d in %.1f s (%.0f images/s)",
                source, n, image_cfg.size, image_cfg.size, seconds, rate)
    meta: dict[str, Any] = {
        "source": source, "image_size": image_cfg.size, "crop_padding": image_cfg.crop_padding,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "root": root,
        "preprocess": "raydir.data.images:preprocess", "augment": "raydir.data.images:augment_batch",
        "decode_seconds": seconds, "decode_rows_per_s": rate, "skipped_images": 0,
        "skipped_examples": [],
    }
    if image_cfg.bad_images == "skip":
        bad = ds.filter(expr=col(_BAD) == 1).select_columns(["path", "split"]).materialize()
        count = bad.count()
        if count:
            examples = [r["path"] for r in bad.take(5)]
            per_split = {s: bad.filter(expr=col("split") == s).count() for s in SPLITS}
            logger.warning("%s: skipped %d unreadable image(s) (per split %s), e.g. %s",
                           source, count, per_split, examples)
            meta.update(skipped_images=count, skipped_per_split=per_split, skipped_examples=examples)
            ds = ds.filter(expr=col(_BAD) == 0).materialize()
    splits = {}
    for s in SPLITS:
        part = ds.filter(expr=col("split") == s).drop_columns(["split", "path", _BAD]).materialize()
        if part.count() == 0:
            raise ValueError(f"{source}: split '{s}' is empty after skipping unreadable images "
                             f"({meta['skipped_images']} skipped, e.g. {meta['skipped_examples']}).")
        splits[s] = part
    meta["rows"] = {s: splits[s].count() for s in SPLITS}
    return SourceData(
        splits=splits,
        input_kind="image",
        input_columns=[IMAGE],
        raw_columns=[IMAGE],
        default_bins=AGE_BINS,
        default_shots=None,
        meta=meta,
    )
