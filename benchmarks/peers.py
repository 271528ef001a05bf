"""Peer packages made runnable here, shared by the benchmarks and the tests that compare with them."""

from __future__ import annotations

import sys


def smogn_with_numpy2_shim():
    """smogn 0.1.2 calls np.quantile(interpolation=) (gone in numpy 2.4) and int()/float() on
    1-element arrays (an error in numpy 2); give its modules a numpy that tolerates both."""
    import numpy as np
    import smogn  # noqa: F401

    class _Random:
        def __getattr__(self, name):
            return getattr(np.random, name)

        @staticmethod
        def choice(*args, size=None, **kw):
            out = np.random.choice(*args, size=size, **kw)
            return out.reshape(()) if size == 1 else out

        @staticmethod
        def normal(*args, size=None, **kw):
            out = np.random.normal(*args, size=size, **kw)
            return out.reshape(()) if size == 1 else out

    class _Numpy:
        random = _Random()

        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def quantile(a, q, interpolation=None, **kw):
            return np.quantile(a, q, method=interpolation or "linear", **kw)

    for module in ("box_plot_stats", "over_sampling", "smoter", "phi", "phi_ctrl_pts",
                   "dist_metrics"):
        if f"smogn.{module}" in sys.modules:
            sys.modules[f"smogn.{module}"].np = _Numpy()
    return sys.modules["smogn"]
