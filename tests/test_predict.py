"""Registry consumption: `raydir predict` (Ray Data actor pool) and `raydir evaluate` against a
model trained and registered here (shared local Ray, SQLite MLflow)."""

from __future__ import annotations

import json
import socket
from argparse import Namespace

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from raydir.config import Config
from raydir.metrics import shot_metrics
from raydir.predict import check_ray_address, evaluate, evaluate_main, predict

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NAME = "raydir-test-model"  # conftest.TRAINED_NAME


def _raw(tmp) -> dict:
    """The data of the session's model (other data for evaluate to read)."""
    return {
        "data": {"source": "synthetic", "cache_dir": str(tmp / "cache"), "seed": 3,
                 "synthetic": {"n_train": 600, "num_features": 6, "per_bin_eval": 4, "high": 40.0}},
        "bins": {"kind": "uniform", "start": 0.0, "stop": 40.0, "num_bins": 20},
        "model": {"hidden": [16], "feature_dim": 8},
        "train": {"num_workers": 1, "epochs": 2, "batch_size": 50, "eval_batch_size": 64,
                  "storage_path": str(tmp / "ray_results"), "cpus_per_worker": 1.0},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "tests",
                     "register_name": NAME},
    }


@pytest.fixture
def registered(trained):
    """The session's model (conftest ``trained``): version 1 of NAME, alias champion."""
    assert trained["name"] == NAME
    return trained


@pytest.fixture
def tracking_env(registered, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return registered["uri"]


def _raw_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(n, 6)), columns=[f"x{i}" for i in range(6)])
    df["row_id"] = np.arange(n)
    return df


def test_predict_one_file_read_in_pieces_keeps_input_order(tmp_path, tracking_env, monkeypatch):
    # Ray Data's Parquet datasource V2 (Ray's default) packs a file's row groups into read
    # units of RAY_DATA_PARQUET_BIN_PACKING_BYTES (128 MiB) and emits them out of order even
    # with preserve_order: a 2M-row file came back starting at row 860,000. raydir reads
    # through V1 (raydir.data.base.read_parquet); 16 KiB units make this 3,000-row file
    # several units under V2, as a few hundred MB would be, so a read through V2 fails here.
    monkeypatch.setenv("RAY_DATA_PARQUET_BIN_PACKING_BYTES", str(16 << 10))
    df = _raw_frame(3000, seed=2)
    df.to_parquet(tmp_path / "in.parquet", row_group_size=100)
    predict(f"models:/{NAME}/1", str(tmp_path / "in.parquet"), str(tmp_path / "pred.parquet"),
            batch_size=256, num_actors=2)
    got = pd.read_parquet(tmp_path / "pred.parquet")
    np.testing.assert_array_equal(got["row_id"].to_numpy(), np.arange(3000))


def test_predict_csv_into_folder(tmp_path, tracking_env):
    df = _raw_frame(700, seed=1)
    df.to_csv(tmp_path / "in.csv", index=False)
    predict(f"models:/{NAME}/1", str(tmp_path / "in.csv"), str(tmp_path / "outdir"), batch_size=256)
    got = pd.read_parquet(tmp_path / "outdir").sort_values("row_id")
    assert len(got) == 700 and np.isfinite(got["prediction"]).all()


def test_both_engines_keep_columns_and_order_and_match_pyfunc(tmp_path, tracking_env):
    """engine "local" (this process, pyarrow streaming) and the Ray Data actor pool (2 actors)
    on the same folder of Parquet files (several blocks): the alias resolved to its version,
    every row in input order, the same columns, types and values, equal to the pyfunc's own
    predictions; a text column and an input column named ``prediction`` ride along (the
    latter replaced)."""
    df = _raw_frame(2500, seed=4)
    df["note"] = [f"row {i}" for i in range(2500)]
    df["prediction"] = -1.0
    (tmp_path / "in").mkdir()
    for i, part in enumerate(np.array_split(np.arange(2500), 3)):
        df.iloc[part].to_parquet(tmp_path / "in" / f"part-{i}.parquet", row_group_size=300)
    (tmp_path / "in" / "_SUCCESS").write_text("")  # skipped, as Ray Data skips it
    outs = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.parquet"
        summary = predict(f"models:/{NAME}@champion", str(tmp_path / "in"), str(out),
                          batch_size=700, engine=engine, log=lambda _: None,
                          num_actors=2 if engine == "ray" else None)
        assert summary["engine"] == engine and summary["rows"] == 2500
        assert summary["model"] == f"models:/{NAME}/1"
        outs[engine] = pq.read_table(out)
    # the same Arrow columns (Ray's pandas round trip only adds its own pandas metadata)
    local, ray_ = (outs[e].replace_schema_metadata() for e in ("local", "ray"))
    assert local.schema.equals(ray_.schema), (local.schema, ray_.schema)
    assert local.equals(ray_)
    assert local.column_names == list(df.columns)
    outs = {e: t.to_pandas() for e, t in outs.items()}
    np.testing.assert_array_equal(outs["local"]["row_id"], np.arange(2500))
    mlflow.set_tracking_uri(tracking_env)
    expected = mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict(df[[f"x{i}" for i in range(6)]])
    np.testing.assert_allclose(outs["local"]["prediction"], expected, rtol=0, atol=1e-12)


def test_local_engine_csv_into_folder_shards(tmp_path, tracking_env, monkeypatch):
    import raydir.predict as predict_module

    monkeypatch.setattr(predict_module, "SHARD_ROWS", 400)  # 3 shards of the 1,000 rows
    monkeypatch.setattr(predict_module, "PROGRESS_SECONDS", 0.0)  # a progress line per batch
    df = _raw_frame(1000, seed=5)
    df.to_csv(tmp_path / "in.csv.gz", index=False)
    lines = []
    summary = predict(f"models:/{NAME}/1", str(tmp_path / "in.csv.gz"), str(tmp_path / "outdir"),
                      batch_size=200, engine="local", log=lines.append)
    assert summary["rows"] == 1000
    progress = [line.split(" rows (")[0] for line in lines if line.startswith("scored ")]
    assert progress == [f"scored {n:,}" for n in range(200, 1001, 200)]  # CSV: no total known
    shards = sorted(p.name for p in (tmp_path / "outdir").iterdir())
    assert shards == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    got = pd.read_parquet(tmp_path / "outdir")
    np.testing.assert_array_equal(got["row_id"], np.arange(1000))
    mlflow.set_tracking_uri(tracking_env)
    expected = mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict(df[[f"x{i}" for i in range(6)]])
    np.testing.assert_allclose(got["prediction"], expected, rtol=1e-12, atol=1e-12)


def test_local_engine_error_in_the_model_stage_is_raised_and_leaves_no_file(tmp_path, tracking_env,
                                                                           monkeypatch):
    """A value the model refuses, in the third batch: the error of the model's thread reaches
    the caller, the read / model threads stop, and no partial output stays."""
    import threading

    import raydir.predict as predict_module

    df = _raw_frame(1000, seed=7)
    df["x3"] = np.arange(1000, dtype=np.int64)
    df.loc[650, "x3"] = 2**60 + 1  # float64 cannot hold it exactly
    df.to_parquet(tmp_path / "in.parquet")
    monkeypatch.setattr(predict_module, "PROGRESS_SECONDS", 0.0)
    lines = []
    with pytest.raises(ValueError, match=r"column 'x3' \(int64\) holds values that float64 cannot"):
        predict(f"models:/{NAME}/1", str(tmp_path / "in.parquet"), str(tmp_path / "o.parquet"),
                batch_size=300, engine="local", log=lines.append)
    # the two batches before the bad one were scored (Parquet: the total is known)
    assert [line.split(" rows (")[0] for line in lines if line.startswith("scored ")] == \
        ["scored 300 of 1,000", "scored 600 of 1,000"]
    with pytest.raises(ValueError, match=r"column 'x3'"):  # into a folder of shards
        predict(f"models:/{NAME}/1", str(tmp_path / "in.parquet"), str(tmp_path / "shards"),
                batch_size=300, engine="local", log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]
    assert not [t for t in threading.enumerate() if t.name == "raydir-predict-stage"]


def test_cli_predict_with_no_ray_scores_in_process(tmp_path, tracking_env):
    """`raydir predict` with no RAY_ADDRESS starts no Ray: one process, one line saying so."""
    import os
    import subprocess
    import sys

    _raw_frame(300, seed=6).to_parquet(tmp_path / "in.parquet")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["MLFLOW_TRACKING_URI"] = tracking_env
    done = subprocess.run(
        [sys.executable, "-m", "raydir.cli", "predict", "--model", f"models:/{NAME}@champion",
         "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out.csv")],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "scoring in this process, no Ray started" in done.stdout and "wrote 300 rows" in done.stdout
    assert "Ray" not in done.stderr.replace("--engine ray", "")  # no local Ray was started
    assert len(pd.read_csv(tmp_path / "out.csv")) == 300


@pytest.mark.parametrize("engine, inp, out, actors, message", [
    ("local", "s3://bucket/in.parquet", "o.parquet", None, "--input is a URI; use --engine ray"),
    ("local", "in.parquet", "s3://bucket/out/", None, "--output is a URI"),
    ("local", "in.parquet", "o.parquet", 2, "--num-actors 2 needs a Ray actor pool"),
    ("gpu", "in.parquet", "o.parquet", None, "--engine should be one of auto, local, ray; got 'gpu'"),
])
def test_engine_choice_refuses_what_it_cannot_do(engine, inp, out, actors, message):
    from raydir.errors import UserError
    from raydir.predict import choose_engine

    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        choose_engine(engine, inp, out, actors)


def test_a_partitioned_input_folder_goes_to_ray(tmp_path, monkeypatch):
    from raydir.errors import UserError
    from raydir.predict import _ray_in_use, choose_engine

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "flat").mkdir()
    _raw_frame(5).to_parquet(tmp_path / "flat" / "a.parquet")
    (tmp_path / "parts" / "year=2024").mkdir(parents=True)
    _raw_frame(5).to_parquet(tmp_path / "parts" / "year=2024" / "a.parquet")
    assert choose_engine("local", str(tmp_path / "flat"), "o.parquet", None) == "local"
    with pytest.raises(UserError, match=r"partitioned folder \('year=2024'\).*--engine ray"):
        choose_engine("local", str(tmp_path / "parts"), "o.parquet", None)
    if not _ray_in_use():  # auto: Ray whenever this process has joined one
        assert choose_engine("auto", str(tmp_path / "flat"), "o.parquet", None) == "local"
    assert choose_engine("auto", str(tmp_path / "parts"), "o.parquet", None) == "ray"


def test_auto_engine_uses_ray_when_there_is_one_or_it_is_needed(monkeypatch):
    from raydir.predict import choose_engine

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert choose_engine("auto", "in.parquet", "o.parquet", None) == "ray"
    monkeypatch.delenv("RAY_ADDRESS")
    assert choose_engine("auto", "s3://b/in.parquet", "o.parquet", None) == "ray"
    assert choose_engine("auto", "in.parquet", "o.parquet", 3) == "ray"
    assert choose_engine("local", "in.parquet", "file:///tmp/o.parquet", 1) == "local"


@pytest.mark.parametrize("uri, message", [
    ("models:/no-such-model@champion", "no registered model named 'no-such-model'"),
    (f"models:/{NAME}@gold", f"'{NAME}' has no alias 'gold'"),
    (f"models:/{NAME}/7", f"'{NAME}' has no version '7'"),
])
def test_predict_unknown_model_names_it_and_lists_registry(tmp_path, tracking_env, uri, message):
    _raw_frame(5).to_parquet(tmp_path / "in.parquet")
    with pytest.raises(ValueError) as err:
        predict(uri, str(tmp_path / "in.parquet"), str(tmp_path / "o.parquet"))
    text = str(err.value)
    assert uri in text and message in text
    assert f"{NAME} (aliases: champion->v1; versions: 1)" in text


def test_predict_missing_columns_named_before_the_pool(tmp_path, tracking_env):
    _raw_frame(5).drop(columns=["x2", "x4"]).to_csv(tmp_path / "in.csv", index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['x2', 'x4'\]"):
        predict(f"models:/{NAME}@champion", str(tmp_path / "in.csv"), str(tmp_path / "o.parquet"))
    assert not (tmp_path / "o.parquet").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mlflow_and_ray_say_which_and_how(tmp_path, tracking_env, monkeypatch):
    _raw_frame(5).to_parquet(tmp_path / "in.parquet")
    port = _free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectionError, match=f"MLflow tracking server at http://127.0.0.1:{port} "
                                              r"cannot be reached.*mlflow server"):
        predict(f"models:/{NAME}@champion", str(tmp_path / "in.parquet"), str(tmp_path / "o.parquet"))
    with pytest.raises(ConnectionError, match=f"RAY_ADDRESS=127.0.0.1:{port} cannot be reached"
                                              r".*ray start --head"):
        check_ray_address(f"127.0.0.1:{port}")
    with pytest.raises(ConnectionError, match="dashboard.*ray job submit"):
        check_ray_address("http://127.0.0.1:8265")
    check_ray_address("")  # local Ray: nothing to probe


def _pyfunc_reference(registered, cfg: Config, split: str = "test") -> dict:
    """Shot metrics of pyfunc.predict on the split's RAW columns, regenerated independently."""
    from raydir.data.synthetic import feature_names, make_synthetic

    mlflow.set_tracking_uri(registered["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    mi = model.unwrap_python_model().info
    bins = mi.bins
    x, y = make_synthetic(cfg.data.synthetic, cfg.data.seed, bins)[split]
    pred = model.predict(pd.DataFrame(x.astype(np.float64), columns=feature_names(cfg.data.synthetic)))
    return shot_metrics(pred, y, bins=bins, shots=mi.shots)


def _assert_metrics_close(got: dict, want: dict) -> None:
    for region in ("overall", "many", "medium", "few"):
        assert got[region]["count"] == want[region]["count"], region
        for key in ("mse", "mae", "gmean", "pearson", "spearman"):
            np.testing.assert_allclose(got[region][key], want[region][key], rtol=1e-5, atol=1e-6,
                                       equal_nan=True, err_msg=f"{region}.{key}")


def test_evaluate_matches_pyfunc_on_raw_columns_and_is_linked(tmp_path, registered, tracking_env):
    cfg = registered["cfg"]
    out_file = tmp_path / "eval.json"
    args = Namespace(model=f"models:/{NAME}@champion", split="test", result_file=str(out_file))
    assert evaluate_main(cfg, args) == 0
    out = json.loads(out_file.read_text())
    assert out["model_name"] == NAME and out["model_version"] == 1 and out["rows"] == 20 * 4
    assert out["test_metrics"]["overall"]["count"] == 80
    _assert_metrics_close(out["test_metrics"], _pyfunc_reference(registered, cfg))
    # training's own test metrics are the same model on the same rows
    np.testing.assert_allclose(out["test_metrics"]["overall"]["mae"],
                               registered["result"]["test_metrics"]["overall"]["mae"], rtol=1e-5)

    client = MlflowClient(registered["uri"])
    run = client.get_run(out["run_id"])
    tags = run.data.tags
    assert tags["raydir.model_name"] == NAME and tags["raydir.model_version"] == "1"
    assert tags["raydir.source_run_id"] == registered["result"]["run_id"]
    assert tags["raydir.model_uri"] == f"models:/{NAME}@champion"
    assert run.data.metrics["eval_count"] == 80 and "eval_few_mae" in run.data.metrics
    assert run.info.status == "FINISHED"
    mv = client.get_model_version(NAME, "1")
    assert mv.tags["raydir.eval.test.run_id"] == out["run_id"]


def test_evaluate_other_data_restandardises_features(tmp_path, registered, tracking_env):
    """Eval data with other train statistics (more train rows): the model's own
    standardisation is applied, so results still equal the pyfunc's raw-column path."""
    raw = _raw(tmp_path)
    raw["tracking"]["uri"] = registered["uri"]
    raw["data"]["synthetic"]["n_train"] = 900
    cfg = Config.from_dict(raw)
    out = evaluate(f"models:/{NAME}/1", cfg, split="val")
    _assert_metrics_close(out["val_metrics"], _pyfunc_reference(registered, cfg, "val"))


def test_evaluate_incompatible_features_named(tmp_path, registered, tracking_env):
    raw = _raw(tmp_path)
    raw["tracking"]["uri"] = registered["uri"]
    raw["data"]["synthetic"]["num_features"] = 4
    with pytest.raises(ValueError, match=r"trained on 6 features .* gives 4 features"):
        evaluate(f"models:/{NAME}/1", Config.from_dict(raw))
