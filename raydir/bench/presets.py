"""Named methods as config overrides, combinable with ``+`` (``lds_fds+ranksim``).

A preset is a mapping of dotted config keys to values (the names of ``Config.to_flat_dict``)
applied over a suite's base config. A few depend on that base (Focal-R follows the base
loss: focal_mse after mse, focal_l1 otherwise), so a preset is resolved against the base.

Presets of methods whose config keys this installation does not know yet (a section or a
``loss.name`` value the config rejects) are not offered: :func:`available_methods` tries each
preset on the base config and keeps those the config accepts, with the reason for the others.
A combination joins the overrides of its parts left to right; two parts that set the same key
to different values are refused (``lds+inv`` would silently be one of them).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from raydir.config import Config

Overrides = dict[str, Any]

# The data, bins and shots sections define the benchmark: a method must not change them
# (resample is the one data-side section a method may set; its trials get their own data).
FIXED_SECTIONS = ("data.", "bins.", "shots.", "tracking.", "tune.")


def _focal(base: Config) -> Overrides:
    mse = base.loss.name in ("mse", "focal_mse")
    return {"loss.name": "focal_mse" if mse else "focal_l1"}


PRESETS: dict[str, Overrides | Callable[[Config], Overrides]] = {
    # the DIR paper (Yang et al., ICML 2021) and its baselines
    "vanilla": {},
    "inv": {"reweight.scheme": "inverse"},
    "sqinv": {"reweight.scheme": "sqrt_inv"},
    "lds": {"reweight.scheme": "sqrt_inv", "reweight.lds": True},
    "inv_lds": {"reweight.scheme": "inverse", "reweight.lds": True},
    "fds": {"fds.enabled": True},
    "lds_fds": {"reweight.scheme": "sqrt_inv", "reweight.lds": True, "fds.enabled": True},
    "inv_lds_fds": {"reweight.scheme": "inverse", "reweight.lds": True, "fds.enabled": True},
    "focal": _focal,
    "rrt": {"rrt.enabled": True, "rrt.lds": False, "rrt.scheme": "inverse"},
    "rrt_lds": {"rrt.enabled": True, "rrt.lds": True, "rrt.scheme": "inverse"},
    "smoter": {"resample.method": "smoter"},
    "smogn": {"resample.method": "smogn"},
    # follow-up methods, as objective terms / weight schemes of their own config keys
    "bmc": {"loss.name": "bmc"},                 # Balanced MSE, batch Monte-Carlo (Ren et al. 2022)
    "gai": {"loss.name": "gai"},                 # Balanced MSE, GMM analytic integration
    "bni": {"loss.name": "bni"},                 # Balanced MSE, bin-based numerical integration
    # RankSim (Gong et al. 2022). The age READMEs' gamma of 100 balances an L1 loss in years;
    # against a loss on standardised targets (data.target_scale) 100 and 1 swamp the task
    # (synthetic suite, test MAE 3.5 -> 17.6 and 9.8); 0.01 trains well there. Tune it per data.
    "ranksim": {"ranksim.weight": 0.01},
    "conr": {"conr.weight": 4.0},                # ConR (Keramati et al. 2024), beta of the AgeDB README
    "srl": {"srl.weight": 1.0},                  # SRL (Dong et al. 2025)
    "dense": {"reweight.scheme": "dense"},       # DenseWeight (Steininger et al. 2021)
}


def method_parts(method: str) -> list[str]:
    return [p.strip() for p in str(method).split("+")]


def preset_overrides(method: str, base: Config) -> Overrides:
    """The config overrides of ``method`` (a preset name or names joined by ``+``) over
    ``base``. Raises ValueError for an unknown name or two parts in conflict."""
    out: Overrides = {}
    origin: dict[str, str] = {}
    for part in method_parts(method):
        if part not in PRESETS:
            raise ValueError(f"unknown method {part!r} in {method!r}; valid methods: "
                             f"{sorted(PRESETS)} (combine with '+', e.g. lds_fds+ranksim).")
        spec = PRESETS[part]
        values = spec(base) if callable(spec) else dict(spec)
        for key, value in values.items():
            if key in out and out[key] != value:
                raise ValueError(f"method {method!r}: {origin[key]!r} sets {key}={out[key]!r} but "
                                 f"{part!r} sets {key}={value!r}; combine methods that set "
                                 f"different keys.")
            out[key], origin[key] = value, part
    return out


def method_config(method: str, base: Config, extra: Mapping[str, Any] | None = None) -> Config:
    """``base`` with the method's overrides (then ``extra``, e.g. the seed) applied and
    validated. ValueError when the config does not accept them."""
    over = preset_overrides(method, base)
    fixed = [k for k in over if k.startswith(FIXED_SECTIONS)]
    assert not fixed, f"preset {method!r} changes benchmark-defining keys {fixed}"
    return base.with_overrides({**over, **(extra or {})})


def available_methods(base: Config) -> dict[str, str | None]:
    """Every preset name -> None when ``base`` accepts it, else the config's reason."""
    out: dict[str, str | None] = {}
    for name in PRESETS:
        try:
            method_config(name, base)
            out[name] = None
        except ValueError as exc:
            out[name] = str(exc)
    return out


def check_methods(methods: list[str], base: Config, suite: str = "") -> None:
    """Refuse, before any work, a method that is unknown, in conflict, or not accepted by
    this suite's config; the message lists the methods that are available."""
    if not methods:
        raise ValueError("no method given: pass --methods, e.g. --methods vanilla lds fds lds_fds.")
    dupes = sorted({m for m in methods if methods.count(m) > 1})
    if dupes:
        raise ValueError(f"--methods lists {dupes} more than once; give each method once.")
    avail = available_methods(base)
    ok = [n for n, why in avail.items() if why is None]
    where = f" on suite {suite!r}" if suite else ""
    for method in methods:
        for part in method_parts(method):
            if part not in PRESETS:
                raise ValueError(f"unknown method {part!r}; methods available{where}: {ok} "
                                 f"(combine with '+', e.g. lds_fds+ranksim).")
            if avail[part] is not None:
                raise ValueError(f"method {part!r} is not available{where}: the config does not "
                                 f"accept its settings {preset_overrides(part, base)} "
                                 f"({avail[part]}). Methods available{where}: {ok}.")
        try:
            method_config(method, base)
        except ValueError as exc:
            raise ValueError(f"method {method!r}{where}: {exc}") from None


__all__ = ["PRESETS", "preset_overrides", "method_config", "available_methods", "check_methods"]
