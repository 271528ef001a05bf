"""MLflow helpers that need no Ray: where an embedded store keeps its artifacts, and the
pinned requirements of the logged model."""

from __future__ import annotations

from importlib.metadata import version

from mlflow.tracking import MlflowClient

from raydir.tracking import artifact_root, end_run, experiment_id, model_requirements


def test_artifact_root_sits_beside_a_sqlite_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert artifact_root("sqlite:///runs/mlflow.db") == (tmp_path / "runs" / "mlartifacts").as_uri()
    assert artifact_root(f"sqlite:///{tmp_path}/x/mlflow.db") == (tmp_path / "x" / "mlartifacts").as_uri()
    assert artifact_root("sqlite:///:memory:") is None
    assert artifact_root("http://127.0.0.1:5000") is None
    assert artifact_root("databricks") is None


def test_experiment_is_created_once_with_its_artifacts_beside_the_database(tmp_path):
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    (tmp_path / "db").mkdir()
    client = MlflowClient(uri)
    first = experiment_id(client, uri, "dir runs")
    assert experiment_id(client, uri, "dir runs") == first
    location = client.get_experiment(first).artifact_location
    assert location == f"{(tmp_path / 'db' / 'mlartifacts').as_uri()}/dir runs"


def test_a_killed_run_is_not_turned_failed_by_a_late_error_path(tmp_path):
    # ASHA: the sweep driver marks a stopped trial's run KILLED; the trial's own error path may
    # close it after that.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = experiment_id(client, uri, "runs")
    killed, running = (client.create_run(exp).info.run_id for _ in range(2))
    end_run(uri, killed, "KILLED")
    end_run(uri, killed, "FAILED")
    end_run(uri, running, "FAILED")
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(running).info.status == "FAILED"


def test_a_stopped_trial_stays_killed_in_every_interleaving(tmp_path, monkeypatch):
    """The sweep driver (tag, then KILLED) and the trial's error path (FAILED unless KILLED)
    racing on one run: every order of their reads and writes ends KILLED. The order that
    once left FAILED in a full test run: the trial reads RUNNING, the driver then tags and
    kills the run, and the trial writes FAILED."""
    import raydir.tracking as tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = experiment_id(client, uri, "runs")

    def driver(run_id):
        tracking.mark_stopped_early(MlflowClient(uri), run_id)

    # the driver first, the trial after, and the other way round
    for first in ("driver", "trial"):
        run_id = client.create_run(exp).info.run_id
        for who in ((first, "trial") if first == "driver" else ("trial", "driver")):
            driver(run_id) if who == "driver" else end_run(uri, run_id, "FAILED")
        assert client.get_run(run_id).info.status == "KILLED", first

    # the driver runs between the trial's status read and its FAILED write
    run_id = client.create_run(exp).info.run_id
    real_get_run, calls = MlflowClient.get_run, []

    def get_run_then_driver(self, rid):
        run = real_get_run(self, rid)
        if rid == run_id and not calls:
            calls.append(rid)
            driver(rid)  # after the trial has read RUNNING
        return run

    monkeypatch.setattr(MlflowClient, "get_run", get_run_then_driver)
    end_run(uri, run_id, "FAILED")
    monkeypatch.setattr(MlflowClient, "get_run", real_get_run)
    assert calls == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags[tracking.STOPPED_EARLY_TAG] == "true"


def test_model_requirements_pin_the_installed_versions():
    reqs = model_requirements("features")
    assert f"torch=={version('torch')}" in reqs and f"mlflow=={version('mlflow')}" in reqs
    assert any(r.startswith("raydir==") for r in reqs)
    assert not any(r.startswith("pillow") for r in reqs)
    assert f"pillow=={version('pillow')}" in model_requirements("image")
