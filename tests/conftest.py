"""Shared fixtures: the benchmark label files in the workplace's shared data directory.

The data are not part of the repository (README in the data directory); tests that need them
skip with the reason when the directory is absent. Set RAYDIR_SHARED_DATA to point elsewhere.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import pytest

DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def read_stsb_scores(path: Path) -> np.ndarray:
    """'score' column of an STS-B-DIR TSV (tab separated, header row, no quoting)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return np.array([float(row["score"]) for row in reader], dtype=np.float64)


def read_agedb_ages(path: Path) -> dict[str, np.ndarray]:
    """Ages per split ('train' / 'val' / 'test') from AgeDB-DIR's agedb.csv (age,path,split)."""
    ages: dict[str, list[float]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            ages.setdefault(row["split"], []).append(float(row["age"]))
    return {split: np.array(values, dtype=np.float64) for split, values in ages.items()}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data directory, or skip the test naming where it was looked for."""
    path = Path(os.environ.get("RAYDIR_SHARED_DATA", DEFAULT_SHARED_DATA))
    if not path.is_dir():
        pytest.skip(f"shared benchmark data not found at {path} (set RAYDIR_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def stsb_scores(shared_data: Path) -> dict[str, np.ndarray]:
    """STS-B-DIR scores per split: {'train': 5249, 'dev': 1000, 'test': 1000 values}."""
    folder = shared_data / "sts-b-dir"
    files = {split: folder / f"{split}_new.tsv" for split in ("train", "dev", "test")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        pytest.skip(f"STS-B-DIR files missing: {missing}")
    return {split: read_stsb_scores(p) for split, p in files.items()}


@pytest.fixture(scope="session")
def agedb_ages(shared_data: Path) -> dict[str, np.ndarray]:
    """AgeDB-DIR ages per split: {'train': 12208, 'val': 2140, 'test': 2140 values}."""
    path = shared_data / "agedb-dir" / "agedb.csv"
    if not path.is_file():
        pytest.skip(f"AgeDB-DIR label file missing: {path}")
    return read_agedb_ages(path)


@pytest.fixture(scope="session", autouse=True)
def _work_in_a_temporary_directory(tmp_path_factory):
    """Tests write only to temporary directories: whatever defaults to the working directory
    (a default mlflow.db, MLflow's ./mlruns) lands in a session folder, not the checkout."""
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(previous)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (quiet, no dashboard).

    Four logical CPUs on a 2-core machine: two Ray Train workers reserve one each, and Ray
    Data ingest and evaluation tasks need CPUs beside them.
    """
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        from raydir.runtime import start_local_ray

        # as `raydir train` starts it (environment, dashboard for the placement-group cleaner)
        start_local_ray(4, log_to_driver=False, configure_logging=False, ignore_reinit_error=True)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False  # no execution-plan lines per Dataset run
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    yield ray
    if started:
        ray.shutdown()


# -- one model trained for the whole session --------------------------------------------------
TRAINED_NAME = "raydir-test-model"


@pytest.fixture(scope="session")
def trained(tmp_path_factory, ray_session):
    """One model trained once per session the way the README does it: ``raydir train --config
    FILE`` (demo.yaml as base) with MLFLOW_TRACKING_URI set, 2 Ray Train workers, sqrt-inverse
    LDS + FDS, registered as ``raydir-test-model`` version 1 with alias ``champion``.

    Shared by the tests of the tracked run, the served pyfunc model, predict, evaluate and the
    README sequence; they read it and add evaluation runs, and none changes its versions or
    aliases. Returns the config file, the config (with ``tracking.uri``), the tracking URI,
    the CLI's result file content and its console output.
    """
    import contextlib
    import io
    import json

    import yaml

    from raydir.cli import main
    from raydir.config import Config

    tmp = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    raw = {"base": str(Path(__file__).resolve().parents[1] / "jobs/configs/demo.yaml"),
           "data": {"cache_dir": str(tmp / "cache"), "seed": 3,
                    "synthetic": {"n_train": 600, "num_features": 6, "per_bin_eval": 4, "high": 40.0}},
           "bins": {"stop": 40.0, "num_bins": 20},
           "model": {"hidden": [16], "feature_dim": 8},
           "reweight": {"scheme": "sqrt_inv", "lds": True},
           "fds": {"enabled": True},
           "train": {"num_workers": 2, "epochs": 2, "batch_size": 50, "eval_batch_size": 64,
                     "storage_path": str(tmp / "ray_results"), "cpus_per_worker": 1.0},
           "tracking": {"experiment": "tests", "register_name": TRAINED_NAME}}
    path = tmp / "trained.yaml"
    path.write_text(yaml.safe_dump(raw))
    console = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(console):
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("RAY_ADDRESS", raising=False)
        code = main(["train", "--config", str(path), "--result-file", str(tmp / "result.json")])
    assert code == 0, console.getvalue()
    return {"tmp": tmp, "config_file": path, "uri": uri, "name": TRAINED_NAME,
            "cfg": Config.from_yaml(path).with_overrides({"tracking.uri": uri}),
            "result": json.loads((tmp / "result.json").read_text()), "console": console.getvalue()}
