"""Bench tables: the paper's layout in Markdown, and the published numbers beside raydir's.

Rows are methods, column groups the target regions (All / Many / Medium / Few, the balanced
error, and on suites with carved ranges the interpolation / extrapolation ranges and the
rest); a cell is ``mean ± half-width of the 95% CI`` over seeds, the best mean per column in
bold. One seed gives no interval: the cell says ``(1 seed)`` and a note says why.
"""

from __future__ import annotations

import csv
import math
from importlib import resources
from typing import Any, Sequence

import pandas as pd

from raydir.bench.stats import higher_is_better

REGION_LABELS = {"all": "All", "many": "Many", "medium": "Medium", "few": "Few",
                 "interp": "Interp. (carved)", "extrap": "Extrap. (carved)", "rest": "Rest"}
METRIC_LABELS = {"mae": "MAE", "mse": "MSE", "gmean": "GM", "pearson": "Pearson",
                 "bmae": "bMAE", "bmse": "bMSE"}
FAILED_MARK = "†"


def load_published(dataset: str = "") -> list[dict[str, Any]]:
    """Rows of ``published.csv`` (all, or those of one dataset), numbers as floats."""
    text = resources.files("raydir.bench").joinpath("published.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    for r in rows:
        for k in ("all", "many", "medium", "few"):
            r[k] = float(r[k])
    return [r for r in rows if not dataset or r["dataset"] == dataset]


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def cell(row: pd.Series | None, digits: int = 3) -> str:
    """``mean ± ci_half``; ``mean (1 seed)`` without an interval; ``failed`` / ``n/a``."""
    if row is None or row["n"] == 0:
        return "failed" if row is not None and row["n_failed"] else "n/a"
    text = _fmt(row["mean"], digits)
    text += f" ± {_fmt(row['ci_half'], digits)}" if row["n"] > 1 else " (1 seed)"
    return text


def _lookup(summary: pd.DataFrame) -> dict[tuple[str, str], pd.Series]:
    return {(row["method"], row["metric"]): row for _, row in summary.iterrows()}


def metric_table(summary: pd.DataFrame, methods: Sequence[str], columns: Sequence[str],
                 *, digits: int = 3) -> str:
    """A Markdown table: one row per method, one column per metric name in ``columns``
    (``all_mae``, ``few_bmae``, ...), best mean per column in bold."""
    look = _lookup(summary)
    head = ["method"] + [f"{REGION_LABELS[c.split('_')[0]]} {METRIC_LABELS.get(c.split('_', 1)[1], c)}"
                         for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = {}
    for c in columns:
        means = [(look[(m, c)]["mean"], m) for m in methods
                 if (m, c) in look and math.isfinite(look[(m, c)]["mean"])]
        if means:
            best[c] = (max if higher_is_better(c) else min)(means)[1]
    for m in methods:
        failed = any(look[(m, c)]["n_failed"] for c in columns if (m, c) in look)
        cells = [m + (f" {FAILED_MARK}" if failed else "")]
        for c in columns:
            text = cell(look.get((m, c)), digits)
            cells.append(f"**{text}**" if best.get(c) == m else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diff_table(summary: pd.DataFrame, methods: Sequence[str], columns: Sequence[str],
               baseline: str = "vanilla", *, digits: int = 3) -> str:
    """Paired difference to ``baseline`` on the same seeds: ``diff ± CI (p=..)`` per column."""
    look = _lookup(summary)
    head = ["method"] + [f"Δ {REGION_LABELS[c.split('_')[0]]} {METRIC_LABELS.get(c.split('_', 1)[1], c)}"
                         for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        if m == baseline:
            continue
        cells = [m]
        for c in columns:
            r = look.get((m, c))
            if r is None or not r["n_pairs"] or not math.isfinite(r["diff"]):
                cells.append("n/a")
                continue
            text = f"{r['diff']:+.{digits}f}"
            if r["n_pairs"] > 1 and math.isfinite(r["diff_ci_half"]):
                text += f" ± {_fmt(r['diff_ci_half'], digits)}"
            text += f" (p={r['p_value']:.3f})" if math.isfinite(r["p_value"]) else " (p n/a)"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def published_table(published: list[dict], summary: pd.DataFrame, methods: Sequence[str],
                    metric: str, *, digits: int = 3) -> str:
    """The published rows of this setting, with raydir's mean of the same method beside."""
    look = _lookup(summary)
    regions = ("all", "many", "medium", "few")
    head = (["published method"] + [f"{REGION_LABELS[r]}" for r in regions] + ["raydir method"]
            + [f"raydir {REGION_LABELS[r]}" for r in regions] + ["source"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in published:
        if p["metric"] != metric:
            continue
        ours = p["raydir_method"] if p["raydir_method"] in methods else ""
        mine = [_fmt(look[(ours, f"{r}_{metric}")]["mean"], digits) if (ours, f"{r}_{metric}") in look
                else "" for r in regions]
        source = p["source"] + (f" ({p['note']})" if p.get("note") else "")
        lines.append("| " + " | ".join([p["method"], *[f"{p[r]:g}" for r in regions],
                                        ours or "-", *mine, source]) + " |")
    return "\n".join(lines)


def failure_notes(records: Sequence[dict]) -> list[str]:
    out = []
    for r in records:
        if r["status"] == "error":
            out.append(f"{FAILED_MARK} {r['method']} failed on seed {r['seed']}: {r['error']}")
    return out


def bench_markdown(summary: pd.DataFrame, records: Sequence[dict], *, suite: str, metric: str,
                   carved: bool, published: list[dict], setting_note: str = "",
                   wall_seconds: float | None = None) -> str:
    """The whole ``bench.md``: headline table, secondary metric, differences to vanilla,
    error-vs-density correlation, the published numbers, notes."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    seeds = sorted({r["seed"] for r in records})
    regions = ("all", "many", "medium", "few")
    main = [f"{r}_{metric}" for r in regions] + [f"all_b{metric}"]
    if carved:
        main += [f"{r}_{metric}" for r in ("interp", "extrap", "rest")]
    second = [f"{r}_gmean" for r in regions] if metric == "mae" else [f"{r}_pearson" for r in regions]
    parts = [f"# raydir bench: suite `{suite}`", "",
             f"{len(methods)} method(s) x {len(seeds)} seed(s) ({seeds[0]}..{seeds[-1]}); cells: "
             f"mean ± half-width of the 95% confidence interval over seeds (Student t); best mean "
             f"per column in bold. b{metric.upper()}: mean over test bins of the per-bin "
             f"{metric.upper()}." + (f" Wall time {wall_seconds / 60:.1f} min." if wall_seconds else ""),
             "", f"## Test {METRIC_LABELS[metric]}", "", metric_table(summary, methods, main), "",
             f"## Test {METRIC_LABELS[second[0].split('_')[1]]}", "",
             metric_table(summary, methods, second), ""]
    if "vanilla" in methods and len(methods) > 1:
        parts += ["## Difference to vanilla on the same seeds (paired t-test)", "",
                  diff_table(summary, methods, main), ""]
    parts += ["## Per-bin test MAE vs training density (Pearson over test bins)", "",
              _density_table(summary, methods), ""]
    if published:
        parts += [f"## Published numbers (test {METRIC_LABELS[metric]})", "",
                  f"Setting: {setting_note}." if setting_note else "", "",
                  published_table(published, summary, methods, metric), ""]
    notes = failure_notes(records)
    if len(seeds) == 1:
        notes.append("One seed per method: no confidence interval and no p-value can be given "
                     "(run with --seeds 2 or more; 5 is a sensible minimum).")
    if notes:
        parts += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(parts)


def _density_table(summary: pd.DataFrame, methods: Sequence[str]) -> str:
    look = _lookup(summary)
    lines = ["| method | vs training count | vs LDS effective density |", "|---|---|---|"]
    for m in methods:
        lines.append(f"| {m} | {cell(look.get((m, 'error_density_pearson')))} | "
                     f"{cell(look.get((m, 'error_lds_density_pearson')))} |")
    return "\n".join(lines)


def trials_frame(records: Sequence[dict]) -> pd.DataFrame:
    """One row per trial: method, seed, status, run id, error, then every metric."""
    rows = [{"method": r["method"], "seed": r["seed"], "status": r["status"],
             "run_id": r.get("run_id"), "error": r.get("error", ""), **(r.get("metrics") or {})}
            for r in records]
    return pd.DataFrame(rows)


__all__ = ["bench_markdown", "metric_table", "diff_table", "published_table", "load_published",
           "trials_frame", "cell"]
