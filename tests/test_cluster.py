"""Cluster operation: cluster.yaml against Ray's own schema, and real components on 127.0.0.1.

The `cluster` tests start their own Ray head (token authentication on), a second Ray node and
an `mlflow server`, each in its own process group under a private temp dir, and stop exactly
those processes afterwards, also when a test fails. They never call `ray stop`, which would
stop every Ray instance on the machine (the test session's own included).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {
    "data": {"source": "synthetic", "seed": 3,
             "synthetic": {"n_train": 400, "num_features": 6, "per_bin_eval": 3, "high": 40.0}},
    "bins": {"kind": "uniform", "start": 0.0, "stop": 40.0, "num_bins": 20},
    "model": {"hidden": [16], "feature_dim": 8},
    "fds": {"enabled": True, "start_update": 0, "start_smooth": 1},
    "train": {"num_workers": 1, "epochs": 2, "batch_size": 50, "eval_batch_size": 64,
              "cpus_per_worker": 1.0},
    "tracking": {"experiment": "cluster-test"},
}


# -- cluster.yaml -----------------------------------------------------------------------------
def _validate(config: dict) -> dict:
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    pytest.importorskip("jsonschema")
    filled = fillout_defaults(config)  # merges the provider's defaults.yaml; no cloud calls
    validate_config(filled)
    return filled


def _local_variant(text: str) -> dict:
    start = text.index("# --- local provider")
    end = text.index("# --- end local provider")
    lines = [ln[2:] for ln in text[start:end].splitlines() if ln.startswith("# ") and not ln.startswith("# ---")]
    block = "\n".join(ln for ln in lines if ln.startswith((" ", "provider", "auth", "available",
                                                         "head_node_type")))
    return yaml.safe_load(block)


def test_cluster_yaml_is_valid_for_ray_and_says_what_raydir_needs():
    text = (ROOT / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    _validate(config)
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    gpu = config["available_node_types"]["worker.gpu"]
    assert "GPU" not in head["resources"] and gpu["resources"]["GPU"] >= 1
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    setup = "\n".join(config["setup_commands"])
    assert "-c ~/raydir/constraints.txt" in setup and "pip install" in setup
    for var in ("MLFLOW_TRACKING_URI=http", "RAYDIR_STORAGE=s3://", "RAY_AUTH_MODE=token"):
        assert var in setup, var
    assert "~/raydir" in config["file_mounts"]


def test_cluster_yaml_local_variant_is_valid():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config.update(_local_variant((ROOT / "cluster.yaml").read_text()))
    filled = _validate(config)
    assert filled["provider"]["type"] == "local" and filled["provider"]["worker_ips"]


@pytest.mark.parametrize("job", ["train", "predict", "evaluate"])
def test_job_entrypoints_smoke(job):
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"usage: raydir {job}" in out.stdout


# -- real processes on 127.0.0.1 --------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_http(url: str, timeout: float, headers: dict | None = None, ok=(200,)) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status in ok:
                    return
        except (OSError, urllib.error.URLError) as exc:
            last = exc
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s ({last})")


class Processes:
    """Processes this test started, each in its own session (process group), stopped on exit.

    Ray's daemons and workers stay in the group of their `ray start --block`; job drivers get
    their own session from Ray's job supervisor, so any process whose command line or
    environment names this test's temp dir / GCS port is stopped too.
    """

    def __init__(self, marker: list[str]):
        self.procs: list[subprocess.Popen] = []
        self.marker = marker

    def start(self, cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
        f = open(log, "wb")
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def _strays(self) -> list[int]:
        me = os.getpid()
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == me:
                continue
            try:
                blob = (d / "cmdline").read_bytes() + (d / "environ").read_bytes()
            except OSError:
                continue
            if any(m.encode() in blob for m in self.marker):
                found.append(int(d.name))
        return found

    def stop(self) -> None:
        for p in reversed(self.procs):  # workers before the head
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 3  # then SIGKILL: the temporary folders go with the module
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self._strays():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A token-authenticated Ray head + an MLflow server on 127.0.0.1, started once for the
    module's tests; `add_node()` joins another Ray node. Yields a dict of addresses, env and
    helpers."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    # Unix socket paths must stay short: a private dir right under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="rdc-", dir="/tmp")
    token = uuid.uuid4().hex + uuid.uuid4().hex
    gcs, dash, client, agent, metrics, rt_agent, mlflow_port = _free_ports(7)
    procs = Processes([temp_dir, f"127.0.0.1:{gcs}"])
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("RAY_", "MLFLOW_")) and k != "PYTHONPATH"}
    mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
    env = {**base_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "MLFLOW_TRACKING_URI": mlflow_uri, "PATH": f"{BIN}:{base_env.get('PATH', '')}"}
    try:
        # raydir needs none of the server's job consumers (about eight huey processes).
        server_env = {**base_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        procs.start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                     "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                     "--artifacts-destination", str(tmp_path / "artifacts")],
                    server_env, tmp_path / "mlflow.log")
        procs.start([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                     f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                     "--include-dashboard=true", f"--ray-client-server-port={client}",
                     f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
                     f"--runtime-env-agent-port={rt_agent}", f"--temp-dir={temp_dir}",
                     "--num-cpus=3", '--resources={"node_a": 1}', "--disable-usage-stats"],
                    env, tmp_path / "ray_head.log")
        _wait_http(f"{mlflow_uri}/health", 180)
        _wait_http(f"http://127.0.0.1:{dash}/api/jobs/", 240,
                   headers={"Authorization": f"Bearer {token}"})

        def add_node(name: str, num_cpus: int = 3) -> None:
            ports = _free_ports(4)
            procs.start([str(BIN / "ray"), "start", "--block", f"--address=127.0.0.1:{gcs}",
                         "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                         f"--resources={json.dumps({name: 1})}",
                         f"--dashboard-agent-listen-port={ports[0]}", f"--metrics-export-port={ports[1]}",
                         f"--runtime-env-agent-port={ports[2]}", f"--node-manager-port={ports[3]}",
                         "--disable-usage-stats"],
                        env, tmp_path / f"ray_{name}.log")

        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "token": token,
               "mlflow": mlflow_uri, "env": env, "base_env": base_env, "tmp": tmp_path,
               "add_node": add_node}
    finally:
        procs.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(c: dict, args: list[str], workdir: Path, *, env: dict | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": c["mlflow"]}}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", c["dashboard"], "--working-dir",
           str(workdir), "--runtime-env-json", json.dumps(runtime_env), "--", sys.executable, *args]
    return subprocess.run(cmd, env=env or c["env"], capture_output=True, text=True, timeout=timeout)


def _job_workdir(tmp: Path, raw: dict) -> Path:
    wd = tmp / "workdir"
    (wd / "jobs").mkdir(parents=True)
    for job in ("train.py", "predict.py", "evaluate.py"):
        shutil.copy(ROOT / "jobs" / job, wd / "jobs" / job)
    (wd / "small.yaml").write_text(yaml.safe_dump(raw))
    return wd


@pytest.mark.cluster
@pytest.mark.slow
def test_job_submit_train_then_predict_from_champion(cluster):
    from mlflow.tracking import MlflowClient

    c = cluster
    tmp = c["tmp"]
    name = "raydir-cluster-test"
    raw = json.loads(json.dumps(TINY))
    raw["train"]["storage_path"] = str(tmp / "shared_storage")  # the cluster's shared path
    raw["tracking"]["register_name"] = name
    raw["data"]["cache_dir"] = str(tmp / "cache")
    wd = _job_workdir(tmp, raw)

    # A client without the token (no RAY_AUTH_TOKEN, no ~/.ray/auth_token) is refused.
    home = tmp / "empty_home"
    home.mkdir()
    refused = _submit(c, ["jobs/train.py", "--config", "small.yaml"], wd,
                      env={**c["base_env"], "HOME": str(home)}, timeout=300)
    assert refused.returncode != 0
    assert "auth" in (refused.stdout + refused.stderr).lower(), refused.stdout + refused.stderr
    req = urllib.request.Request(f"{c['dashboard']}/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(req, timeout=10)
    assert http.value.code in (401, 403)

    train = _submit(c, ["jobs/train.py", "--config", "small.yaml"], wd)
    assert train.returncode == 0 and "succeeded" in train.stdout + train.stderr, \
        train.stdout[-4000:] + train.stderr[-4000:]

    client = MlflowClient(c["mlflow"], registry_uri=c["mlflow"])
    exp = client.get_experiment_by_name("cluster-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.metrics["test_count"] == 20 * 3
    assert {"test_mae", "test_few_mae", "val_mae"} <= set(run.data.metrics)
    versions = client.search_model_versions(f"name='{name}'")
    assert [(int(v.version), v.run_id) for v in versions] == [(1, run.info.run_id)]
    client.set_registered_model_alias(name, "champion", "1")
    assert any((tmp / "shared_storage").iterdir())  # checkpoints on the shared path

    rng = np.random.default_rng(0)
    rows = pd.DataFrame(rng.normal(size=(2500, 6)), columns=[f"x{i}" for i in range(6)])
    rows["id"] = np.arange(len(rows))
    rows.to_parquet(tmp / "in.parquet")
    (tmp / "out").mkdir()  # predict refuses a missing output folder instead of creating it
    pred = _submit(c, ["jobs/predict.py", "--model", f"models:/{name}@champion", "--input",
                       str(tmp / "in.parquet"), "--output", str(tmp / "out" / "pred.parquet"),
                       "--num-actors", "1", "--batch-size", "500"], wd)
    assert pred.returncode == 0 and "succeeded" in pred.stdout + pred.stderr, \
        pred.stdout[-4000:] + pred.stderr[-4000:]
    assert "scoring in this process" not in pred.stdout  # a job's predict runs on the cluster
    out = pd.read_parquet(tmp / "out" / "pred.parquet")
    assert len(out) == 2500 and list(out.columns) == [*rows.columns, "prediction"]
    np.testing.assert_array_equal(out["id"], rows["id"])
    assert np.isfinite(out["prediction"]).all()
    assert f"models:/{name}/1" in pred.stdout


DRIVER = textwrap.dedent("""
    import json, os, sys
    import ray
    from raydir.config import Config
    from raydir.train import run_training

    raw, dump = json.loads(sys.argv[1]), sys.argv[2]
    sys.path.insert(0, sys.argv[3])  # the tests folder: its hooks module
    from hooks import DumpFDS
    ray.init()  # RAY_ADDRESS: the two-node cluster
    nodes = {n["NodeID"]: sorted(k for k in n["Resources"] if k.startswith("node_"))
             for n in ray.nodes() if n["Alive"]}
    json.dump(nodes, open(f"{dump}/nodes.json", "w"))
    run_training(Config.from_dict(raw), callbacks=[DumpFDS(dump)])
    json.dump(os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"), open(f"{dump}/watcher.json", "w"))
""")


@pytest.mark.cluster
@pytest.mark.slow
def test_two_nodes_one_worker_each_same_fds_statistics(cluster):
    """A second node joins; each Train worker needs 2 of a node's 3 CPUs, so the two workers
    cannot share a node. Both record their node id and FDS statistics after every update."""
    import torch

    c = cluster
    c["add_node"]("node_b")
    tmp = c["tmp"]
    dump = tmp / "dump"
    dump.mkdir()
    raw = json.loads(json.dumps(TINY))
    raw["train"].update(num_workers=2, cpus_per_worker=2.0, lr=1e-12,
                        storage_path=str(tmp / "shared_storage"))
    raw["data"]["cache_dir"] = str(tmp / "cache")
    raw["tracking"].update(uri=f"sqlite:///{tmp / 'driver_mlflow.db'}", log_model=False)
    env = {**c["env"], "RAY_ADDRESS": c["gcs"], "MLFLOW_TRACKING_URI": raw["tracking"]["uri"]}
    deadline = time.time() + 180  # wait for the second node to register
    while True:
        probe = subprocess.run([sys.executable, "-c",
                                "import ray; ray.init(); print(len([n for n in ray.nodes() if n['Alive']]))"],
                               env=env, capture_output=True, text=True, timeout=180)
        if probe.stdout.strip().endswith("2") or time.time() > deadline:
            break
        time.sleep(2)
    assert probe.stdout.strip().endswith("2"), probe.stdout + probe.stderr
    run = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(raw), str(dump),
                          str(Path(__file__).parent)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    nodes = json.loads((dump / "nodes.json").read_text())
    ran_on = [(dump / f"rank{r}_node.txt").read_text() for r in (0, 1)]
    assert ran_on[0] != ran_on[1]
    assert sorted(nodes[n][0] for n in ran_on) == ["node_a", "node_b"]
    for epoch in (0, 1):
        a, b = (torch.load(dump / f"rank{r}_epoch{epoch}.pt", weights_only=False) for r in (0, 1))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (epoch, key)
    assert int(a["count"].sum()) == 400
    # two nodes: Ray Train's preemption watcher stays on (raydir turns it off on one machine)
    assert json.loads((dump / "watcher.json").read_text()) is None
