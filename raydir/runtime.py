"""Where a command runs: a local Ray or the cluster at $RAY_ADDRESS, the MLflow store, the
storage root, and a console that shows raydir's lines rather than Ray's.

Every command checks its services before it reads data or starts workers, and fails in
seconds with one line naming the address and the fix:

  [1] MLflow   ``tracking_uri_checked``: an http(s) server answers /health, a sqlite folder exists;
  [2] Ray      ``check_ray_address``: $RAY_ADDRESS accepts TCP connections (a dashboard / job
               API address is explained, not dialled); then ``connect_ray`` joins it or starts a
               local instance.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path

PROBE_TIMEOUT_S = 3.0

# Ray Train's controller takes the workers' reports every 2 s by default, and a worker blocks
# on its next report until the previous one is taken, so epochs shorter than that wait for the
# poll. raydir's runs poll more often: Ray Train hands the driver's value of the variable to its
# controller, so it holds on a local Ray and on a cluster raydir joins alike.
REPORT_POLL_S = "0.2"


# -- console ----------------------------------------------------------------------------------
class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


VERBOSE = {"on": False}


def quiet_console(verbose: bool = False) -> None:
    """Ray's INFO lines and Ray Data's progress bars off unless ``verbose``; the 'Dataset job
    will hang' warning always off (raised while training workers hold the CPUs, which the
    ingest was sized around)."""
    VERBOSE["on"] = verbose
    # a logger's filters see only its own records: each emitting module's logger gets one
    for name in ("ray.data.dataset", "ray.data._internal.progress"):
        logging.getLogger(name).addFilter(_DropMessages("The Dataset job will hang",
                                                        "Progress bars disabled"))
    if verbose:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Tune's newer console output prints its experiment box whatever the verbosity; with
    # verbose=0 the older one prints nothing (raydir prints one line per trial instead)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Notices of Ray's that are not the user's business on a local run (--verbose shows them):
    # that a local instance turned token authentication on, and the raylet's note that it
    # started more Python workers at once than it has CPUs (Tune trials + Train workers + Ray
    # Data actors on 2 cores). The raylet's lines are filtered by ``ensure_ray`` (importing
    # Ray here would slow every command that fails on a user mistake).
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        _DropMessages(*RAY_NOTICES))


# Fragments of Ray's console notices that raydir hides unless --verbose.
RAY_NOTICES = ("Token authentication is enabled for this Ray cluster",
               "x the maximum expected startup concurrency")


def _drop_raylet_notices() -> None:
    """Wrap the function Ray's driver uses to print the raylet's messages
    (``ray._private.worker.print_to_stdstream``, called by name at each message) so that the
    lines matching :data:`RAY_NOTICES` are dropped; every other line still prints."""
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "raydir_wrapped", False):
        return

    def print_to_stdstream(data, ignore_prefix: bool = False):
        lines = [line for line in data.get("lines", [])
                 if not any(f in str(line) for f in RAY_NOTICES)]
        if lines:
            original({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    print_to_stdstream.raydir_wrapped = True
    ray_worker.print_to_stdstream = print_to_stdstream


def _quiet_data_context() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = VERBOSE["on"]
    ctx.print_on_execution_start = VERBOSE["on"]
    if not VERBOSE["on"]:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


# -- [1] MLflow -------------------------------------------------------------------------------
def tracking_uri_checked(uri: str = "") -> str:
    """The resolved tracking URI (config value, $MLFLOW_TRACKING_URI, sqlite:///mlflow.db),
    checked to be reachable."""
    from raydir.tracking import check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(uri)
    check_tracking_uri(uri)
    return uri


def preflight(cfg, *, mlflow: bool = True, resume: str | None = None, allow_change=()) -> dict:
    """The checks of a command that need no Ray, no data and no torch, in seconds: the MLflow
    store, a resumed run, the Ray address. Returns the resumed run's allowed config changes."""
    changes = {}
    if mlflow:
        uri = tracking_uri_checked(cfg.tracking.uri)
        if resume:
            from raydir.tracking import check_resume

            changes = check_resume(uri, resume, cfg, allow_change)
    check_ray_address()
    return changes


# -- [2] Ray ----------------------------------------------------------------------------------
def probe_tcp(address: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when ``host:port`` accepts TCP connections (or is not host:port), else the error."""
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return None  # not host:port (e.g. 'auto'): let ray.init decide
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return str(exc) or type(exc).__name__


def check_ray_address(address: str | None = None) -> None:
    """Fail in seconds, naming the fix, when ``address`` ($RAY_ADDRESS) cannot be joined."""
    address = os.environ.get("RAY_ADDRESS", "") if address is None else address
    if address.startswith(("http://", "https://")):
        raise ConnectionError(
            f"RAY_ADDRESS={address} is the dashboard / job API address, which a driver cannot "
            f"join: submit with `ray job submit --address {address} -- raydir ...`, or set "
            f"RAY_ADDRESS to the cluster's HEAD:6379 (or auto on a cluster node)."
        )
    if address and address not in ("auto", "local"):
        error = probe_tcp(address)
        if error:
            raise ConnectionError(
                f"Ray cluster at RAY_ADDRESS={address} cannot be reached ({error}); start it "
                f"(`ray start --head`), fix RAY_ADDRESS, or unset it to run on a local Ray."
            )


PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def train_environment() -> None:
    """Environment of a driver that runs Ray Train, unless already set: the report poll
    interval above, and no preemption watcher on a Ray that is this one machine.

    Ray Train passes both from the driver to its controller, so they apply to a cluster
    joined through $RAY_ADDRESS too: ``build_trainer`` calls this in the process that fits;
    a Ray started here gets the poll from :func:`start_local_ray`. The watcher (an actor
    per run that polls for nodes being drained, so the workers move off a preempted node)
    has nowhere to move them when the only node is this machine, and its process costs
    each run about 1.5 s of start-up on 2 cores. (Parquet needs nothing: raydir reads it
    through Ray Data's datasource V1, which starts no footer-reader actors;
    :func:`raydir.data.base.read_parquet`.)"""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_S)
    if PREEMPTION_WATCHER not in os.environ and _ray_is_this_machine():
        os.environ[PREEMPTION_WATCHER] = "0"


def _ray_is_this_machine() -> bool:
    """Whether the Ray this process has joined has one alive node, this process's."""
    import ray

    if not ray.is_initialized():
        return False
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return len(alive) == 1 and alive[0].get("NodeID") == ray.get_runtime_context().get_node_id()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_ray(num_cpus_needed: float = 0) -> None:
    """Connect to $RAY_ADDRESS / a running cluster, or start a local Ray (the embedded default).

    A local instance gets at least as many logical CPUs as the workers reserve plus one, so
    Ray Data ingest tasks can run beside the training workers on a 2-core laptop.
    """
    import ray

    if ray.is_initialized():
        return
    # The output of Ray's processes (workers, the Train controller, Ray Data's actors) reaches
    # the console with --verbose only; raydir's driver prints the epoch lines itself.
    kwargs = {"log_to_driver": VERBOSE["on"]}
    if not VERBOSE["on"]:
        kwargs["logging_level"] = logging.WARNING
        _drop_raylet_notices()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
        size_reads_to_cluster()
        return
    start_local_ray(max(os.cpu_count() or 1, int(math.ceil(num_cpus_needed)) + 1), **kwargs)


def size_reads_to_cluster() -> None:
    """Blocks per read from the cluster's CPUs: two per CPU, at least 8, at most Ray's default.

    Ray Data cuts every read into at least ``DataContext.read_op_min_num_blocks`` blocks (200,
    made for clusters). On a small machine the cost per block dominates: the histogram of 10M
    labels in 20 Parquet files took 1.8-1.9 s with 200 blocks and 0.6 s with 8 on 2 cores.
    A value the user lowered is kept."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    ctx.read_op_min_num_blocks = min(ctx.read_op_min_num_blocks, max(8, 2 * cpus))


def start_local_ray(num_cpus: int, **init_kwargs) -> None:
    """``ray.init`` of a local instance with ``num_cpus`` logical CPUs, in the environment of
    :func:`train_environment`, with its dashboard.

    With the dashboard: Ray Train's placement-group cleaner asks its state API whether a
    controller is alive, and without it never frees the CPUs of a run whose controller was
    killed (a Tune trial that ASHA stops), which starves the next trials. The cleaner finds
    the API by ``RAY_API_SERVER_ADDRESS`` (its processes inherit it); without it, it looks for
    a local Ray and fails when another one runs on the same machine.
    """
    import ray

    train_environment()
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_port=port, **init_kwargs)
    size_reads_to_cluster()


def connect_ray(num_cpus_needed: float = 0) -> None:
    """``ensure_ray`` with a fast, readable failure when $RAY_ADDRESS cannot be joined."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS", "")
        check_ray_address(address)
        try:
            ensure_ray(num_cpus_needed)
        except ConnectionError as exc:
            raise ConnectionError(
                f"Ray cluster at RAY_ADDRESS={address or 'auto'} cannot be joined ({exc}); check "
                f"the address and, on a cluster with token authentication, RAY_AUTH_TOKEN / "
                f"~/.ray/auth_token."
            ) from None
    _quiet_data_context()


# -- storage ----------------------------------------------------------------------------------
def storage_root(configured: str = "") -> str:
    """Checkpoints and Tune experiments: the config value, else $RAYDIR_STORAGE, else
    ``~/ray_results``; local paths made absolute."""
    root = configured or os.environ.get("RAYDIR_STORAGE", "") or "~/ray_results"
    return root if "://" in root else str(Path(root).expanduser().resolve())


SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints


def checkpointed_reports(experiment_path: str) -> list[dict]:
    """The metrics of every checkpoint Ray Train registered for the run at
    ``experiment_path`` (oldest first, the last is where a restart resumes); empty when none."""
    import json

    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(experiment_path if "://" in experiment_path
                                                  else Path(experiment_path).resolve().as_uri())
        with fs.open_input_stream(f"{path.rstrip('/')}/{SNAPSHOT_FILE}") as f:
            state = json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return []
    results = [r.get("metrics", {}) for r in state.get("checkpoint_results", [])]
    latest = (state.get("latest_checkpoint_result") or {}).get("metrics")
    if latest and latest not in results:
        results.append(latest)
    return sorted((r for r in results if "epoch" in r), key=lambda r: int(r["epoch"]))
