"""raydir: Deep Imbalanced Regression (LDS, FDS, Focal-R, RRT, SMOTER/SMOGN) on Ray and MLflow."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public API -> defining module. Imported lazily so that `raydir --help` and config checks do
# not pay for torch / Ray imports.
_EXPORTS = {
    "Bins": "raydir.bins",
    "ShotRegions": "raydir.bins",
    "kernel_window": "raydir.kernels",
    "effective_density": "raydir.lds",
    "lds_weights": "raydir.lds",
    "FDS": "raydir.fds",
    "weighted_mse_loss": "raydir.losses",
    "weighted_l1_loss": "raydir.losses",
    "weighted_huber_loss": "raydir.losses",
    "focal_l1_loss": "raydir.losses",
    "focal_mse_loss": "raydir.losses",
    "shot_metrics": "raydir.metrics",
    "SMOTER": "raydir.resample",
    "SMOGN": "raydir.resample",
    "Config": "raydir.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'raydir' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
