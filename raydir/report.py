"""Plots and tables for a run: label density, per-bin error vs density, FDS diagnostics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from raydir.bins import Bins  # noqa: E402
from raydir.lds import effective_density  # noqa: E402


def plot_label_density(bins: Bins, counts: np.ndarray, reweight, path: Path) -> None:
    """Train label histogram and the LDS effective density (paper Fig. 2), both normalised to
    a share of the total, so that their shapes compare (the raw effective density is a
    kernel-weighted count, several times the row count)."""
    centers = bins.centers
    width = float(np.diff(bins.edges.astype(np.float64)).mean())
    counts = np.asarray(counts, dtype=np.float64)
    eff = effective_density(counts, kernel=reweight.kernel, ks=reweight.ks, sigma=reweight.sigma)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(centers, counts / max(counts.sum(), 1.0), width=width * 0.9, color="#9ab",
           label=f"empirical label density ({int(counts.sum()):,} training rows)")
    ax.plot(centers, eff / max(eff.sum(), 1e-300), color="#c33", lw=2,
            label=f"LDS effective density ({reweight.kernel}, ks={reweight.ks}, sigma={reweight.sigma:g})")
    ax.set_xlabel("target")
    ax.set_ylabel("share of training labels per bin")
    ax.set_title("Training label distribution: empirical vs LDS-smoothed (each sums to 1)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def error_density_correlation(per_bin, train_counts: np.ndarray) -> float:
    """Pearson correlation between per-bin test MAE and train count, over bins with test rows."""
    mask = (per_bin["count"].to_numpy() > 0)
    if mask.sum() < 3:
        return math.nan
    mae = per_bin["mae"].to_numpy()[mask]
    dens = np.asarray(train_counts, dtype=np.float64)[mask]
    if np.std(mae) == 0 or np.std(dens) == 0:
        return math.nan
    return float(np.corrcoef(mae, dens)[0, 1])


def _bin_centers(per_bin) -> tuple[np.ndarray, float, str]:
    """Bin centres in target units (from the table's left / right edges) and their width;
    the bin index when the table has no edges."""
    if "left" in per_bin and "right" in per_bin:
        left, right = per_bin["left"].to_numpy(float), per_bin["right"].to_numpy(float)
        return (left + right) / 2.0, float(np.mean(right - left)), "target"
    return per_bin["bin"].to_numpy(float), 1.0, "bin"


def plot_error_vs_density(per_bin, train_counts: np.ndarray, path: Path) -> float:
    """Per-bin test error against train density with their Pearson correlation (paper Fig. 1)."""
    corr = error_density_correlation(per_bin, train_counts)
    x, width, xlabel = _bin_centers(per_bin)
    fig, ax1 = plt.subplots(figsize=(8, 3.5))
    ax1.bar(x, train_counts, width=width * 0.9, color="#9ab", label="training rows per bin")
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel("training rows per bin")
    ax2 = ax1.twinx()
    ax2.plot(x, per_bin["mae"], "o-", color="#c33", ms=3, label="test MAE per bin")
    ax2.set_ylabel("test MAE")
    ax1.set_title(f"Test error vs training density (Pearson {corr:.3f} over bins with test rows)")
    handles = ax1.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax1.legend(handles[0] + more[0], handles[1] + more[1], loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return corr


def feature_cosine_to_anchor(mean: np.ndarray, seen: np.ndarray, anchor: int) -> np.ndarray:
    """Cosine similarity of every bin's mean feature to the anchor bin's (NaN where unseen)."""
    mean = np.asarray(mean, dtype=np.float64)
    a = mean[anchor]
    norms = np.linalg.norm(mean, axis=1) * np.linalg.norm(a)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = mean @ a / norms
    cos[~np.asarray(seen, dtype=bool)] = np.nan
    return cos


def plot_fds(stats: dict, history: list[dict], bins: Bins, out_dir: Path) -> None:
    """FDS diagnostics: cosine similarity of per-bin feature statistics to an anchor bin
    (paper Figs. 3, 5a-b; anchor = the most populated bin) and the running-vs-smoothed L1
    distance per epoch (Fig. 5c)."""
    seen = stats["seen"].numpy().astype(bool)
    counts = stats["count"].numpy()
    anchor = int(np.argmax(counts)) if counts.sum() else 0
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key, label in (("running_mean", "running mean"), ("smoothed_mean", "smoothed mean"),
                       ("running_var", "running var"), ("smoothed_var", "smoothed var")):
        cos = feature_cosine_to_anchor(stats[key].numpy(), seen, anchor)
        ax = axes[0] if "mean" in key else axes[1]
        ax.plot(bins.centers, cos, label=label)
    lo, hi = (float(e) for e in bins.edges[anchor:anchor + 2])
    for ax, what in zip(axes, ("mean", "variance")):
        ax.axvline(bins.centers[anchor], color="k", lw=0.8, ls=":")
        ax.set_title(f"cosine similarity of feature {what}\nto the anchor bin, target [{lo:g}, {hi:g})",
                     fontsize=10)
        ax.set_ylabel("cosine similarity")
        ax.set_xlabel("target")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "fds_feature_similarity.png", dpi=110)
    plt.close(fig)

    epochs = [h["epoch"] for h in history if "fds_smoothing_l1" in h]
    dist = [h["fds_smoothing_l1"] for h in history if "fds_smoothing_l1" in h]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, dist, "o-")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("L1 distance, running vs smoothed")
    ax.set_title("FDS: running vs smoothed per-bin feature statistics")
    fig.tight_layout()
    fig.savefig(out_dir / "fds_smoothing_distance.png", dpi=110)
    plt.close(fig)


def write_shot_table(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=2))


def format_shot_table(rows: dict[str, dict], metric: str = "mae") -> str:
    """Side-by-side table: one row per method, columns overall / many / medium / few."""
    header = f"{'method':<22}" + "".join(f"{r:>10}" for r in ("overall", "many", "medium", "few"))
    lines = [f"{metric.upper()} on test", header, "-" * len(header)]
    for name, result in rows.items():
        lines.append(f"{name:<22}" + "".join(
            f"{result[r][metric]:>10.3f}" for r in ("overall", "many", "medium", "few")))
    return "\n".join(lines)


# -- raydir bench --------------------------------------------------------------------------
def plot_bench_errors(summary, methods: list[str], metric: str, path: Path, *,
                      carved: bool = False) -> None:
    """Test error per method with 95% CI bars over seeds: one panel per region (All, Few, and
    the carved interpolation / extrapolation ranges when the suite has them)."""
    regions = [("all", "all test rows"), ("few", "few-shot bins")]
    if carved:
        regions += [("interp", "carved interior range (interpolation)"),
                    ("extrap", "carved tail range (extrapolation)")]
    look = {(r["method"], r["metric"]): r for _, r in summary.iterrows()}
    fig, axes = plt.subplots(1, len(regions), figsize=(3.6 * len(regions), 3.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    one_seed = False
    for ax, (region, label) in zip(axes[0], regions):
        rows = [look.get((m, f"{region}_{metric}")) for m in methods]
        means = [r["mean"] if r is not None else np.nan for r in rows]
        halves = [r["ci_half"] if r is not None and r["n"] > 1 else np.nan for r in rows]
        one_seed |= any(r is not None and r["n"] == 1 for r in rows)
        x = np.arange(len(methods))
        ax.bar(x, means, color=[colors[i % len(colors)] for i in x], alpha=0.85)
        ax.errorbar(x, means, yerr=np.nan_to_num(halves), fmt="none", ecolor="k", capsize=4)
        for i, m in enumerate(means):
            if not np.isfinite(m):
                ax.text(i, 0, "failed", ha="center", va="bottom", fontsize=8, rotation=90)
        ax.set_xticks(x, methods, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_ylabel(f"test {metric.upper()} (lower is better)")
        ax.grid(axis="y", alpha=0.3)
    note = " (1 seed: no interval)" if one_seed else ""
    fig.suptitle(f"Test {metric.upper()} per method: mean over seeds with 95% confidence interval{note}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bench_per_bin(per_bin, edges: np.ndarray, train_counts: np.ndarray, path: Path, *,
                       carve: list | None = None, methods: list[str] | None = None) -> None:
    """Per-bin test MAE (mean over seeds) of each method over the training histogram, target
    on the x axis; carved (zero-shot) ranges shaded."""
    edges = np.asarray(edges, dtype=np.float64)
    centers = (edges[:-1] + edges[1:]) / 2.0
    methods = methods or list(dict.fromkeys(per_bin["method"]))
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True,
                                  gridspec_kw={"height_ratios": [2.2, 1]})
    for m in methods:
        rows = per_bin[per_bin["method"] == m]
        # bins without test rows are skipped (STS-B-DIR's test set leaves every other bin empty)
        mean = rows.groupby("bin")["mae"].mean().dropna()
        n_seeds = rows["seed"].nunique()
        ax.plot(centers[mean.index.to_numpy()], mean.to_numpy(), lw=1.4, marker=".", ms=3,
                label=f"{m} ({n_seeds} seed{'s' * (n_seeds != 1)})")
    axh.bar(centers, train_counts, width=float(np.diff(edges).mean()) * 0.9, color="#9ab")
    for i, (lo, hi) in enumerate(carve or []):
        for a in (ax, axh):
            a.axvspan(lo, hi, color="#fd8", alpha=0.35, lw=0,
                      label="carved from training (zero-shot)" if (i == 0 and a is ax) else None)
    ax.set_ylabel("test MAE per bin\n(mean over seeds)")
    ax.set_xlabel("target (bins with test rows)")
    ax.xaxis.set_tick_params(labelbottom=True)
    ax.set_title("Per-bin test error of each method over the training label histogram")
    ax.legend(fontsize=8, ncol=2, loc="upper left")
    ax.grid(alpha=0.3)
    axh.set_ylabel("training rows\nper bin")
    axh.set_xlabel("target")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_metric_vs_params(rows: list[dict], keys: list[str], label: str, path: Path, *,
                          value_key: str = "objective") -> None:
    """One panel per swept key: the sweep metric (``value_key`` of each trial row, axis title
    ``label``) against that key's value; completed trials as dots, stopped ones as crosses."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [r.get(key) for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        cats = sorted({str(v) for v in values})
        for status, marker in (("completed", "o"), ("stopped_early", "x")):
            pts = [(r.get(key), r[value_key]) for r in rows
                   if r["status"] == status and r.get(value_key) is not None]
            if not pts:
                continue
            xs = [p[0] if numeric else cats.index(str(p[0])) for p in pts]
            ax.scatter(xs, [p[1] for p in pts], marker=marker, label=status.replace("_", " "))
        if not numeric:
            ax.set_xticks(range(len(cats)), cats, rotation=45 if len(cats) > 4 else 0,
                          ha="right" if len(cats) > 4 else "center", fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{label} per swept value")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
