"""Every user mistake: one line ``raydir: error: ...`` on stderr, exit code 2, no traceback,
and nothing created or changed in MLflow (runs, their status, registered models, aliases).

The CLI runs in-process (``raydir.cli.main``) before Ray starts; the unreachable-cluster cases
run as real subprocesses and are timed. A registry with one model version under alias
``champion`` and three runs (finished, failed, a sweep's) is the MLflow state each case must
leave as it found it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raydir.cli import main
from raydir.config import Config

MODEL = "errs-model"

TINY = {
    "data": {"source": "synthetic", "synthetic": {"n_train": 300, "num_features": 4, "per_bin_eval": 2,
                                                  "high": 20.0}},
    "bins": {"kind": "uniform", "start": 0.0, "stop": 20.0, "num_bins": 10},
    "model": {"hidden": [8], "feature_dim": 4},
    "train": {"num_workers": 1, "epochs": 2, "batch_size": 32},
    "tracking": {"experiment": "errs"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEAD_PORT = _free_port()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Config files, tables and an MLflow store with a registry and runs to refuse."""
    from mlflow.tracking import MlflowClient

    from raydir.tracking import experiment_id

    d = tmp_path_factory.mktemp("errors")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = experiment_id(client, uri, "errs")
    cfg = Config.from_dict(TINY)
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in cfg.to_flat_dict().items()]
    runs = {}
    for name, status, tags in (("finished", "FINISHED", {}), ("failed", "FAILED", {}),
                               ("sweep", "KILLED", {"raydir.role": "sweep"})):
        run = client.create_run(exp, run_name=name, tags=tags)
        for i in range(0, len(params), 90):
            client.log_batch(run.info.run_id, params=params[i:i + 90])
        client.set_terminated(run.info.run_id, status=status)
        runs[name] = run.info.run_id
    client.create_registered_model(MODEL)
    client.create_model_version(MODEL, source=str(d / "nowhere"), run_id=runs["finished"])
    client.set_registered_model_alias(MODEL, "champion", "1")

    files = {"good": TINY, "tune": {**TINY, "tune": {"space": {"fds.ks": [3, 5]}}}}
    for name, raw in files.items():
        (d / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    (d / "bad_syntax.yaml").write_text("train:\n  epochs: [1, 2\n  lr: 3\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "loop.yaml").write_text("base: loop.yaml\n")
    (d / "nobase.yaml").write_text("base: missing.yaml\n")
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00\x81train")
    (d / "conf_dir").mkdir()
    (d / "rows.parquet").write_bytes(b"")  # never read: the cases fail before
    (d / "afile.txt").write_text("x")
    (d / "full").mkdir()
    (d / "full" / "x.parquet").write_text("x")
    (d / "dir.parquet").mkdir()
    return {"dir": d, "uri": uri, "runs": runs}


def _state(uri: str) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    runs = sorted((r.info.run_id, r.info.status, r.info.end_time, tuple(sorted(r.data.tags.items())))
                  for e in client.search_experiments() for r in client.search_runs([e.experiment_id]))
    models = sorted((m.name, tuple(sorted((m.aliases or {}).items())),
                     tuple(sorted(v.version for v in client.search_model_versions(f"name='{m.name}'"))))
                    for m in client.search_registered_models())
    return tuple(runs), tuple(models)


def g(d: Path, name: str = "good") -> str:
    return str(d / f"{name}.yaml")


# (id, argv builder (folder, runs) -> argv, key words of the message)
CASES = [
    # -- config files and YAML
    ("config-missing", lambda d, r: ["train", "--config", str(d / "nope.yaml")], ["does not exist"]),
    ("config-directory", lambda d, r: ["train", "--config", str(d / "conf_dir")], ["is a directory"]),
    ("yaml-malformed", lambda d, r: ["train", "--config", g(d, "bad_syntax")],
     ["bad_syntax.yaml", "line 3", "column", "malformed YAML"]),
    ("yaml-not-mapping", lambda d, r: ["prepare", "--config", g(d, "list")], ["should hold a mapping"]),
    ("yaml-base-loop", lambda d, r: ["train", "--config", g(d, "loop")], ["loops back"]),
    ("yaml-base-missing", lambda d, r: ["train", "--config", g(d, "nobase")], ["missing.yaml", "does not exist"]),
    ("yaml-binary", lambda d, r: ["train", "--config", g(d, "binary")], ["not text"]),
    ("set-no-equals", lambda d, r: ["train", "--config", g(d), "--set", "train.epochs"], ["key=value"]),
    ("set-malformed", lambda d, r: ["train", "--config", g(d), "--set", "train.step_epochs=[1, 2"],
     ["--set", "malformed YAML"]),
    ("set-unknown-key", lambda d, r: ["train", "--config", g(d), "--set", "train.epoch=3"],
     ["unknown config key 'train.epoch'", "Did you mean 'train.epochs'"]),
    ("set-unknown-section", lambda d, r: ["train", "--config", g(d), "--set", "trian.epochs=3"],
     ["unknown config key 'trian'"]),
    ("set-not-a-section", lambda d, r: ["train", "--config", g(d), "--set", "train.epochs.x=3"], ["not a section"]),
    ("int-not-number", lambda d, r: ["train", "--config", g(d), "--set", "train.epochs=abc"],
     ["'train.epochs'", "integer"]),
    ("int-fraction", lambda d, r: ["train", "--config", g(d), "--set", "train.epochs=2.5"],
     ["'train.epochs'", "integer"]),
    ("float-text", lambda d, r: ["train", "--config", g(d), "--set", "train.lr=fast"], ["'train.lr'", "number"]),
    ("lr-negative", lambda d, r: ["train", "--config", g(d), "--set", "train.lr=-1e-3"],
     ["'train.lr'", "positive"]),
    ("bool-text", lambda d, r: ["train", "--config", g(d), "--set", "fds.enabled=maybe"],
     ["'fds.enabled'", "true or false"]),
    ("list-scalar", lambda d, r: ["train", "--config", g(d), "--set", "model.hidden=5"],
     ["'model.hidden'", "list"]),
    ("ks-even", lambda d, r: ["train", "--config", g(d), "--set", "fds.ks=4"], ["'fds.ks'", "odd"]),
    ("loss-unknown", lambda d, r: ["train", "--config", g(d), "--set", "loss.name=mae"],
     ["'loss.name'", "should be one of"]),
    ("source-unknown", lambda d, r: ["prepare", "--config", g(d), "--set", "data.source=csv"],
     ["'data.source'", "should be one of"]),
    ("table-no-path", lambda d, r: ["prepare", "--config", g(d), "--set", "data.source=table"],
     ["'data.path' is required"]),
    ("dropout-range", lambda d, r: ["train", "--config", g(d), "--set", "model.dropout=1.5"], ["'model.dropout'"]),
    ("lds-without-scheme", lambda d, r: ["train", "--config", g(d), "--set", "reweight.lds=true"],
     ["reweight.scheme"]),
    ("bins-order", lambda d, r: ["prepare", "--config", g(d), "--set", "bins.stop=-1"],
     ["'bins.stop'", "greater"]),
    ("alias-name", lambda d, r: ["train", "--config", g(d), "--set", "tracking.alias=a b"], ["'tracking.alias'"]),
    ("tune-space-key", lambda d, r: ["tune", "--config", g(d), "--set", "tune.space.fds.kss=[3]"],
     ["'tune.space' has unknown key", "fds.ks"]),
    ("tune-metric", lambda d, r: ["tune", "--config", g(d, "tune"), "--set", "tune.metric=accuracy"],
     ["'tune.metric'"]),
    ("evaluate-config", lambda d, r: ["evaluate", "--model", f"models:/{MODEL}@champion", "--config", g(d),
                                      "--set", "fds.ks=2"], ["'fds.ks'"]),
    # -- MLflow store
    ("mlflow-server-down", lambda d, r: ["train", "--config", g(d), "--set",
                                         f"tracking.uri=http://127.0.0.1:{DEAD_PORT}"],
     ["MLflow tracking server", f"127.0.0.1:{DEAD_PORT}", "cannot be reached"]),
    ("mlflow-folder-missing", lambda d, r: ["train", "--config", g(d), "--set",
                                            f"tracking.uri=sqlite:///{d}/no/such/m.db"],
     ["does not exist or is not writable"]),
    ("mlflow-down-tune", lambda d, r: ["tune", "--config", g(d, "tune"), "--set",
                                       f"tracking.uri=http://127.0.0.1:{DEAD_PORT}"], ["cannot be reached"]),
    ("mlflow-down-evaluate", lambda d, r: ["evaluate", "--model", f"models:/{MODEL}@champion", "--config",
                                           g(d), "--set", f"tracking.uri=http://127.0.0.1:{DEAD_PORT}"],
     ["cannot be reached"]),
    # -- resume
    ("resume-missing-id", lambda d, r: ["train", "--config", g(d), "--resume", "0123456789abcdef"],
     ["--resume", "0123456789abcdef", "no MLflow run"]),
    ("resume-finished", lambda d, r: ["train", "--config", g(d), "--resume", r["finished"]],
     ["FINISHED", "nothing to resume"]),
    ("resume-changed-config", lambda d, r: ["train", "--config", g(d), "--resume", r["failed"],
                                            "--set", "train.epochs=5", "--set", "train.lr=0.01"],
     ["train.epochs (run: 2, now: 5)", "train.lr", "--allow-change"]),
    ("resume-allow-unknown", lambda d, r: ["train", "--config", g(d), "--resume", r["failed"],
                                           "--allow-change", "train.epoch"], ["not a config key"]),
    ("resume-no-checkpoint", lambda d, r: ["train", "--config", g(d), "--resume", r["failed"],
                                           "--allow-change", "train.epochs", "--set", "train.epochs=4",
                                           "--allow-change", "train.storage_path",
                                           "--set", f"train.storage_path={d}/ckpt"],
     ["no checkpoint of this run"]),
    ("resume-sweep-run", lambda d, r: ["train", "--config", g(d), "--resume", r["sweep"]],
     ["belongs to a sweep"]),
    ("result-file-folder", lambda d, r: ["train", "--config", g(d), "--result-file", str(d / "no" / "r.json")],
     ["--result-file", "does not exist"]),
    # -- model URIs
    ("model-not-uri", lambda d, r: ["predict", "--model", "my-model", "--input", str(d / "rows.parquet"),
                                    "--output", str(d / "o.parquet")], ["should be a model URI"]),
    ("model-unknown-name", lambda d, r: ["predict", "--model", "models:/nope@champion", "--input",
                                         str(d / "rows.parquet"), "--output", str(d / "o.parquet")],
     ["no registered model named 'nope'", f"{MODEL} (aliases: champion->v1"]),
    ("model-unknown-alias", lambda d, r: ["predict", "--model", f"models:/{MODEL}@gold", "--input",
                                          str(d / "rows.parquet"), "--output", str(d / "o.parquet")],
     ["has no alias 'gold'"]),
    ("model-unknown-version", lambda d, r: ["predict", "--model", f"models:/{MODEL}/7", "--input",
                                            str(d / "rows.parquet"), "--output", str(d / "o.parquet")],
     ["has no version '7'"]),
    ("model-bad-version", lambda d, r: ["predict", "--model", f"models:/{MODEL}/x", "--input",
                                        str(d / "rows.parquet"), "--output", str(d / "o.parquet")],
     ["has no version 'x'"]),
    ("model-run-missing", lambda d, r: ["predict", "--model", "runs:/0123456789abcdef/model", "--input",
                                        str(d / "rows.parquet"), "--output", str(d / "o.parquet")],
     ["no MLflow run"]),
    ("evaluate-unknown-model", lambda d, r: ["evaluate", "--model", "models:/nope@champion", "--config", g(d)],
     ["no registered model named 'nope'"]),
    # -- predict inputs and outputs
    ("input-missing", lambda d, r: ["predict", "--model", f"models:/{MODEL}@champion", "--input",
                                    str(d / "none.parquet"), "--output", str(d / "o.parquet")],
     ["--input", "does not exist"]),
    ("output-parent-missing", lambda d, r: ["predict", "--model", f"models:/{MODEL}@champion", "--input",
                                            str(d / "rows.parquet"), "--output", str(d / "no" / "o.parquet")],
     ["--output", "does not exist; create it"]),
    ("output-parent-is-file", lambda d, r: ["predict", "--model", f"models:/{MODEL}@champion", "--input",
                                            str(d / "rows.parquet"), "--output", str(d / "afile.txt" / "o.csv")],
     ["--output", "does not exist"]),
    ("output-unknown-type", lambda d, r: ["predict", "--model", f"models:/{MODEL}@champion", "--input",
                                          str(d / "rows.parquet"), "--output", str(d / "o.json")],
     ["unknown file type '.json'"]),
    ("output-folder-for-file", lambda d, r: ["predict", "--model", f"models:/{MODEL}@champion", "--input",
                                             str(d / "rows.parquet"), "--output", str(d / "dir.parquet")],
     ["existing folder"]),
    ("output-shards-over-file", lambda d, r: ["predict", "--model", f"models:/{MODEL}@champion", "--input",
                                              str(d / "rows.parquet"), "--output", str(d / "afile.txt") + "/"],
     ["--output"]),
    ("output-folder-not-empty", lambda d, r: ["predict", "--model", f"models:/{MODEL}@champion", "--input",
                                              str(d / "rows.parquet"), "--output", str(d / "full")],
     ["holds files already"]),
    ("output-empty", lambda d, r: ["predict", "--model", f"models:/{MODEL}@champion", "--input",
                                   str(d / "rows.parquet"), "--output", " "], ["--output is empty"]),
    ("batch-size", lambda d, r: ["predict", "--model", f"models:/{MODEL}@champion", "--input",
                                 str(d / "rows.parquet"), "--output", str(d / "o.parquet"), "--batch-size", "0"],
     ["--batch-size"]),
    ("num-actors", lambda d, r: ["predict", "--model", f"models:/{MODEL}@champion", "--input",
                                 str(d / "rows.parquet"), "--output", str(d / "o.parquet"), "--num-actors", "0"],
     ["--num-actors"]),
    ("ray-dashboard-address", lambda d, r: ["predict", "--model", f"models:/{MODEL}@champion", "--input",
                                            str(d / "rows.parquet"), "--output", str(d / "o.parquet")],
     ["dashboard / job API address", "ray job submit", "HEAD:6379"]),
]


@pytest.mark.parametrize("argv_of, words", [pytest.param(a, w, id=i) for i, a, w in CASES])
def test_user_mistake_is_one_line_exit_2_and_changes_nothing(world, argv_of, words, capsys, monkeypatch,
                                                            request):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAYDIR_DEBUG", raising=False)
    if request.node.callspec.id == "ray-dashboard-address":
        monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    import ray

    before, ray_was_up = _state(world["uri"]), ray.is_initialized()
    argv = argv_of(world["dir"], world["runs"])
    started = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("raydir: error: ")
    for word in words:
        assert word in last, (word, last)
    assert _state(world["uri"]) == before
    assert seconds < 30, seconds  # no Ray, no data: seconds (a margin for a loaded machine)
    assert ray.is_initialized() == ray_was_up  # refused before Ray starts


def test_there_are_at_least_fifty_cases():
    assert len(CASES) >= 50


def test_resume_of_a_missing_id_is_refused_within_3_seconds(world, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    started = time.perf_counter()
    assert main(["train", "--config", g(world["dir"]), "--resume", "feedfacefeedface"]) == 2
    assert time.perf_counter() - started < 3
    assert "no MLflow run" in capsys.readouterr().err


def test_resume_of_a_finished_run_leaves_its_status(world, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    run_id = world["runs"]["finished"]
    before = MlflowClient(world["uri"]).get_run(run_id).info
    assert main(["train", "--config", g(world["dir"]), "--resume", run_id]) == 2
    after = MlflowClient(world["uri"]).get_run(run_id).info
    assert (after.status, after.end_time) == (before.status, before.end_time) == ("FINISHED", before.end_time)
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_debug_shows_the_traceback(world, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    assert main(["train", "--config", str(world["dir"] / "nope.yaml"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("raydir: error:")
    monkeypatch.setenv("RAYDIR_DEBUG", "1")
    assert main(["train", "--config", str(world["dir"] / "nope.yaml")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_an_internal_error_keeps_its_traceback():
    """A failure inside a library (not raised by raydir for user input) is not a user error."""
    import numpy as np

    from raydir.errors import UserError, user_message

    try:
        np.zeros(3).reshape(2, 2)
    except ValueError as exc:
        assert user_message(exc) is None
    assert user_message(KeyError("x")) is None
    assert user_message(UserError("bad\nthing")) == "bad thing"


# -- configs as people write them ---------------------------------------------------------------
def test_quiet_console_hides_rays_local_notices_and_keeps_other_raylet_lines(capsys):
    import logging

    import ray._private.worker as ray_worker

    from raydir.runtime import _drop_raylet_notices, quiet_console

    quiet_console(verbose=False)
    _drop_raylet_notices()  # what ensure_ray does before ray.init when not --verbose
    _drop_raylet_notices()  # wraps once
    notice = ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: "
              "127.0.0.1, which is 4x the maximum expected startup concurrency (2).")
    ray_worker.print_to_stdstream({"lines": [notice, "actor died: out of memory"], "pid": "raylet",
                                   "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr().out
    assert "actor died: out of memory" in out and "startup concurrency" not in out
    assert out.count("actor died") == 1
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1,
                               "Token authentication is enabled for this Ray cluster.", None, None)
    other = logger.makeRecord(logger.name, logging.WARNING, __file__, 1,
                              "Token authentication is disabled for this Ray cluster.", None, None)
    assert not logger.filter(record) and logger.filter(other)


def test_exponent_numbers_in_yaml_and_set(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1e-3\n  weight_decay: 5E-4\n  epochs: '3'\n"
                                     "tune:\n  space:\n    train.lr: {loguniform: [1e-4, 1e-2]}\n"
                                     "  searcher: random\n")
    cfg = Config.from_yaml(tmp_path / "c.yaml", ["rrt.lr=2e-4", "fds.sigma=1e0"])
    assert cfg.train.lr == 0.001 and cfg.train.weight_decay == 0.0005 and cfg.train.epochs == 3
    assert cfg.rrt.lr == 0.0002 and cfg.fds.sigma == 1.0
    assert cfg.tune.space["train.lr"] == {"loguniform": [0.0001, 0.01]}
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.train.epochs, int)


# -- the command line ---------------------------------------------------------------------------
def test_version_and_environment_in_help(capsys):
    from raydir import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAYDIR_STORAGE", "RAYDIR_DEBUG"):
        assert name in out


# -- unreachable clusters: real processes, timed -------------------------------------------------
@pytest.mark.parametrize("command", ["train", "tune", "prepare", "evaluate", "predict"])
def test_unreachable_ray_address_fails_within_10_seconds(world, command):
    d = world["dir"]
    argv = {"train": ["train", "--config", g(d)],
            "tune": ["tune", "--config", g(d, "tune")],
            "prepare": ["prepare", "--config", g(d)],
            "evaluate": ["evaluate", "--model", f"models:/{MODEL}@champion", "--config", g(d)],
            "predict": ["predict", "--model", f"models:/{MODEL}@champion", "--input",
                        str(d / "rows.parquet"), "--output", str(d / "o.parquet")]}[command]
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{DEAD_PORT}", "MLFLOW_TRACKING_URI": world["uri"],
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "raydir.cli", *argv], env=env, capture_output=True,
                          text=True, timeout=60)
    seconds = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr
    assert seconds < 10, seconds
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("raydir: error: ") and f"RAY_ADDRESS=127.0.0.1:{DEAD_PORT}" in last
    assert "ray start --head" in last


# -- with Ray: the README's sequence, resume after Ctrl-C ----------------------------------------
REPO = Path(__file__).resolve().parents[1]


def _tiny_demo(tmp: Path, epochs: int = 2) -> Path:
    """demo.yaml (it registers raydir-demo and moves @champion) on a small table."""
    raw = {"base": str(REPO / "jobs/configs/demo.yaml"),
           "data": {"cache_dir": str(tmp / "cache"),
                    "synthetic": {"n_train": 400, "num_features": 4, "per_bin_eval": 3, "high": 30.0}},
           "bins": {"stop": 30.0, "num_bins": 15},
           "model": {"hidden": [8], "feature_dim": 4},
           "train": {"num_workers": 1, "epochs": epochs, "batch_size": 64, "eval_batch_size": 64,
                     "storage_path": str(tmp / "ray_results")}}
    path = tmp / "tiny_demo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.ray
@pytest.mark.slow
def test_readme_sequence_train_evaluate_predict_on_champion(tmp_path, trained, monkeypatch, capsys):
    """`raydir train` (the session's model, conftest ``trained``), then `raydir evaluate` and
    `raydir predict` on `models:/NAME@champion`, as the README runs them."""
    import json

    import numpy as np
    import pandas as pd

    name, out = trained["name"], trained["console"]
    assert f"registered model: models:/{name}/1 (@champion)" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == ["1/2", "2/2"]
    result = trained["result"]
    assert result["model_uri"] == f"runs:/{result['run_id']}/model" and result["alias"] == "champion"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = str(trained["config_file"])
    assert main(["evaluate", "--model", f"models:/{name}@champion", "--config", config]) == 0
    assert f"models:/{name}/1 on test" in capsys.readouterr().out
    rows = pd.DataFrame(np.random.default_rng(0).normal(size=(40, 6)), columns=[f"x{i}" for i in range(6)])
    rows["x0"] = np.arange(40, dtype=np.int64)  # an integer column for a float feature
    rows.to_parquet(tmp_path / "rows.parquet")
    assert main(["predict", "--model", f"models:/{name}@champion", "--input",
                 str(tmp_path / "rows.parquet"), "--output", str(tmp_path / "scored.csv")]) == 0
    scored = pd.read_csv(tmp_path / "scored.csv")  # one CSV file, in input order
    assert list(scored.columns) == [*rows.columns, "prediction"] and len(scored) == 40
    np.testing.assert_array_equal(scored["x0"], np.arange(40))


def _metric_steps(uri: str, run_id: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, "train_loss")]


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_marks_killed_keeps_history_and_resumes_at_the_next_epoch(tmp_path, ray_session):
    """`raydir train` as a subprocess against an already running Ray (the session's, through
    RAY_ADDRESS): Ctrl-C, then `--resume`."""
    import signal

    from mlflow.tracking import MlflowClient

    from raydir.runtime import checkpointed_reports

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    epochs = 24
    config = str(_tiny_demo(tmp_path, epochs=epochs))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO),
           "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "raydir.cli", "train", "--config", config, "--set", "tracking.alias=",
           "--set", "tracking.log_model=false"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(uri)
    run_id, deadline = None, time.monotonic() + 240
    while time.monotonic() < deadline:  # wait for the third epoch in MLflow (epochs are short)
        time.sleep(0.2)
        if (tmp_path / "mlflow.db").exists():
            runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
            if runs and len(_metric_steps(uri, runs[0].info.run_id)) >= 3:
                run_id = runs[0].info.run_id
                break
    assert run_id, "training did not reach epoch 3"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert client.get_run(run_id).info.status == "KILLED"
    steps = _metric_steps(uri, run_id)
    reports = checkpointed_reports(str(tmp_path / "ray_results" / f"raydir-{run_id}"))
    last = int(reports[-1]["epoch"])
    assert sorted(steps) == list(range(max(steps) + 1))  # no gap, no duplicate
    assert max(steps) >= last  # every checkpointed epoch is in the history
    assert max(steps) < epochs - 1

    resumed = subprocess.run([*cmd, "--resume", run_id, "--result-file", str(tmp_path / "r.json")],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming run {run_id} at epoch {last + 2}/{epochs}" in resumed.stdout
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(_metric_steps(uri, run_id)) == list(range(epochs))  # each epoch exactly once
    import json

    assert json.loads((tmp_path / "r.json").read_text())["model_uri"] is None  # no model logged


TABLE_CASES = [
    ("table-missing-file", lambda d: {"path": str(d / "absent.csv")}, ["data.path", "does not exist"]),
    ("table-target-missing", lambda d: {"path": str(d / "t.csv"), "table": {"target": "price"}},
     ["['price']", "not found", "columns present"]),
    ("table-target-text", lambda d: {"path": str(d / "t.csv"), "table": {"target": "city"}},
     ["target column 'city'", "numeric"]),
    ("table-feature-text", lambda d: {"path": str(d / "t.csv"), "table": {"features": ["a", "city"]}},
     ["['city']", "onehot"]),
    ("table-feature-is-target", lambda d: {"path": str(d / "t.csv"), "table": {"features": ["a", "y"]}},
     ["includes the target column 'y'"]),
    ("table-format-unknown", lambda d: {"path": str(d / "t.txt")}, ["t.txt"]),
]


@pytest.mark.ray
@pytest.mark.parametrize("data_of, words", [pytest.param(a, w, id=i) for i, a, w in TABLE_CASES])
def test_table_mistakes_are_one_line(tmp_path, ray_session, data_of, words, capsys, monkeypatch):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.normal(size=60), "b": rng.normal(size=60),
                       "city": rng.choice(["x", "y"], size=60), "y": rng.uniform(0, 10, size=60)})
    df.to_csv(tmp_path / "t.csv", index=False)
    (tmp_path / "t.txt").write_text(df.to_csv(index=False))
    raw = {"data": {"source": "table", "cache_dir": "", **data_of(tmp_path)},
           "bins": {"kind": "uniform", "start": 0.0, "stop": 10.0, "num_bins": 5}}
    raw["data"].setdefault("table", {}).setdefault("target", "y")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["prepare", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("raydir: error: ")
    for word in words:
        assert word in last, (word, last)


def test_make_demo_quiets_ray_and_mlflow_like_the_cli(tmp_path):
    """`make demo` (python -m raydir.demo) sets up the console as `raydir train` does, before
    anything is imported or run: MLflow's INFO lines and artifact progress bars, Ray's INFO
    lines and notices stay off unless --verbose."""
    code = ("import os, sys; from raydir import demo\n"
            "try:\n    demo.main(sys.argv[1:])\nexcept Exception:\n    pass\n"
            "print(os.environ.get('MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR'), "
            "os.environ.get('MLFLOW_LOGGING_LEVEL'))")
    missing = str(tmp_path / "absent.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    quiet = subprocess.run([sys.executable, "-c", code, "--config", missing], env=env,
                           capture_output=True, text=True, timeout=120)
    loud = subprocess.run([sys.executable, "-c", code, "--config", missing, "--verbose"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert quiet.stdout.split() == ["false", "ERROR"], quiet.stderr
    assert loud.stdout.split() == ["None", "None"], loud.stderr
