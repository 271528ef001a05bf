"""Data sources and the Ray Data pipeline.

``prepare(cfg)`` turns a config into prepared train / val / test Ray Datasets (inputs,
``target``, ``bin``, ``weight``); sources live in their own modules and all return a
:class:`~raydir.data.base.SourceData`. Imported lazily so that config checks and the CLI's
``--help`` do not pay for Ray.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SourceData": "raydir.data.base",
    "PreparedData": "raydir.data.pipeline",
    "prepare": "raydir.data.pipeline",
    "format_prepare_report": "raydir.data.pipeline",
    "histogram": "raydir.data.pipeline",
    "split_stats": "raydir.data.pipeline",
    "load_source": "raydir.data.pipeline",
    "resolve_bins": "raydir.data.base",
    "FeatureEncoder": "raydir.data.base",
    "make_synthetic": "raydir.data.synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'raydir.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
