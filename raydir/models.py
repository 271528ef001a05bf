"""Encoder -> FDS -> regression head, assembled from a config and the prepared data's info."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from raydir.config import Config
from raydir.data.base import ModelInfo
from raydir.fds import FDS


class ModelOutput(NamedTuple):
    """``DIRModel(..., details=True)``: everything one forward pass computes."""

    pred: torch.Tensor        # (n,) prediction in target units
    features: torch.Tensor    # (n, d) encoder output (before FDS)
    calibrated: torch.Tensor  # (n, d) after FDS calibration (== features without FDS)
    scaled: torch.Tensor      # (n,) head output in training units (standardised target)


class DIRModel(nn.Module):
    """A regression model with an optional FDS layer between encoder and head.

    ``forward`` returns the prediction (shape (n,), target units) and the *uncalibrated*
    features, so the training loop can feed FDS statistics from the same forward pass;
    ``details=True`` returns a :class:`ModelOutput` with the calibrated features and the
    head's output in training units as well. FDS is an identity in eval mode and without
    labels, so inference is just ``model(inputs)[0]``.

    Target scaling: the head predicts a standardised target ``(y - mean) / std``; the fixed
    buffers ``target_mean`` / ``target_std`` turn it back, ``pred = head(z) * std + mean``, so
    what the model returns (and what is logged and served) is in the user's units. Without
    scaling they are 0 and 1, and ``head(z) * 1 + 0`` is exactly ``head(z)``.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, fds: FDS | None = None,
                 target_offset: float = 0.0, *, target_mean: float = 0.0, target_std: float = 1.0):
        super().__init__()
        if not (math.isfinite(target_std) and target_std > 0):
            raise ValueError(f"'target_std' should be a positive finite number; got {target_std!r}.")
        self.encoder = encoder
        self.fds = fds
        self.head = nn.Linear(feature_dim, 1)
        # Starting the head at the training mean saves the first epochs on targets like ages.
        nn.init.constant_(self.head.bias, float(target_offset))
        self.target_offset = float(target_offset)
        self.register_buffer("target_mean", torch.tensor(float(target_mean)))
        self.register_buffer("target_std", torch.tensor(float(target_std)))

    def forward(self, inputs: Any, labels: torch.Tensor | None = None,
                epoch: int | None = None, bin_index: torch.Tensor | None = None, *,
                details: bool = False) -> tuple[torch.Tensor, ...]:
        features = self.encoder(**inputs) if isinstance(inputs, dict) else self.encoder(inputs)
        calibrated = features
        if self.fds is not None:
            calibrated = self.fds(features, labels, epoch, bin_index=bin_index)
        scaled = self.head(calibrated).squeeze(-1)
        pred = scaled * self.target_std + self.target_mean
        if details:
            return ModelOutput(pred, features, calibrated, scaled)
        return pred, features

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Weights saved before target scaling existed have no target_mean / target_std: they
        # predicted in the user's units directly, which is what this model's own (unscaled)
        # buffers say, so those are kept.
        for name in ("target_mean", "target_std"):
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def standardise(self, target: torch.Tensor) -> torch.Tensor:
        """A target in user units -> training units (exactly ``target`` without scaling)."""
        return (target - self.target_mean) / self.target_std

    def reset_head(self) -> None:
        """Re-initialise the regressor (RRT stage two) with PyTorch's default Linear init."""
        with torch.no_grad():
            fresh = nn.Linear(self.head.in_features, 1)
            self.head.weight.copy_(fresh.weight)
            self.head.bias.fill_(self.target_offset)


def model_kind(cfg: Config, info: ModelInfo) -> str:
    if cfg.model.kind != "auto":
        return cfg.model.kind
    return {"features": "mlp", "tokens": "bilstm", "image": "resnet"}[info.input_kind]


# What each encoder reads (ModelInfo.input_kind).
ENCODER_INPUTS = {"mlp": "features", "text_pair": "features", "bilstm": "tokens", "resnet": "image"}
_INPUT_WORDS = {"features": "a feature vector", "tokens": "token ids", "image": "images"}


def check_model_inputs(cfg: Config, info: ModelInfo) -> None:
    """Refuse an encoder that cannot read the data's inputs (a ResNet on a table), before any
    worker starts; ValueError naming both."""
    kind = model_kind(cfg, info)
    wanted = ENCODER_INPUTS.get(kind)
    if wanted is not None and info.input_kind != wanted:
        raise ValueError(
            f"'model.kind' is {kind!r}, which reads {_INPUT_WORDS[wanted]}, but the data source "
            f"gives {info.input_kind!r} inputs. Use model.kind=auto."
        )


def build_encoder(cfg: Config, info: ModelInfo) -> nn.Module:
    from raydir import encoders

    check_model_inputs(cfg, info)
    kind = model_kind(cfg, info)
    m = cfg.model
    if kind in ("mlp", "text_pair"):
        return encoders.MLPEncoder(int(info.num_features), list(m.hidden), m.feature_dim, m.dropout)
    if kind == "bilstm":
        embedding = encoders.load_glove_matrix()
        return encoders.BiLSTMPairEncoder(embedding, hidden=m.lstm_hidden, out_dim=m.feature_dim)
    if kind == "resnet":
        # Images of 128 px and more get the ImageNet stem (7x7 stride-2 conv + max pool).
        return encoders.ResNetEncoder(width=m.resnet_width, blocks=list(m.resnet_blocks),
                                      out_dim=m.feature_dim,
                                      large_input=cfg.data.image.size >= 128)
    raise ValueError(f"unknown model.kind {kind!r}")  # config validation makes this unreachable


def build_model(cfg: Config, info: ModelInfo) -> DIRModel:
    """The model for a config and ``PreparedData.model_info()``."""
    encoder = build_encoder(cfg, info)
    fds = None
    if cfg.fds.enabled:
        f = cfg.fds
        fds = FDS(cfg.model.feature_dim, info.bins,
                  kernel=f.kernel, ks=f.ks, sigma=f.sigma, momentum=f.momentum,
                  start_update=f.start_update, start_smooth=f.start_smooth,
                  clamp=(f.clamp_min, f.clamp_max), covariance=f.covariance)
    if info.target_scale == "standard":  # the head predicts (y - mean) / std
        return DIRModel(encoder, cfg.model.feature_dim, fds, target_offset=0.0,
                        target_mean=info.target_mean, target_std=info.target_std)
    return DIRModel(encoder, cfg.model.feature_dim, fds, target_offset=info.target_offset)
