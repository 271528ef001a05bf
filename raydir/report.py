"""Plots and tables for a run: label density, per-bin error vs density, FDS diagnostics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from raydir.bins import Bins  # noqa: E402
from raydir.lds import effective_density  # noqa: E402


def plot_label_density(bins: Bins, counts: np.ndarray, reweight, path: Path) -> None:
    """Train label histogram with the LDS effective density (paper Fig. 2)."""
    centers = bins.centers
    width = float(np.diff(bins.edges.astype(np.float64)).mean())
    eff = effective_density(counts.astype(np.float64), kernel=reweight.kernel, ks=reweight.ks,
                            sigma=reweight.sigma)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(centers, counts, width=width * 0.9, color="#9ab", label="train labels (empirical)")
    ax.plot(centers, eff, color="#c33", lw=2,
            label=f"LDS effective density ({reweight.kernel}, ks={reweight.ks}, sigma={reweight.sigma})")
    ax.set_xlabel("target")
    ax.set_ylabel("count")
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


def plot_error_vs_density(per_bin, train_counts: np.ndarray, path: Path) -> float:
    """Per-bin test error against train density with their Pearson correlation (paper Fig. 1)."""
    corr = error_density_correlation(per_bin, train_counts)
    bins = per_bin["bin"].to_numpy()
    fig, ax1 = plt.subplots(figsize=(8, 3.5))
    ax1.bar(bins, train_counts, color="#9ab", label="train count")
    ax1.set_xlabel("bin")
    ax1.set_ylabel("train count")
    ax2 = ax1.twinx()
    ax2.plot(bins, per_bin["mae"], "o-", color="#c33", ms=3, label="test MAE")
    ax2.set_ylabel("test MAE")
    ax1.set_title(f"test error vs train density: Pearson {corr:.3f}")
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
    for ax, what in zip(axes, ("mean", "variance")):
        ax.axvline(bins.centers[anchor], color="k", lw=0.8, ls=":")
        ax.set_title(f"cosine similarity of feature {what} to bin {anchor}")
        ax.set_xlabel("target")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "fds_feature_similarity.png", dpi=110)
    plt.close(fig)

    epochs = [h["epoch"] for h in history if "fds_smoothing_l1" in h]
    dist = [h["fds_smoothing_l1"] for h in history if "fds_smoothing_l1" in h]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, dist, "o-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("L1 distance")
    ax.set_title("running vs smoothed feature statistics")
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
