"""`raydir tune`: search spaces, resources checked before the sweep, nested MLflow runs with
the trial table and plot, registration and the alias rule, and resume after an interruption.
Real Ray Tune + Ray Train (shared session instance, 1 worker per trial) and a SQLite MLflow."""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from raydir.config import Config
from raydir.tune import (SweepError, alias_decision, check_resources, check_trial_values,
                         metric_value, run_sweep, search_space)

from hooks import InterruptAfter

REPO = Path(__file__).resolve().parents[1]


def small_config(tmp_path, *, space=None, tune=None, **sections) -> Config:
    raw = {
        "data": {"source": "synthetic", "cache_dir": str(tmp_path / "cache"), "seed": 3,
                 "synthetic": {"n_train": 600, "num_features": 6, "per_bin_eval": 4, "high": 40.0}},
        "bins": {"kind": "uniform", "start": 0.0, "stop": 40.0, "num_bins": 20},
        "model": {"hidden": [16], "feature_dim": 8},
        "train": {"num_workers": 1, "epochs": 2, "batch_size": 50, "eval_batch_size": 64, "lr": 0.02,
                  "storage_path": str(tmp_path / "ray_results"), "cpus_per_worker": 1.0},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tune-tests"},
        "tune": {"space": space if space is not None else {"reweight.ks": {"grid": [3, 5, 7]}},
                 "scheduler": "none", **(tune or {})},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return Config.from_dict(raw)


def _children(client: MlflowClient, parent_run_id: str):
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


# -- bad input, before any Ray work --------------------------------------------------------------
def test_unknown_space_key_lists_the_sweepable_keys(tmp_path):
    with pytest.raises(ValueError) as err:
        small_config(tmp_path, space={"fds.sigmaa": {"grid": [1, 2]}})
    msg = str(err.value)
    assert "unknown key 'fds.sigmaa'" in msg and "Did you mean 'fds.sigma'?" in msg
    assert "'reweight.ks'" in msg and "'loss.focal_beta'" in msg  # the valid ones are listed


@pytest.mark.parametrize("space, fragment", [
    ({}, "'tune.space' is empty: nothing to sweep"),
    ({"reweight.ks": {"grid": []}}, "'tune.space.reweight.ks' has no values to try"),
    ({"fds.sigma": {"uniform": []}}, "'tune.space.fds.sigma' has no values to try"),
    ({"fds.ks": {"grid": [3, 4]}}, "the trial {'fds.ks': 4} would not be a valid config"),
    ({"fds.sigma": {"uniform": [1, 3]}}, "'tune.searcher' is 'grid' but ['fds.sigma'] are ranges"),
    ({"reweight.ks": {"linspace": [3, 5]}}, "'tune.space.reweight.ks' should be one of"),
])
def test_bad_space_fails_before_the_sweep(tmp_path, space, fragment):
    with pytest.raises(ValueError) as err:
        cfg = small_config(tmp_path, space=space)
        run_sweep(cfg)  # only reached for what the config itself accepts
    assert fragment in str(err.value)
    assert not (tmp_path / "mlflow.db").exists()  # nothing was tracked


def test_cli_space_error_exits_before_ray(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tune:\n  space:\n    fds.kss: {grid: [3, 5]}\n")
    code = ("import sys; from raydir.cli import main; "
            f"rc = main(['tune', '--config', {str(path)!r}]); print(rc, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["2", "False"], out.stderr
    assert "Sweepable keys" in out.stderr


def test_space_formats_and_override():
    cfg = Config.from_yaml(REPO / "jobs/configs/tune_demo.yaml",
                           ["tune.space.fds.ks=[3, 5]", "tune.searcher=random"])
    assert cfg.tune.space["fds.ks"] == [3, 5]  # a bare list is a grid
    space = search_space(cfg)
    assert space["fds.ks"] == {"grid_search": [3, 5]}
    assert type(space["fds.sigma"]).__name__ == "Float"
    assert check_trial_values(cfg) == 0  # ranges: no fixed trial count
    grid = Config.from_dict({"tune": {"space": {"reweight.ks": [3, 5], "fds.kernel": {"choice": ["gaussian", "laplace"]}},
                                      "num_samples": 2}})
    assert check_trial_values(grid) == 8 and search_space(grid)["fds.kernel"] == {"grid_search": ["gaussian", "laplace"]}


def test_metric_combination_and_missing_shot_region():
    vals = {"val_mae": 2.0, "val_few_mae": 4.0, "val_mse": 9.0, "val_many_mae": math.nan}
    assert metric_value(vals, "mae") == 2.0
    assert metric_value(vals, "mae+few_mae") == 3.0  # the mean of the terms
    assert metric_value(vals, "many_mae") == 2.0     # empty region -> the overall metric
    with pytest.raises(ValueError, match="Valid terms"):
        Config.from_dict({"tune": {"metric": "mae+r2"}})
    with pytest.raises(ValueError, match="mixes errors"):
        Config.from_dict({"tune": {"metric": "mae+pearson"}})


def test_resource_check_names_the_numbers():
    cfg = Config.from_dict({"train": {"num_workers": 8, "cpus_per_worker": 2}})
    with pytest.raises(SweepError) as err:
        check_resources(cfg, {"CPU": 4.0})
    msg = str(err.value)
    assert "needs 16 CPUs (train.num_workers=8 x train.cpus_per_worker=2)" in msg
    assert "the Ray cluster has 4 CPUs and 0 GPUs" in msg
    gpu = Config.from_dict({"train": {"num_workers": 2, "use_gpu": True}})
    with pytest.raises(SweepError, match="and 2 GPUs .*has 16 CPUs and 1 GPUs"):
        check_resources(gpu, {"CPU": 16.0, "GPU": 1.0})
    one = Config.from_dict({"train": {"num_workers": 1}, "tune": {"max_concurrent_trials": 9}})
    notes = []
    assert check_resources(one, {"CPU": 4.0}, log=notes.append) == 2  # + 1 CPU each for Ray Data
    assert "only 2 trial(s) fit" in notes[0]


def test_alias_decision():
    tags = {"raydir.val_metric": "mae", "raydir.val_value": "2.0", "raydir.val_data": "k"}
    holder = {"version": 1, "tags": tags}
    assert alias_decision(1.5, None, metric="mae", data_key="k", mode="min")[0]
    assert alias_decision(1.5, holder, metric="mae", data_key="k", mode="min") == (
        True, "val mae 1.5000 beats 2.0000 of version 1")
    moved, why = alias_decision(2.5, holder, metric="mae", data_key="k", mode="min")
    assert not moved and why == "val mae 2.5000 does not beat 2.0000 of version 1"
    assert not alias_decision(2.0, holder, metric="mae", data_key="k", mode="min")[0]  # a tie keeps it
    assert "cannot be compared" in alias_decision(0.1, holder, metric="few_mae", data_key="k", mode="min")[1]
    assert "other validation data" in alias_decision(0.1, holder, metric="mae", data_key="j", mode="min")[1]


@pytest.mark.parametrize("scheduler, reused", [("none", True), ("asha", False)])
def test_trial_processes_are_reused_only_where_no_trial_is_stopped(tmp_path, scheduler, reused):
    """Tune's ``reuse_actors`` as the sweep's Tuner gets it (no Ray needed to build one); the
    ASHA sweep below checks Tune's record of the processes, and `raydir bench` (no scheduler)
    runs its resumed trials in a reused process."""
    from raydir.tune import _tuner

    cfg = small_config(tmp_path, tune={"scheduler": scheduler})
    tuner = _tuner(cfg, lambda _c: None, "s", str(tmp_path), False, "min", 1, None)
    assert tuner._local_tuner._tune_config.reuse_actors is reused


# -- real sweeps -----------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_trial_larger_than_the_cluster_fails_before_the_sweep(tmp_path, ray_session):
    cfg = small_config(tmp_path, train={"num_workers": 8})
    with pytest.raises(SweepError, match=r"needs 8 CPUs .* the Ray cluster has 4 CPUs"):
        run_sweep(cfg)
    assert not (tmp_path / "ray_results").exists()  # no experiment was started


@pytest.fixture(scope="module")
def first_sweep(tmp_path_factory, ray_session):
    """A 2-trial grid sweep, one trial at a time, interrupted after its first trial and then
    run again with the same config (which resumes it): what the first run left, and the
    resumed sweep's result and log lines."""
    tmp = tmp_path_factory.mktemp("sweep")
    cfg = small_config(tmp, space={"reweight.ks": {"grid": [3, 7]}},
                       tracking={"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "tune-tests",
                                 "register_name": "tune-test-model"},
                       tune={"max_concurrent_trials": 1})
    first = run_sweep(cfg, log=lambda _m: None,
                      callbacks=[InterruptAfter(1, str(tmp / "interrupted"))])
    client = MlflowClient(cfg.tracking.uri)
    first_status = client.get_run(first["parent_run_id"]).info.status
    first_versions = client.search_model_versions("name='tune-test-model'")
    lines: list[str] = []
    out = run_sweep(cfg, log=lines.append)
    return {"tmp": tmp, "cfg": cfg, "first": first, "first_status": first_status,
            "first_versions": first_versions, "out": out, "lines": lines}


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(first_sweep):
    first, out = first_sweep["first"], first_sweep["out"]
    assert first["interrupted"]
    done = [r for r in first["trials"] if r["status"] == "completed"]
    assert len(done) == 1
    assert first_sweep["first_status"] == "KILLED"
    assert first_sweep["first_versions"] == []  # an interrupted sweep registers nothing

    assert not out["interrupted"] and out["parent_run_id"] == first["parent_run_id"]
    client = MlflowClient(first_sweep["cfg"].tracking.uri)
    children = _children(client, first["parent_run_id"])
    assert len(children) == 2  # one per trial: the finished one was not started again
    finished_before = done[0]["mlflow_run_id"]
    assert finished_before in {r["mlflow_run_id"] for r in out["trials"]}
    steps = sorted(m.step for m in client.get_metric_history(finished_before, "val_mae"))
    assert steps == [0, 1]  # its epochs were logged once


@pytest.mark.ray
@pytest.mark.slow
def test_grid_sweep_nests_one_run_per_trial_with_table_and_plot(first_sweep):
    tmp, cfg, out = first_sweep["tmp"], first_sweep["cfg"], first_sweep["out"]
    assert not out["interrupted"] and len(out["trials"]) == 2
    client = MlflowClient(cfg.tracking.uri)
    children = _children(client, out["parent_run_id"])
    assert sorted(int(r.data.params["reweight.ks"]) for r in children) == [3, 7]
    for run in children:
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_few_mae"))
        assert steps == [0, 1]  # per-epoch shot metrics
        assert {"test_mae", "test_few_mae", "best_val_mae"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(out["parent_run_id"])}
    assert {"trials.csv", "metric_vs_params.png", "config.yaml"} <= artifacts
    table = pd.read_csv(client.download_artifacts(out["parent_run_id"], "trials.csv", str(tmp)))
    assert sorted(table["reweight.ks"]) == [3, 7]
    assert {"objective", "stopped_early", "status", "val_few_mae", "test_few_mae"} <= set(table.columns)
    assert (table["status"] == "completed").all() and not table["stopped_early"].any()
    best = table.loc[table["objective"].idxmin()]
    assert out["best"]["mlflow_run_id"] == best["mlflow_run_id"]
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials"] == 2


@pytest.mark.ray
@pytest.mark.slow
def test_first_sweep_registers_best_and_sets_champion(first_sweep):
    cfg, out, lines = first_sweep["cfg"], first_sweep["out"], first_sweep["lines"]
    assert out["registered_model"] == {"name": "tune-test-model", "version": 1}
    assert out["alias"]["moved"] and "no version holds it yet" in out["alias"]["message"]
    client = MlflowClient(cfg.tracking.uri)
    mv = client.get_model_version_by_alias("tune-test-model", "champion")
    assert str(mv.version) == "1" and mv.run_id == out["best"]["mlflow_run_id"]
    assert mv.tags["raydir.val_metric"] == "mae"
    assert float(mv.tags["raydir.val_value"]) == pytest.approx(out["best"]["objective"])
    assert any("alias 'champion' moved to tune-test-model version 1" in line for line in lines)


@pytest.mark.ray
@pytest.mark.slow
def test_worse_second_sweep_does_not_move_champion(first_sweep, monkeypatch, capsys):
    """A second sweep through the job entrypoint (`jobs/tune.py`, what `ray job submit` runs)
    finds a worse model: registered as version 2, the alias stays on version 1."""
    tmp, cfg, out1 = first_sweep["tmp"], first_sweep["cfg"], first_sweep["out"]
    # A learning rate that leaves the initial weights in place: a worse model, same metric/data.
    worse = cfg.with_overrides({"tune.space": {"reweight.ks": {"grid": [5]}}, "train.lr": 1e-9,
                                "train.epochs": 1, "tune.name": "worse"})
    config_file, result_file = tmp / "worse.yaml", tmp / "worse.json"
    config_file.write_text(worse.to_yaml())
    monkeypatch.setattr(sys, "argv", ["jobs/tune.py", "--config", str(config_file),
                                      "--result-file", str(result_file)])
    with pytest.raises(SystemExit) as code:
        runpy.run_path(str(REPO / "jobs/tune.py"), run_name="__main__")
    assert code.value.code == 0
    printed = capsys.readouterr().out
    result = json.loads(result_file.read_text())
    assert result["best"]["objective"] > out1["best"]["objective"]
    assert (result["model_name"], result["model_version"]) == ("tune-test-model", 2)  # registered all the same
    assert result["trials"] == 1 and set(result["test_metrics"]) == {"overall", "many", "medium", "few"}
    assert not result["alias"]["moved"] and result["alias"]["version"] == 1
    assert "not moved (stays on version 1)" in result["alias"]["message"]
    assert "does not beat" in result["alias"]["message"]
    assert "alias 'champion' not moved" in printed
    header = next(line for line in printed.splitlines() if line.split()[:1] == ["rank"])
    assert {"reweight.ks", "objective", "status"} <= set(header.split())  # the ranking table
    client = MlflowClient(cfg.tracking.uri)
    assert str(client.get_model_version_by_alias("tune-test-model", "champion").version) == "1"


@pytest.mark.ray
@pytest.mark.slow
def test_asha_stops_trials_that_cannot_learn(tmp_path, ray_session):
    """Run one at a time in grid order, the trial whose learning rate leaves the model at its
    initial weights falls behind the first at the first rung: ASHA ends it there, and the
    table, the parent's metrics and the child runs say so."""
    cfg = small_config(tmp_path, space={"train.lr": {"grid": [0.05, 1e-9]}},
                       tune={"scheduler": "asha", "grace_period": 1, "reduction_factor": 2,
                             "max_concurrent_trials": 1, "log_models": False},
                       train={"epochs": 3})
    out = run_sweep(cfg, log=lambda _m: None)
    assert _trial_pids(out["experiment_path"]) == 2  # under ASHA no trial process is reused
    by_lr = {r["train.lr"]: r for r in out["trials"]}
    assert by_lr[0.05]["status"] == "completed" and by_lr[0.05]["epochs_done"] == 3
    assert by_lr[1e-9]["status"] == "stopped_early" and by_lr[1e-9]["epochs_done"] < 3
    assert out["best"]["train.lr"] == 0.05
    client = MlflowClient(cfg.tracking.uri)
    parent = client.get_run(out["parent_run_id"])
    assert parent.data.metrics["trials_stopped_early"] == 1
    rows = {r["mlflow_run_id"]: r for r in out["trials"]}
    children = _children(client, out["parent_run_id"])
    assert {run.info.run_id for run in children} == set(rows)
    for run in children:
        row = rows[run.info.run_id]
        stopped = row["status"] == "stopped_early"
        assert run.info.status == ("KILLED" if stopped else "FINISHED")
        assert (run.data.tags.get("raydir.stopped_early") == "true") == stopped
        # each epoch it reported is logged once (ASHA decides on the last one logged)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_mae")]
        assert sorted(steps) == list(range(len(steps))) and len(steps) >= row["epochs_done"]
    # The stopped trials' Ray Train workers gave their CPUs back (a leak starves later trials).
    deadline = time.monotonic() + 60  # the cleaner polls; a loaded machine slows it down
    while _live_placement_groups(ray_session) and time.monotonic() < deadline:
        time.sleep(1)
    assert _live_placement_groups(ray_session) == []


def _trial_pids(experiment_path: str) -> int:
    """How many processes ran the experiment's trials (the pid Tune records with each result)."""
    from ray.tune import ExperimentAnalysis

    frames = ExperimentAnalysis(experiment_path).trial_dataframes.values()
    return len({int(pid) for df in frames for pid in df["pid"]})


def _live_placement_groups(ray):
    return [pg["bundles"] for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]


def test_method_sweep_expands_presets_and_ranks_best_first():
    """`tune.space.method` takes the bench's named presets: each trial gets the preset's keys
    (then the other swept keys), resampling presets are refused before the sweep, and the
    printed table ranks the trials best first on the sweep metric."""
    from raydir.tune import ranking_table, trial_config

    cfg = Config.from_yaml(REPO / "jobs" / "configs" / "tune_methods.yaml")
    assert check_trial_values(cfg) == len(cfg.tune.space["method"]["grid"])
    c = trial_config(cfg, {"method": "lds+ranksim", "train.lr": 0.01})
    assert (c.reweight.scheme, c.reweight.lds, c.ranksim.weight, c.train.lr) == ("sqrt_inv", True, 0.01, 0.01)
    assert trial_config(cfg, {"method": "vanilla"}).to_flat_dict() == cfg.to_flat_dict()
    with pytest.raises(SweepError, match="resamples the training data"):
        check_trial_values(cfg.with_overrides({"tune.space": {"method": {"grid": ["vanilla", "smoter"]}}}))
    with pytest.raises(SweepError, match="unknown method 'nope'"):
        check_trial_values(cfg.with_overrides({"tune.space": {"method": {"grid": ["nope"]}}}))
    rows = [{"trial_id": "a", "status": "completed", "method": "vanilla", "objective": 3.0},
            {"trial_id": "b", "status": "error", "method": "bmc", "objective": float("nan")},
            {"trial_id": "c", "status": "completed", "method": "lds", "objective": 2.0}]
    lines = ranking_table(rows, ["method"], "min").splitlines()
    assert [line.split()[1] for line in lines[1:]] == ["c", "a", "b"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]
