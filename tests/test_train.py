"""Training on Ray Train with MLflow: FDS all-reduced across workers, fault tolerance, RRT,
the logged and registered model. Real Ray (shared session instance) and a SQLite MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

import raydir
from raydir.config import Config
from raydir.train import run_training

from hooks import DumpFDS, KillOnce

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def small_config(tmp_path, **sections) -> Config:
    raw = {
        "data": {"source": "synthetic", "cache_dir": str(tmp_path / "cache"), "seed": 3,
                 "synthetic": {"n_train": 600, "num_features": 6, "per_bin_eval": 4, "high": 40.0}},
        "bins": {"kind": "uniform", "start": 0.0, "stop": 40.0, "num_bins": 20},
        "model": {"hidden": [16], "feature_dim": 8},
        "train": {"num_workers": 2, "epochs": 2, "batch_size": 50, "eval_batch_size": 64,
                  "storage_path": str(tmp_path / "ray_results"), "cpus_per_worker": 1.0},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return Config.from_dict(raw)


def _stats(path):
    return torch.load(path, weights_only=False)


def _one_process_fds(cfg: Config, epochs: int) -> list[dict]:
    """FDS statistics after each epoch's update of the training loop run in this process at
    world size 1 on the whole training split (no Ray Train, no DDP)."""
    from raydir import loop
    from raydir.data.pipeline import prepare

    prepared = prepare(cfg, log=lambda _m: None).train_in_memory(cfg.train.materialize, log=lambda _m: None)
    parts = loop.build_parts(cfg, prepared.model_info(cfg.target_scale), bin_weights=prepared.bin_weights,
                             train_counts=prepared.train_counts, device=torch.device("cpu"))
    batches = list(prepared.base_datasets["train"].iter_torch_batches(batch_size=cfg.train.batch_size))
    state, out = loop.LoopState(), []
    for epoch in range(epochs):
        loop.train_epoch(parts, state, epoch, batches)
        loop.fds_end_of_epoch(parts, state, epoch, lambda: batches)
        out.append({k: v.clone() for k, v in parts.core.fds.statistics().items()})
    return out


def test_fds_statistics_equal_across_ranks_and_one_process(tmp_path, ray_session):
    """A 2-worker run ends every epoch with the FDS running statistics that one process
    computes on the whole training split, and both ranks hold identical statistics. The
    learning rate is so small that the weights stay put, so the features are a fixed function
    of the inputs and only the way the data is sharded differs."""
    dump = tmp_path / "dump"
    dump.mkdir()
    cfg = small_config(tmp_path, fds={"enabled": True, "start_update": 0, "start_smooth": 1},
                       # streamed from the cache (Ray Train's streaming split), the path of
                       # splits too large for memory; the other tests train on in-memory pieces
                       train={"lr": 1e-12, "epochs": 2, "num_workers": 2, "materialize": "never"},
                       tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "log_model": False})
    run_training(cfg, callbacks=[DumpFDS(str(dump))])
    one = _one_process_fds(cfg, epochs=2)
    for epoch in (0, 1):
        two = [_stats(dump / f"rank{r}_epoch{epoch}.pt") for r in (0, 1)]
        for key in ("running_mean", "running_var", "smoothed_mean", "smoothed_var"):
            assert torch.equal(two[0][key], two[1][key]), (epoch, key)  # identical on both ranks
            np.testing.assert_allclose(two[0][key].numpy(), one[epoch][key].numpy(), rtol=1e-6,
                                       atol=1e-7, err_msg=f"epoch {epoch} {key}")
        assert int(two[0]["count"].sum()) == int(one[epoch]["count"].sum()) == 600
    # the run config reaches the workers with the MLflow callback in it; only the controller
    # opens MLflow (importing it cost each worker 2-3 s of CPU at start-up)
    assert [(dump / f"rank{r}_mlflow.txt").read_text() for r in (0, 1)] == ["False", "False"]


def test_run_is_tracked_registered_and_served(trained):
    """The session's model (`raydir train`, 2 workers, LDS + FDS): its MLflow run, artifacts,
    registered version and the served pyfunc model."""
    tmp, name, result = trained["tmp"], trained["name"], trained["result"]
    client = MlflowClient(trained["uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    # artifacts beside the database, whatever the working directory
    assert run.info.artifact_uri.startswith((tmp / "mlartifacts").as_uri())
    params = run.data.params
    assert params["fds.enabled"] == "True" and params["reweight.scheme"] == "sqrt_inv"
    assert params["train.num_workers"] == "2" and params["derived.fds_gather"] == "inflight"
    history = client.get_metric_history(run.info.run_id, "val_mae")
    assert sorted(m.step for m in history) == [0, 1]
    for key in ("test_mae", "test_few_mae", "test_many_count", "test_medium_mse", "test_pearson"):
        assert key in run.data.metrics, key
    assert run.data.metrics["test_count"] == result["test_metrics"]["overall"]["count"] == 20 * 4
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    for artifact in ("config.yaml", "train_label_density.png", "per_bin_test.csv",
                     "test_error_vs_density.png", "fds_feature_similarity.png",
                     "fds_smoothing_distance.png", "test_shot_metrics.json"):
        assert artifact in artifacts, artifact
    per_bin = pd.read_csv(client.download_artifacts(run.info.run_id, "per_bin_test.csv", str(tmp)))
    assert per_bin["count"].sum() == 80 and len(per_bin) == 20

    assert (result["model_name"], result["model_version"]) == (name, 1)
    assert client.get_model_version(name, "1").run_id == run.info.run_id
    mlflow.set_tracking_uri(trained["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{name}/1")
    raw = pd.DataFrame({f"x{i}": np.linspace(-1, 1, 5) for i in range(6)})
    pred = np.asarray(model.predict(raw))
    assert pred.shape == (5,) and np.isfinite(pred).all()
    with pytest.raises(Exception, match="x5"):
        model.predict(raw.drop(columns=["x5"]))
    reqs = mlflow.pyfunc.get_model_dependencies(f"models:/{name}/1")
    pinned = dict(line.split("==") for line in Path(reqs).read_text().split() if "==" in line)
    assert pinned["torch"] == torch.__version__ and pinned["raydir"] == raydir.__version__


def test_worker_killed_mid_run_resumes_from_checkpoint(tmp_path, ray_session):
    dump = tmp_path / "dump"
    dump.mkdir()
    marker = tmp_path / "killed"
    cfg = small_config(tmp_path, fds={"enabled": True},
                       train={"epochs": 3, "max_failures": 1},
                       tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "log_model": False})
    result = run_training(cfg, callbacks=[KillOnce(epoch=2, rank=1, marker=str(marker)),
                                          DumpFDS(str(dump))])
    assert marker.read_text() == "killed at epoch 2"
    # Both restarted workers restored the FDS buffers of the last registered checkpoint: epoch
    # 1's, or epoch 0's when the controller had not taken epoch 1's report before the kill
    # (a worker holds one report in flight; the one before it is always registered).
    restored_files = sorted(dump.glob("restored_rank0_epoch*.pt"))
    assert len(restored_files) == 1, restored_files
    epoch = int(restored_files[0].stem.rsplit("epoch", 1)[1])
    assert epoch in (0, 1)
    restored = [_stats(dump / f"restored_rank{r}_epoch{epoch}.pt") for r in (0, 1)]
    before = _stats(dump / f"rank0_epoch{epoch}.pt")
    for key in ("running_mean", "running_var", "smoothed_mean", "smoothed_var"):
        assert torch.equal(restored[0][key], before[key]) and torch.equal(restored[1][key], before[key])
    client = MlflowClient(cfg.tracking.uri)
    steps = sorted(m.step for m in client.get_metric_history(result["run_id"], "val_mae"))
    assert steps == [0, 1, 2]  # every epoch logged exactly once


def test_unreachable_tracking_server_fails_before_training(tmp_path):
    cfg = small_config(tmp_path, tracking={"uri": "http://127.0.0.1:9"})
    with pytest.raises(ConnectionError, match=r"http://127.0.0.1:9 cannot be reached"):
        run_training(cfg)


def test_interrupted_run_continues_with_resume(tmp_path, ray_session):
    """A run that dies with no retries left is continued by `--resume RUN_ID` from its last
    checkpoint: the finished epochs are not trained again and each is logged once. The run
    uses RRT (2 epochs, then 2 of regressor re-training) and dies in stage two's first epoch:
    the resumed run re-enters stage two from stage one's best weights and changes only the
    regressor."""
    marker = tmp_path / "killed"
    cfg = small_config(tmp_path, train={"epochs": 2, "max_failures": 0},
                       rrt={"enabled": True, "epochs": 2, "lr": 0.01},
                       tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "log_model": False})
    logs: list[str] = []
    with pytest.raises(Exception):
        run_training(cfg, log=logs.append, callbacks=[KillOnce(epoch=2, rank=0, marker=str(marker))])
    assert marker.read_text() == "killed at epoch 2"
    hint = [m for m in logs if "--resume" in m]
    assert hint, logs
    run_id = hint[0].rsplit(" ", 1)[-1].rstrip("`")
    client = MlflowClient(cfg.tracking.uri)
    assert client.get_run(run_id).info.status == "FAILED"
    # Logged: the epochs whose checkpoints were registered (epoch 1's report may have been in
    # flight when the worker died).
    before = {m.step: m.timestamp for m in client.get_metric_history(run_id, "val_mae")}
    assert sorted(before) in ([0], [0, 1])

    result = run_training(cfg, resume=run_id)
    assert result["run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    after = client.get_metric_history(run_id, "val_mae")
    assert sorted(m.step for m in after) == [0, 1, 2, 3]  # once each
    # The epochs logged before the failure were not trained (and logged) again.
    assert {m.step: m.timestamp for m in after if m.step in before} == before

    final = torch.load(f"{result['checkpoint_path']}/final.pt", weights_only=False)
    one, two = final["stage_one_best"], final["model"]
    assert one.keys() == two.keys()
    changed = {k for k in one if not torch.equal(one[k], two[k])}
    assert changed and changed <= {"head.weight", "head.bias"}
    assert [h["stage"] for h in final["history"]] == [1, 1, 2, 2]
