"""Typed, validated configuration: YAML in, flat dict out (for Tune and MLflow).

Every section is a dataclass whose fields carry their default and a one-line comment.
``Config.from_dict`` rejects unknown keys with the list of valid ones; ``--set a.b=value``
overrides use the same dotted names as ``Config.to_flat_dict``. Validation runs before any
Ray or MLflow work starts, so a typo costs a second, not a cluster allocation.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from raydir._checks import check_choice, check_positive
from raydir.bins import FEW_THRESHOLD, MANY_THRESHOLD
from raydir.kernels import KERNELS

SOURCES = ("synthetic", "sts-b-dir", "agedb-dir", "imdb-wiki-dir", "table")
TARGET_SCALES = ("auto", "standard", "none")
# data.target_scale "auto": standardise targets of sources in arbitrary units (tables: prices,
# counts...; the synthetic source); the benchmarks' ages and 0-5 scores train as they are.
SCALED_BY_DEFAULT = ("table", "synthetic")


@dataclass
class SyntheticConfig:
    distribution: str = "age"        # train label shape: age (skewed) | long_tail | bimodal
    n_train: int = 6000              # training rows
    num_features: int = 16           # raw feature columns x0..x{d-1}
    noise: float = 0.3               # feature noise std (features are non-linear in the target)
    per_bin_eval: int = 30           # val / test rows per bin (balanced, capped like AgeDB-DIR)
    low: float = 0.0                 # smallest target value
    high: float = 100.0              # largest target value
    carve: list = field(default_factory=list)  # [[lo, hi], ...] target ranges emptied in train only


@dataclass
class TableConfig:
    target: str = "target"           # target column
    features: list = field(default_factory=list)  # feature columns; empty = every column but target and split
    categorical: str = "error"       # text / boolean feature columns: error (refused, named) | onehot
    max_categories: int = 50         # onehot: most frequent categories per column (train); the rest share "<other>"; 0 = no cap
    split_column: str = ""           # column holding train/val/test; empty = build a balanced split
    per_bin_eval: int = 10           # rows per bin for each of val and test when building the split
    format: str = "auto"             # auto | parquet | csv


@dataclass
class TextConfig:
    encoder: str = "minilm"          # minilm (frozen sentence embeddings) | glove (BiLSTM on word vectors)
    batch_size: int = 64             # sentences per embedding batch
    num_actors: int = 1              # encoder actors in the Ray Data pool
    max_tokens: int = 64             # glove: tokens kept per sentence
    actor_cpus: float = 1.0          # CPUs per encoder actor (also its torch thread count)
    actor_gpus: float = 0.0          # GPUs per encoder actor (0 = CPU; e.g. 0.25 shares a GPU)


@dataclass
class ImageConfig:
    root: str = ""                   # directory the CSV's image paths are relative to
    size: int = 64                   # images are resized to size x size (AgeDB-DIR uses 224)
    crop_padding: int = 8            # random-crop padding for training augmentation
    bad_images: str = "error"        # unreadable image: error | skip (counted and reported)
    csv: str = ""                    # label file (age,path,split) in data.path; empty = agedb.csv / imdb_wiki.csv


@dataclass
class DataConfig:
    source: str = "synthetic"        # synthetic | sts-b-dir | agedb-dir | imdb-wiki-dir | table
    path: str = ""                   # directory (sts-b-dir, agedb-dir, ...) or file / URI (table)
    cache_dir: str = ".raydir_cache"  # prepared Parquet shards, keyed by a hash of this section; "" = no cache
    nan_policy: str = "error"        # NaN / inf targets: error | drop (count is logged)
    seed: int = 0                    # data generation / split seed
    target_scale: str = "auto"       # model trains on (y - mean) / std: standard | none | auto (standard for table / synthetic)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    table: TableConfig = field(default_factory=TableConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)


@dataclass
class BinsConfig:
    kind: str = "auto"               # auto (the source's official bins) | uniform | integer
    start: float = 0.0               # lowest edge (uniform) / lowest integer bin (integer)
    stop: float = 100.0              # top edge (uniform) / one past the highest integer bin
    num_bins: int = 100              # uniform only
    merge_below: bool = False        # integer: values below start share the first bin
    out_of_range: str = "clip"       # clip into the edge bins | error


@dataclass
class ShotsConfig:
    many_threshold: int = MANY_THRESHOLD  # many-shot: more than this many (100) training rows in the bin
    few_threshold: int = FEW_THRESHOLD    # few-shot: fewer than this many (20)
    many: list = field(default_factory=list)    # explicit bin lists override the thresholds
    medium: list = field(default_factory=list)  # (sts-b-dir uses its official lists under auto)


@dataclass
class ModelConfig:
    kind: str = "auto"               # auto | mlp | text_pair | bilstm | resnet
    hidden: list = field(default_factory=lambda: [128, 128])  # encoder hidden sizes (mlp, text_pair)
    feature_dim: int = 64            # encoder output = FDS feature dimension
    dropout: float = 0.0             # dropout inside the encoder
    lstm_hidden: int = 128           # bilstm hidden size per direction (paper: 1500)
    resnet_width: int = 32           # resnet base channel count
    resnet_blocks: list = field(default_factory=lambda: [2, 2, 2, 2])  # residual blocks per stage


@dataclass
class LossConfig:
    name: str = "l1"                 # mse | l1 | huber | focal_l1 | focal_mse | bmc | gai | bni (Balanced MSE)
    huber_beta: float = 1.0          # huber transition point (in target stds when data.target_scale is standard)
    focal_activate: str = "sigmoid"  # focal-R activation: sigmoid | tanh
    focal_beta: float = 0.2          # focal-R beta (0.2 ages; 4 on raw STS-B scores; per target std when scaled)
    focal_gamma: float = 1.0         # focal-R gamma
    bmc_init_sigma: float = 1.0      # Balanced MSE: initial noise sigma, target units (ages: 10)
    bmc_sigma_lr: float = 1e-2       # Balanced MSE: sigma's own learning rate; 0 = fixed sigma
    gai_components: int = 8          # GAI: Gaussian-mixture components fitted on the train labels


@dataclass
class ReweightConfig:
    scheme: str = "none"             # none | inverse | sqrt_inv | dense (DenseWeight)
    lds: bool = False                # smooth the label density before inverting
    kernel: str = "gaussian"         # gaussian | triang | laplace
    ks: int = 5                      # odd window size
    sigma: float = 2.0               # gaussian / laplace width
    clip_min: float = 0.0            # inverse: clip counts below (AgeDB-DIR: 5); 0 = no clip
    clip_max: float = 0.0            # inverse: clip counts above (AgeDB-DIR: 1000); 0 = no clip
    dense_alpha: float = 1.0         # dense: weight strength alpha (0 = uniform weights)
    dense_eps: float = 1e-6          # dense: smallest weight before normalising to mean 1


@dataclass
class FDSConfig:
    enabled: bool = False            # feature distribution smoothing between encoder and head
    kernel: str = "gaussian"         # gaussian | triang | laplace
    ks: int = 5                      # odd window size
    sigma: float = 2.0               # gaussian / laplace width
    momentum: float = 0.9            # EMA of per-bin statistics across epochs
    start_update: int = 0            # first epoch whose features update the statistics
    start_smooth: int = 1            # first epoch whose features are calibrated
    clamp_min: float = 0.1           # variance-ratio clamp (STS-B: 0.5)
    clamp_max: float = 10.0          # (STS-B: 2)
    covariance: str = "diag"         # diag (reference code) | full (paper formula)
    gather: str = "inflight"         # inflight (from the epoch's forward passes) | extra_pass


@dataclass
class RankSimConfig:
    weight: float = 0.0              # gamma, weight of the RankSim term; 0 = off (ages 100, STS-B 3e-4)
    interpolation_lambda: float = 2.0  # lambda of the blackbox ranking gradient (papers: 2)


@dataclass
class ConRConfig:
    weight: float = 0.0              # beta, weight of the ConR term; 0 = off (AgeDB 4.0); needs 2 views
    temperature: float = 0.07        # tau of the feature similarities
    omega: float = 1.0               # label / prediction distance threshold, target units
    eps: float = 0.01                # pushing strength e: negatives weighted exp(e * |y_i - y_j|)
    denominator: str = "clean"       # clean (positives only) | reference (adds 1 per non-positive)


@dataclass
class SRLConfig:
    weight: float = 0.0              # weight of the SRL term (w_con L_con + w_uni L_uni + w_smo L_smo); 0 = off
    w_con: float = 1e-4              # contrastive term toward the bin centroids (STS-B: 1e-4)
    w_uni: float = 1e-2              # uniformity (enveloping) term (STS-B: 1e-2)
    w_smo: float = 1e-4              # smoothness (homogeneity) term (STS-B: 1e-4)
    temperature: float = 0.1         # tau of the contrastive term
    points: int = 1000               # random unit vectors of the uniformity term
    proj_dim: int = 128              # projector output size
    smooth_alpha: float = 1.0        # smooth term: alpha * sum of neighbour cosines (STS-B +1, AgeDB -1)
    smooth_beta: float = 0.1         # smooth term: beta * their variance
    momentum: float = 0.9            # EMA of the per-bin centroids across epochs


@dataclass
class RRTConfig:
    enabled: bool = False            # stage two: re-train only the regressor
    epochs: int = 5                  # stage-two epochs
    lr: float = 1e-3                 # stage-two learning rate
    scheme: str = "inverse"          # stage-two reweighting: inverse | sqrt_inv
    lds: bool = True                 # stage-two LDS (kernel settings from the reweight section)


@dataclass
class ResampleConfig:
    method: str = "none"             # none | smoter | smogn
    k: int = 5                       # nearest neighbours within a region
    threshold: float = 0.5           # relevance at or above this is rare
    strategy: str = "balance"        # balance | extreme
    pert: float = 0.02               # smogn: noise scale as a fraction of each feature's std


@dataclass
class TrainConfig:
    num_workers: int = 2             # Ray Train workers (DDP processes)
    use_gpu: bool = False            # one GPU per worker (nccl) instead of CPU (gloo)
    cpus_per_worker: float = 1.0     # CPU reservation per worker
    epochs: int = 10                 # stage-one epochs
    batch_size: int = 128            # per-worker batch size
    eval_batch_size: int = 512       # per-worker evaluation batch size
    optimizer: str = "adam"          # adam | sgd
    lr: float = 1e-3                 # learning rate
    weight_decay: float = 0.0        # L2 penalty
    sgd_momentum: float = 0.9        # sgd only
    schedule: str = "none"           # none | cosine | step
    step_epochs: list = field(default_factory=lambda: [60, 80])  # step schedule milestones (x0.1)
    grad_clip: float = 0.0           # max gradient norm; 0 = off
    select_metric: str = "mae"       # best checkpoint by val: mae | mse | few_mae
    max_failures: int = 2            # worker failures tolerated (resume from last checkpoint)
    materialize: str = "auto"        # training split in memory: auto (when it fits) | always | never
    allreduce: str = "auto"          # CPU gradients: auto (shared memory when every worker is on one machine) | gloo
    storage_path: str = ""           # checkpoints / results; empty = ~/ray_results
    seed: int = 0                    # model init, shuffling, augmentation


@dataclass
class TrackingConfig:
    uri: str = ""                    # MLflow tracking URI; empty = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "raydir"       # MLflow experiment name
    run_name: str = ""               # MLflow run name; empty = generated
    register_name: str = ""          # registered model name; empty = do not register
    alias: str = ""                  # registry alias `raydir train` moves to its version when it beats the holder; empty = none
    log_model: bool = True           # log the trained model (raw inputs in, target units out)


# Keys a sweep may vary. The data, bins and shots sections are prepared once per sweep and
# the per-trial resources are validated once, so those stay fixed across trials.
SWEEPABLE = (
    "reweight.scheme", "reweight.lds", "reweight.kernel", "reweight.ks", "reweight.sigma",
    "reweight.clip_min", "reweight.clip_max",
    "fds.enabled", "fds.kernel", "fds.ks", "fds.sigma", "fds.momentum", "fds.start_smooth",
    "fds.clamp_min", "fds.clamp_max",
    "loss.name", "loss.focal_activate", "loss.focal_beta", "loss.focal_gamma", "loss.huber_beta",
    "rrt.enabled", "rrt.scheme", "rrt.lr",
    "loss.bmc_init_sigma", "loss.bmc_sigma_lr", "loss.gai_components", "reweight.dense_alpha",
    "ranksim.weight", "ranksim.interpolation_lambda", "conr.weight", "conr.temperature",
    "conr.omega", "conr.eps", "srl.weight", "srl.w_con", "srl.w_uni", "srl.w_smo",
    "srl.temperature",
    "model.dropout", "train.lr", "train.weight_decay", "train.batch_size",
    "method",  # a named method (raydir.bench.presets, e.g. lds_fds, bmc, lds+ranksim): its keys
)
SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")  # one per swept key
# Validation metrics a sweep can optimise; "a+b" optimises the mean of the terms (same direction).
TUNE_METRIC_TERMS = {
    "mae": "min", "mse": "min", "gmean": "min", "pearson": "max", "spearman": "max",
    **{f"{shot}_{m}": "min" for shot in ("many", "medium", "few") for m in ("mae", "mse", "gmean")},
}


@dataclass
class TuneConfig:
    space: dict = field(default_factory=dict)  # {"reweight.ks": {grid: [3, 5]}, "fds.sigma": {uniform: [1, 3]}, ...}
    searcher: str = "grid"           # grid (every combination) | random (num_samples draws) | optuna | hyperopt
    num_samples: int = 1             # grid: repeats of the grid; random / model-based: trials drawn
    metric: str = "mae"              # val metric: mae | mse | few_mae | ... or "mae+few_mae" (mean of the terms)
    mode: str = "auto"               # auto (from the metric: errors min, correlations max) | min | max
    scheduler: str = "asha"          # asha (stop poor trials early) | none (every trial runs all epochs)
    grace_period: int = 1            # asha: epochs every trial runs before it can be stopped
    reduction_factor: int = 2        # asha: keep the best 1/reduction_factor at each rung
    max_concurrent_trials: int = 0   # 0 = as many as fit: each trial's workers + 1 CPU for its Ray Data ingest
    alias: str = "champion"          # registry alias moved to the best model when it beats the holder
    name: str = ""                   # experiment name; empty = raydir-tune-<hash of the config>; re-run = resume
    storage_path: str = ""           # Tune experiment folder root; empty = train.storage_path or ~/ray_results
    seed: int = 0                    # random / model-based searchers: sampling seed
    log_models: bool = True          # log every completed trial's model to its run (the best is registered)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    bins: BinsConfig = field(default_factory=BinsConfig)
    shots: ShotsConfig = field(default_factory=ShotsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    fds: FDSConfig = field(default_factory=FDSConfig)
    ranksim: RankSimConfig = field(default_factory=RankSimConfig)
    conr: ConRConfig = field(default_factory=ConRConfig)
    srl: SRLConfig = field(default_factory=SRLConfig)
    rrt: RRTConfig = field(default_factory=RRTConfig)
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict | None) -> "Config":
        cfg = _build(cls, d or {}, prefix="")
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> "Config":
        path = Path(path)
        _check_config_file(path)
        raw = load_yaml_with_base(path)
        for item in overrides or []:
            apply_override(raw, item)
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def target_scale(self) -> str:
        """``data.target_scale`` with ``auto`` resolved: ``standard`` or ``none``."""
        if self.data.target_scale != "auto":
            return self.data.target_scale
        return "standard" if self.data.source in SCALED_BY_DEFAULT else "none"

    @property
    def total_epochs(self) -> int:
        """Stage one's epochs plus RRT stage two's (the final test report's MLflow step)."""
        return self.train.epochs + (self.rrt.epochs if self.rrt.enabled else 0)

    def to_flat_dict(self) -> dict[str, Any]:
        """``{"fds.ks": 5, "data.synthetic.n_train": 6000, ...}`` for MLflow params and Tune."""
        out: dict[str, Any] = {}

        def walk(obj: Any, prefix: str) -> None:
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                key = f"{prefix}{f.name}"
                if dataclasses.is_dataclass(value):
                    walk(value, key + ".")
                else:
                    out[key] = value

        walk(self, "")
        return out

    def with_overrides(self, flat: dict[str, Any]) -> "Config":
        """A validated copy with dotted-key values replaced (Tune trials use this)."""
        raw = self.to_dict()
        for key, value in flat.items():
            _set_dotted(raw, key, value)
        return Config.from_dict(raw)

    # -- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        _validate_data(self.data)
        _choice("bins.kind", self.bins.kind, ("auto", "uniform", "integer"))
        _choice("bins.out_of_range", self.bins.out_of_range, ("clip", "error"))
        if self.bins.kind != "auto" and not self.bins.stop > self.bins.start:
            raise ValueError(f"'bins.stop' ({self.bins.stop}) should be greater than 'bins.start' ({self.bins.start}).")
        _positive("bins.num_bins", self.bins.num_bins)
        if self.shots.few_threshold > self.shots.many_threshold:
            raise ValueError(
                f"'shots.few_threshold' ({self.shots.few_threshold}) should not exceed "
                f"'shots.many_threshold' ({self.shots.many_threshold})."
            )
        _choice("model.kind", self.model.kind, ("auto", "mlp", "text_pair", "bilstm", "resnet"))
        _positive("model.feature_dim", self.model.feature_dim)
        if not 0.0 <= self.model.dropout < 1.0:
            raise ValueError(f"'model.dropout' should be in [0, 1); got {self.model.dropout}.")
        _choice("loss.name", self.loss.name, ("mse", "l1", "huber", "focal_l1", "focal_mse", "bmc", "gai", "bni"))
        _choice("loss.focal_activate", self.loss.focal_activate, ("sigmoid", "tanh"))
        _positive("loss.focal_beta", self.loss.focal_beta)
        if self.loss.focal_gamma < 0:
            raise ValueError(f"'loss.focal_gamma' should be >= 0; got {self.loss.focal_gamma}.")
        for section in ("reweight", "fds"):
            sec = getattr(self, section)
            _choice(f"{section}.kernel", sec.kernel, KERNELS)
            _positive(f"{section}.ks", sec.ks, integer=True, odd=True)
            _positive(f"{section}.sigma", sec.sigma)
        _choice("reweight.scheme", self.reweight.scheme, ("none", "inverse", "sqrt_inv", "dense"))
        if self.reweight.lds and self.reweight.scheme in ("none", "dense"):
            raise ValueError(
                f"'reweight.lds' is true but 'reweight.scheme' is {self.reweight.scheme!r}: LDS "
                f"smooths the bin density that the weights invert. Set reweight.scheme to inverse "
                f"or sqrt_inv, or reweight.lds to false."
            )
        _validate_methods(self)
        if self.reweight.clip_max and self.reweight.clip_max < self.reweight.clip_min:
            raise ValueError(
                f"'reweight.clip_max' ({self.reweight.clip_max}) should be >= 'reweight.clip_min' "
                f"({self.reweight.clip_min})."
            )
        if not 0.0 <= self.fds.momentum < 1.0:
            raise ValueError(f"'fds.momentum' should be in [0, 1); got {self.fds.momentum}.")
        if not 0 < self.fds.clamp_min <= self.fds.clamp_max:
            raise ValueError(
                f"'fds.clamp_min' and 'fds.clamp_max' should satisfy 0 < min <= max; got "
                f"{self.fds.clamp_min}, {self.fds.clamp_max}."
            )
        _choice("fds.covariance", self.fds.covariance, ("diag", "full"))
        _choice("fds.gather", self.fds.gather, ("inflight", "extra_pass"))
        _choice("rrt.scheme", self.rrt.scheme, ("inverse", "sqrt_inv"))
        _positive("rrt.epochs", self.rrt.epochs)
        _positive("rrt.lr", self.rrt.lr)
        _choice("resample.method", self.resample.method, ("none", "smoter", "smogn"))
        _choice("resample.strategy", self.resample.strategy, ("balance", "extreme"))
        _positive("resample.k", self.resample.k)
        if self.resample.method != "none":
            if not 0.0 < self.resample.threshold <= 1.0:
                raise ValueError(f"'resample.threshold' should be in (0, 1]; got {self.resample.threshold}.")
            _positive("resample.pert", self.resample.pert)
            from raydir.data.base import check_resample_input, input_kind_of

            check_resample_input(self, input_kind_of(self.data))  # the pipeline: the loaded kind
        _positive("train.num_workers", self.train.num_workers)
        _positive("train.epochs", self.train.epochs)
        _positive("train.batch_size", self.train.batch_size)
        _positive("train.eval_batch_size", self.train.eval_batch_size)
        _positive("train.lr", self.train.lr)
        _choice("train.optimizer", self.train.optimizer, ("adam", "sgd"))
        _choice("train.schedule", self.train.schedule, ("none", "cosine", "step"))
        _choice("train.materialize", self.train.materialize, ("auto", "always", "never"))
        _choice("train.allreduce", self.train.allreduce, ("auto", "gloo"))
        _choice("train.select_metric", self.train.select_metric, ("mae", "mse", "few_mae"))
        if self.train.grad_clip < 0:
            raise ValueError(f"'train.grad_clip' should be >= 0 (0 = off); got {self.train.grad_clip}.")
        if self.train.max_failures < -1:
            raise ValueError(f"'train.max_failures' should be >= -1 (-1 = unlimited); got {self.train.max_failures}.")
        _validate_alias("tracking.alias", self.tracking.alias, allow_empty=True)
        _validate_tune(self.tune)


def _validate_methods(c: "Config") -> None:
    """The sections of the methods after the DIR paper (raydir.methods)."""
    _positive("loss.bmc_init_sigma", c.loss.bmc_init_sigma)
    _non_negative("loss.bmc_sigma_lr", c.loss.bmc_sigma_lr)
    _positive("loss.gai_components", c.loss.gai_components)
    _non_negative("reweight.dense_alpha", c.reweight.dense_alpha)
    _positive("reweight.dense_eps", c.reweight.dense_eps)
    for key in ("ranksim.weight", "conr.weight", "conr.eps", "srl.weight", "srl.w_con",
                "srl.w_uni", "srl.w_smo", "srl.smooth_beta"):
        section, name = key.split(".")
        _non_negative(key, getattr(getattr(c, section), name))
    for key in ("ranksim.interpolation_lambda", "conr.temperature", "conr.omega",
                "srl.temperature", "srl.points", "srl.proj_dim"):
        section, name = key.split(".")
        _positive(key, getattr(getattr(c, section), name))
    _choice("conr.denominator", c.conr.denominator, ("clean", "reference"))
    if c.loss.name in ("bmc", "gai", "bni") and c.reweight.scheme != "none":
        raise ValueError(
            f"'loss.name' is {c.loss.name!r} (Balanced MSE, itself the correction for the label "
            f"imbalance, with no per-sample weights) but 'reweight.scheme' is "
            f"{c.reweight.scheme!r}, whose weights it would ignore. Set reweight.scheme: none."
        )
    if not 0.0 <= c.srl.momentum < 1.0:
        raise ValueError(f"'srl.momentum' should be in [0, 1); got {c.srl.momentum}.")


def _validate_data(d: "DataConfig") -> None:
    """The data section (Config.validate's first part)."""
    _choice("data.source", d.source, SOURCES)
    _choice("data.nan_policy", d.nan_policy, ("error", "drop"))
    _choice("data.target_scale", d.target_scale, TARGET_SCALES)
    _choice("data.synthetic.distribution", d.synthetic.distribution, ("age", "long_tail", "bimodal"))
    _positive("data.synthetic.n_train", d.synthetic.n_train)
    _positive("data.synthetic.num_features", d.synthetic.num_features)
    _positive("data.synthetic.per_bin_eval", d.synthetic.per_bin_eval)
    if not d.synthetic.high > d.synthetic.low:
        raise ValueError(
            f"'data.synthetic.high' ({d.synthetic.high}) should be greater than "
            f"'data.synthetic.low' ({d.synthetic.low})."
        )
    for i, rng in enumerate(d.synthetic.carve):
        if not (isinstance(rng, (list, tuple)) and len(rng) == 2 and rng[0] < rng[1]):
            raise ValueError(
                f"'data.synthetic.carve[{i}]' should be a [low, high] pair with low < high; got {rng!r}."
            )
    _choice("data.table.categorical", d.table.categorical, ("error", "onehot"))
    _choice("data.table.format", d.table.format, ("auto", "parquet", "csv"))
    if d.table.max_categories < 0:
        raise ValueError(f"'data.table.max_categories' should be >= 0 (0 = no cap); got {d.table.max_categories}.")
    _choice("data.text.encoder", d.text.encoder, ("minilm", "glove"))
    for key in ("batch_size", "num_actors", "max_tokens", "actor_cpus"):
        _positive(f"data.text.{key}", getattr(d.text, key))
    if d.text.actor_gpus < 0:
        raise ValueError(f"'data.text.actor_gpus' should be >= 0 (0 = CPU); got {d.text.actor_gpus}.")
    _choice("data.image.bad_images", d.image.bad_images, ("error", "skip"))
    _positive("data.image.size", d.image.size)
    if d.image.crop_padding < 0:
        raise ValueError(f"'data.image.crop_padding' should be >= 0 (0 = no random crop); got {d.image.crop_padding}.")
    if d.source in ("sts-b-dir", "agedb-dir", "imdb-wiki-dir", "table") and not d.path:
        raise ValueError(
            f"'data.path' is required for data.source={d.source!r}: the directory "
            f"(or, for table, the file / URI) to read from."
        )


def tune_metric_mode(metric: str) -> str:
    """'min' or 'max' for a metric expression such as ``mae+few_mae`` (validated first)."""
    terms = [t.strip() for t in metric.split("+")]
    unknown = [t for t in terms if t not in TUNE_METRIC_TERMS]
    if not metric.strip() or unknown:
        raise ValueError(
            f"'tune.metric' should be a validation metric or several joined by '+' (their mean), "
            f"e.g. 'few_mae' or 'mae+few_mae'; got {metric!r}. Valid terms: {sorted(TUNE_METRIC_TERMS)}."
        )
    modes = {TUNE_METRIC_TERMS[t] for t in terms}
    if len(modes) > 1:
        raise ValueError(
            f"'tune.metric' {metric!r} mixes errors (lower is better) with correlations (higher is "
            f"better); their mean has no direction. Optimise them in separate sweeps."
        )
    return modes.pop()


def _validate_tune(t: "TuneConfig") -> None:
    """Shape of the tune section; trial values are checked against the rest of the config by
    ``raydir.tune`` before a sweep starts. An empty space is valid here (``raydir train``)."""
    if not isinstance(t.space, dict):
        raise ValueError(f"'tune.space' should be a mapping of swept keys to specs; got {t.space!r}.")
    for key, spec in t.space.items():
        if key not in SWEEPABLE:
            close = difflib.get_close_matches(str(key), SWEEPABLE, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"'tune.space' has unknown key {key!r}.{hint} Sweepable keys: {list(SWEEPABLE)}.")
        if isinstance(spec, (list, tuple)):  # shorthand: a bare list is a grid
            spec = {"grid": list(spec)}
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SPACE_KINDS):
            raise ValueError(
                f"'tune.space.{key}' should be one of {{grid: [..]}}, {{choice: [..]}}, {{uniform: [lo, hi]}}, "
                f"{{loguniform: [lo, hi]}}, {{randint: [lo, hi]}} (or a bare list = grid); got {spec!r}."
            )
        kind, values = next(iter(spec.items()))
        if not isinstance(values, (list, tuple)) or len(values) == 0:
            raise ValueError(
                f"'tune.space.{key}' has no values to try ({kind}: {values!r}). Give at least one, "
                f"e.g. {{{kind}: {'[1, 3]' if kind in ('uniform', 'loguniform', 'randint') else '[3, 5, 7]'}}}."
            )
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
                    or not values[0] < values[1]:
                raise ValueError(f"'tune.space.{key}' {kind} should be [low, high] with low < high; got {values!r}.")
            if kind == "loguniform" and values[0] <= 0:
                raise ValueError(f"'tune.space.{key}' loguniform needs low > 0; got {values!r}.")
    _choice("tune.searcher", t.searcher, ("grid", "random", "optuna", "hyperopt"))
    if t.searcher == "grid":
        ranged = [k for k, s in t.space.items() if isinstance(s, dict) and next(iter(s)) in
                  ("uniform", "loguniform", "randint")]
        if ranged:
            raise ValueError(
                f"'tune.searcher' is 'grid' but {ranged} are ranges, which a grid cannot enumerate. "
                f"Give them as {{grid: [..]}} values, or set tune.searcher=random with tune.num_samples."
            )
    _positive("tune.num_samples", t.num_samples)
    natural = tune_metric_mode(t.metric)
    _choice("tune.mode", t.mode, ("auto", "min", "max"))
    if t.mode not in ("auto", natural):
        raise ValueError(
            f"'tune.mode' is {t.mode!r} but 'tune.metric' {t.metric!r} is better when {natural}imised; "
            f"set tune.mode to auto or {natural}."
        )
    _choice("tune.scheduler", t.scheduler, ("asha", "none"))
    _positive("tune.grace_period", t.grace_period)
    if not isinstance(t.reduction_factor, int) or t.reduction_factor < 2:
        raise ValueError(f"'tune.reduction_factor' should be an integer >= 2; got {t.reduction_factor!r}.")
    if t.max_concurrent_trials < 0:
        raise ValueError(f"'tune.max_concurrent_trials' should be >= 0 (0 = as many as fit); got {t.max_concurrent_trials}.")
    _validate_alias("tune.alias", t.alias, allow_empty=False)


def _validate_alias(name: str, alias: str, *, allow_empty: bool) -> None:
    if allow_empty and not alias:
        return
    if not alias or not alias.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"'{name}' should be a {'' if allow_empty else 'non-empty '}name of "
                         f"letters, digits, '-' or '_'{' (or empty)' if allow_empty else ''}; got {alias!r}.")


# -- helpers ------------------------------------------------------------------------------
_choice = check_choice
_positive = check_positive


def _non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"'{name}' should be a number >= 0 (0 = off); got {value!r}.")


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "config"
        raise ValueError(f"'{where}' should be a mapping of keys to values; got {raw!r}.")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
        raise ValueError(
            f"unknown config key '{prefix}{key}'.{hint} Valid keys in "
            f"'{prefix.rstrip('.') or 'top level'}': {sorted(fields)}."
        )
    kwargs = {}
    for name, value in raw.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value if value is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, typ)
    return cls(**kwargs)


def _coerce(name: str, value: Any, typ: Any) -> Any:
    origin = get_origin(typ) or typ
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"'{name}' should be a list; got {value!r}.")
        return list(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"'{name}' should be true or false; got {value!r}.")
    if typ in (int, float) and isinstance(value, str):  # '1e-3', quoted numbers: by the field's type
        value = _number_from_text(value)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"'{name}' should be an integer; got {value!r}.")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"'{name}' should be a number; got {value!r}.")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ValueError(f"'{name}' should be a string; got {value!r}.")
        return value
    if get_args(typ):  # pragma: no cover - no unions in the schema today
        return value
    return value


def _number_from_text(text: str):
    """``'1e-3'`` -> 0.001, ``'5'`` -> 5; anything else unchanged (and refused by the caller)."""
    try:
        return int(text.strip())
    except ValueError:
        pass
    try:
        number = float(text.strip())
    except ValueError:
        return text
    return number if math.isfinite(number) else text


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-3`` and ``1E5`` are numbers (YAML 1.1,
    PyYAML's rule, reads them as strings because they lack a dot)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
                |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python values; a syntax error names ``where``, the line and the column."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        at = f"{where}, line {mark.line + 1}, column {mark.column + 1}" if mark else where
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        raise ValueError(f"{at}: malformed YAML: {problem}"
                         f"{f' ({context})' if context else ''}.") from None


def _check_config_file(path: Path) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"config '{path}' is a directory; pass a YAML file, e.g. "
                                f"{path / 'demo.yaml'} or jobs/configs/demo.yaml.")
    if not path.is_file():
        raise FileNotFoundError(f"config file '{path}' does not exist.")


def load_yaml_with_base(path: Path, _seen: tuple = ()) -> dict:
    """Read a YAML config; a top-level ``base: other.yaml`` (relative to this file) is read
    first and this file's values are merged over it, section by section."""
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"config 'base' chain loops back to '{path}'.")
    _check_config_file(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"config file '{path}' is not text (UTF-8); pass a YAML file.") from None
    raw = parse_yaml(text, f"config file '{path}'") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file '{path}' should hold a mapping of sections; got {type(raw).__name__}.")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _deep_merge(load_yaml_with_base(path.parent / base, _seen + (path,)), raw)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``key.sub=value`` override (value parsed as YAML) to a raw config dict."""
    if "=" not in item:
        raise ValueError(f"--set expects key=value (e.g. fds.ks=7); got {item!r}.")
    key, text = item.split("=", 1)
    _set_dotted(raw, key.strip(), parse_yaml(text, f"--set {item!r}") if text.strip() else "")


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    if key.startswith("tune.space."):  # swept keys hold dots themselves: tune.space.fds.ks=[3, 5]
        raw.setdefault("tune", {}).setdefault("space", {})[key[len("tune.space."):]] = value
        return
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set '{key}': '{part}' is not a section.")
    node[parts[-1]] = value
