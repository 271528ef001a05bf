"""raydir bench: presets, suites, tables and bad input without Ray; one Ray test of the runner
(a method and a failing one, 2 seeds, 2 epochs: table, nested MLflow runs, resume)."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raydir.bench import presets
from raydir.bench.presets import available_methods, check_methods, preset_overrides
from raydir.bench.runner import BenchError, plan_bench
from raydir.bench.stats import summarize
from raydir.bench.suites import suite_config
from raydir.bench.tables import bench_markdown, load_published, metric_table
from raydir.cli import main

ROOT = Path(__file__).resolve().parents[1]


# -- presets ---------------------------------------------------------------------------------
def test_presets_combine_and_refuse_conflicts():
    base = suite_config("synthetic")
    assert preset_overrides("lds_fds", base) == {"reweight.scheme": "sqrt_inv", "reweight.lds": True,
                                                 "fds.enabled": True}
    assert preset_overrides("inv+fds", base) == {"reweight.scheme": "inverse", "fds.enabled": True}
    assert preset_overrides("focal", base) == {"loss.name": "focal_l1"}          # l1 suite
    with pytest.raises(ValueError, match="'lds' sets reweight.scheme='sqrt_inv' but 'inv'"):
        preset_overrides("lds+inv", base)


def test_focal_follows_the_suite_loss(shared_data, monkeypatch):
    monkeypatch.setenv("RAYDIR_DATA", str(shared_data))
    assert preset_overrides("focal", suite_config("sts-b-dir")) == {"loss.name": "focal_mse"}


def test_only_presets_the_config_accepts_are_available():
    avail = available_methods(suite_config("synthetic"))
    for name in ("vanilla", "inv", "sqinv", "lds", "fds", "lds_fds", "focal", "rrt_lds", "smoter", "smogn"):
        assert avail[name] is None, (name, avail[name])
    # a method whose keys the config does not know is not offered, with the config's reason
    from raydir.config import Config

    known = {f.split(".")[0] for f in Config().to_flat_dict()}
    if "ranksim" not in known:
        assert "unknown config key 'ranksim'" in avail["ranksim"]
        with pytest.raises(ValueError, match="'ranksim' is not available on suite 'synthetic'.*vanilla"):
            check_methods(["lds_fds+ranksim"], suite_config("synthetic"), "synthetic")


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method 'ldss'.*'lds_fds'"):
        check_methods(["vanilla", "ldss"], suite_config("synthetic"), "synthetic")
    with pytest.raises(ValueError, match="more than once"):
        check_methods(["lds", "lds"], suite_config("synthetic"))


# -- suites and bad input --------------------------------------------------------------------
def test_unknown_suite_and_bad_seeds():
    with pytest.raises(BenchError, match=r"unknown suite 'synth'.*'synthetic'"):
        plan_bench("synth", ["vanilla"], 3)
    with pytest.raises(BenchError, match="--seeds should be a positive integer"):
        plan_bench("synthetic", ["vanilla"], 0)


def test_absent_data_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDIR_DATA", str(tmp_path / "nowhere"))
    monkeypatch.delenv("RAYDIR_SHARED_DATA", raising=False)
    with pytest.raises(BenchError, match=r"suite 'sts-b-dir': data not found.*nowhere/sts-b-dir.*train_new.tsv"):
        plan_bench("sts-b-dir", ["vanilla"], 2)
    with pytest.raises(BenchError, match=r"data not found.*given"):
        plan_bench("sts-b-dir", ["vanilla"], 2, overrides=[f"data.path={tmp_path / 'given'}"])
    with pytest.raises(BenchError, match="suite 'table' needs your data"):
        plan_bench("table", ["vanilla"], 2)


def test_agedb_without_images_says_what_is_missing(shared_data, monkeypatch):
    monkeypatch.setenv("RAYDIR_DATA", str(shared_data))
    with pytest.raises(BenchError, match=r"face images: .*agedb-dir/.*\.jpg.*data.image.root"):
        plan_bench("agedb-dir", ["vanilla"], 2)


def test_smote_on_token_inputs_is_refused_before_ray(shared_data, monkeypatch):
    monkeypatch.setenv("RAYDIR_DATA", str(shared_data))
    try:
        suite_config("sts-b-dir-glove")
    except ValueError as exc:
        pytest.skip(f"glove suite unavailable here: {exc}")
    with pytest.raises(BenchError, match=r"'smoter' is not available on suite 'sts-b-dir-glove'.*token"):
        plan_bench("sts-b-dir-glove", ["vanilla", "smoter"], 2)


def test_cli_bad_input_is_one_line_exit_2(capsys):
    for argv, words in ((["bench", "--suite", "nope"], "valid suites"),
                        (["bench", "--suite", "synthetic", "--methods", "vanilla", "foo"], "unknown method 'foo'"),
                        (["bench", "--suite", "synthetic", "--seeds", "-1"], "--seeds"),
                        (["bench", "--suite", "synthetic", "--set", "train.lr=-1"], "train.lr")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("raydir: bench error:") and words in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


# -- tables ----------------------------------------------------------------------------------
def _records(values: dict[str, list], metric="mae"):
    out = []
    for method, xs in values.items():
        for seed, x in enumerate(xs):
            ok = x is not None
            m = {f"{r}_{metric}": x + i for i, r in enumerate(("all", "many", "medium", "few"))} if ok else None
            if ok:
                m.update({f"all_b{metric}": x, "all_gmean": x / 2, "error_density_pearson": -0.5})
            out.append({"method": method, "seed": seed, "status": "completed" if ok else "error",
                        "metrics": m, "error": "" if ok else "RuntimeError: boom"})
    return out


def test_markdown_layout_bold_best_and_failure_mark():
    recs = _records({"vanilla": [8.0, 8.4, 8.2], "lds": [7.5, 7.9, 7.7], "broken": [9.0, None, None]})
    md = bench_markdown(summarize(recs), recs, suite="synthetic", metric="mae", carved=False, published=[])
    table = md.split("## Test MAE")[1].split("##")[0].strip().splitlines()
    assert table[0] == "| method | All MAE | Many MAE | Medium MAE | Few MAE | All bMAE |"
    assert [r.split("|")[1].strip() for r in table[2:]] == ["vanilla", "lds", "broken †"]
    lds_row = table[3]
    half = 4.302652729749464 * np.std([7.5, 7.9, 7.7], ddof=1) / math.sqrt(3)  # t_{0.975, 2}
    assert f"**7.700 ± {half:.3f}**" in lds_row                           # best per column in bold
    assert "9.000 (1 seed)" in table[4]                                     # no fake interval
    assert "broken failed on seed 1: RuntimeError: boom" in md
    assert "## Difference to vanilla" in md and "(p=" in md


def test_one_seed_says_there_is_no_interval():
    recs = _records({"vanilla": [8.0], "lds": [7.0]})
    md = bench_markdown(summarize(recs), recs, suite="synthetic", metric="mae", carved=False, published=[])
    assert "± " not in md.split("## Notes")[0].split("## Test MAE")[1].split("## Difference")[0]
    assert "(1 seed)" in md and "One seed per method: no confidence interval" in md
    assert "(p n/a)" in md


def test_failed_everywhere_cell_says_failed():
    recs = _records({"vanilla": [8.0, 8.2], "broken": [None, None]})
    text = metric_table(summarize(recs), ["vanilla", "broken"], ["all_mae"])
    assert text.splitlines()[-1] == "| broken † | failed |"


def test_published_numbers_have_a_source_and_match_reference():
    rows = load_published()
    assert rows and all(r["source"] for r in rows)
    stsb = {r["method"]: r for r in load_published("sts-b-dir")}
    assert [stsb["Vanilla"][k] for k in ("all", "many", "medium", "few")] == [0.974, 0.851, 1.520, 0.984]
    assert stsb["INV+LDS+FDS"]["all"] == 0.907 and stsb["SRL"]["few"] == 0.745
    agedb = {r["method"]: r for r in load_published("agedb-dir")}
    assert agedb["Vanilla"]["few"] == 13.67 and agedb["SQINV+LDS+FDS"]["raydir_method"] == "lds_fds"
    # every raydir_method named is a preset
    assert {r["raydir_method"] for r in rows if r["raydir_method"]} <= set(presets.PRESETS)


def test_published_table_is_printed_for_a_matching_suite():
    recs = _records({"vanilla": [0.95, 0.97], "inv_lds_fds": [0.91, 0.92]}, metric="mse")
    md = bench_markdown(summarize(recs), recs, suite="sts-b-dir", metric="mse", carved=False,
                        published=load_published("sts-b-dir"), setting_note="MiniLM here")
    pub = md.split("## Published numbers")[1]
    row = next(l for l in pub.splitlines() if l.startswith("| INV+LDS+FDS"))
    assert "| 0.907 | 0.802 | 1.363 | 0.942 | inv_lds_fds | 0.915 |" in row and "Yang et al." in row


def test_bench_job_entrypoint_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "bench.py"), "--help"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "--suite" in out.stdout and "--seeds" in out.stdout


# -- the runner on Ray -----------------------------------------------------------------------
class _InterruptAfterFirst:
    """A Tune callback that sends SIGUSR1 (what Ctrl+C does to Tune) once one trial ended."""

    def __new__(cls, marker: str):
        from ray import tune

        class _Cb(tune.Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                if not os.path.exists(marker):
                    Path(marker).write_text("interrupted")
                    os.kill(os.getpid(), signal.SIGUSR1)

        return _Cb()


@pytest.mark.ray
@pytest.mark.slow
def test_bench_runs_resumes_marks_failures_and_nests_runs(tmp_path, ray_session, monkeypatch):
    from mlflow.tracking import MlflowClient

    from raydir.bench.runner import run_bench

    # valid config, fails inside the trial: a ResNet cannot read feature vectors
    monkeypatch.setitem(presets.PRESETS, "broken", {"model.kind": "resnet"})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [f"tracking.uri={uri}", f"train.storage_path={tmp_path}/ray",
            f"data.cache_dir={tmp_path}/cache", "train.epochs=2", "data.synthetic.n_train=800",
            "data.synthetic.per_bin_eval=3", "model.hidden=[32]", "model.feature_dim=16",
            "tracking.experiment=bench-test"]
    plan = plan_bench("synthetic", ["vanilla", "broken"], 2, overrides=sets)
    first = run_bench(plan, tmp_path / "out", callbacks=[_InterruptAfterFirst(str(tmp_path / "marker"))])
    assert first["interrupted"]
    done_first = {(r["method"], r["seed"]): r["run_id"] for r in first["records"] if r["status"] == "completed"}
    assert not (tmp_path / "out" / "bench.md").exists()

    out = run_bench(plan_bench("synthetic", ["vanilla", "broken"], 2, overrides=sets), tmp_path / "out")
    assert not out["interrupted"] and out["name"] == first["name"]
    assert out["parent_run_id"] == first["parent_run_id"]
    status = {(r["method"], r["seed"]): r["status"] for r in out["records"]}
    assert status == {("vanilla", 0): "completed", ("vanilla", 1): "completed",
                      ("broken", 0): "error", ("broken", 1): "error"}
    for key, run_id in done_first.items():  # finished before the interruption: kept, not re-run
        assert next(r["run_id"] for r in out["records"] if (r["method"], r["seed"]) == key) == run_id

    client = MlflowClient(uri)
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    tags = sorted((c.data.tags["raydir.bench.method"], c.data.tags["raydir.bench.seed"], c.info.status)
                  for c in children)
    ok = [t for t in tags if t[0] != "broken"]
    assert ok == [("vanilla", "0", "FINISHED"), ("vanilla", "1", "FINISHED")]
    assert {t[2] for t in tags if t[0] == "broken"} == {"FAILED"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "bench.md", "summary.csv", "trials.csv", "per_bin.csv", "bench_errors.png", "bench_per_bin.png"}

    md = (tmp_path / "out" / "bench.md").read_text()
    head = md.split("## Test MAE")[1].strip().splitlines()[0]
    assert head == ("| method | All MAE | Many MAE | Medium MAE | Few MAE | All bMAE | "
                    "Interp. (carved) MAE | Extrap. (carved) MAE | Rest MAE |")
    assert "| broken † | failed |" in md and "broken failed on seed 0" in md
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index(["method", "metric"])
    assert summary.loc[("vanilla", "all_mae"), "n"] == 2
    # the interpolation / extrapolation rows come from the carved bins of the per-bin tables
    per_bin = pd.read_csv(tmp_path / "out" / "per_bin.csv")
    v0 = per_bin[(per_bin["method"] == "vanilla") & (per_bin["seed"] == 0)]
    carved = v0[(v0["left"] >= 88) & (v0["right"] <= 100)]
    trials = pd.read_csv(tmp_path / "out" / "trials.csv").set_index(["method", "seed"])
    assert trials.loc[("vanilla", 0), "extrap_mae"] == pytest.approx(
        (carved["mae"] * carved["count"]).sum() / carved["count"].sum())
