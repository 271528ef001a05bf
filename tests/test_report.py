"""Plots a person can read: what is drawn on which axis, in which units (no Ray)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from raydir import report
from raydir.bins import Bins
from raydir.config import ReweightConfig


@pytest.fixture
def figures(monkeypatch):
    """The figures the report functions draw, kept open instead of closed."""
    kept = []
    monkeypatch.setattr(report.plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    monkeypatch.undo()
    report.plt.close("all")


def test_label_density_normalises_histogram_and_lds_density(tmp_path, figures):
    bins = Bins.uniform(0.0, 5.0, 50)
    counts = np.r_[np.arange(25) * 4, np.zeros(20), np.ones(5)].astype(np.int64)
    report.plot_label_density(bins, counts, ReweightConfig(), tmp_path / "d.png")
    ax = figures[0].axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert sum(heights) == pytest.approx(1.0)
    assert ax.lines[0].get_ydata().sum() == pytest.approx(1.0)       # LDS density on the same scale
    assert ax.get_title() and ax.get_legend() is not None
    assert (tmp_path / "d.png").stat().st_size > 0


def test_error_vs_density_x_axis_in_target_units(tmp_path, figures):
    edges = np.linspace(0.0, 5.0, 51)
    per_bin = pd.DataFrame({"bin": np.arange(50), "left": edges[:-1], "right": edges[1:],
                            "count": np.full(50, 10), "mae": np.linspace(1, 0.2, 50)})
    report.plot_error_vs_density(per_bin, np.arange(50), tmp_path / "e.png")
    ax = figures[0].axes[0]
    assert ax.get_xlabel() == "target" and ax.get_xlim()[1] < 6.0
    assert "Pearson" in ax.get_title()


def test_fds_plots_titles_in_target_units_and_integer_epochs(tmp_path, figures):
    bins = Bins.uniform(0.0, 5.0, 10)
    stats = {k: torch.rand(10, 4) for k in ("running_mean", "smoothed_mean", "running_var", "smoothed_var")}
    stats["seen"] = torch.ones(10, dtype=torch.bool)
    stats["count"] = torch.arange(10.0)
    history = [{"epoch": e, "fds_smoothing_l1": 1.0 / (e + 1)} for e in range(3)]
    report.plot_fds(stats, history, bins, tmp_path)
    sim, dist = figures
    assert "target [4.5, 5)" in sim.axes[0].get_title()                # anchor = most populated bin
    ticks = [t for t in dist.axes[0].get_xticks() if 0 <= t <= 2]
    assert all(float(t).is_integer() for t in ticks)


def test_bench_plots_write_png(tmp_path):
    summary = pd.DataFrame([{"method": m, "metric": f"{r}_mae", "n": n, "n_failed": 0, "mean": v,
                             "ci_half": 0.2} for m, v, n in (("vanilla", 8.0, 3), ("lds", 7.5, 1))
                            for r in ("all", "few", "interp", "extrap")])
    report.plot_bench_errors(summary, ["vanilla", "lds"], "mae", tmp_path / "b.png", carved=True)
    edges = np.linspace(0, 10, 11)
    per_bin = pd.DataFrame([{"method": m, "seed": s, "bin": b, "mae": 1.0 + b * s}
                            for m in ("vanilla", "lds") for s in (0, 1) for b in range(10)])
    report.plot_bench_per_bin(per_bin, edges, np.arange(10), tmp_path / "p.png", carve=[[3, 5]])
    assert (tmp_path / "b.png").stat().st_size > 0 and (tmp_path / "p.png").stat().st_size > 0
