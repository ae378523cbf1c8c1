"""Per-galaxy summaries of posterior draws: percentiles of the 12 parameters and of derived
properties (surviving stellar mass, SFR over 100 Myr and 1 Gyr, mass-weighted metallicity and
age)."""
from __future__ import annotations

import numpy as np

from ..sed.params import PARAM_NAMES
from .sampling import Samples

__all__ = ["DERIVED", "derived_samples", "nanpercentile_rows", "summarize"]


def nanpercentile_rows(a, qs):
    """``np.nanpercentile(a, qs, axis=1)`` (linear interpolation) for a (m, n, p), vectorised
    (numpy's falls back to a Python loop over rows when NaNs are present)."""
    a = np.sort(np.asarray(a, np.float64), axis=1)  # NaN last
    k = np.isfinite(a).sum(1)  # (m, p)
    out = []
    for q in qs:
        pos = (k - 1) * (q / 100.0)
        i0 = np.clip(np.floor(pos).astype(np.int64), 0, None)
        i1 = np.clip(np.ceil(pos).astype(np.int64), 0, None)
        v0 = np.take_along_axis(a, i0[:, None, :], 1)[:, 0]
        v1 = np.take_along_axis(a, i1[:, None, :], 1)[:, 0]
        t = pos - np.floor(pos)
        v = np.where(t >= 0.5, v1 - (v1 - v0) * (1 - t), v0 + (v1 - v0) * t)
        out.append(np.where(k > 0, v, np.nan))
    return np.stack(out) if out else np.zeros((0,) + a.shape[:1] + a.shape[2:])


_FILL_THETA = np.array([10.0, 1, 0, 0, 0, 0, 1.0, 1e-3, 1e-3, 0, 0, 0])


DERIVED = ("logmstar_surviving", "log_sfr_100myr", "log_sfr_1gyr", "log_z_mw", "t_mw")


def derived_samples(model, theta, z, n_derived: int = 500):
    """Derived properties of posterior draws: theta (m, n, 12), z (m,) -> dict name -> (m, k)."""
    theta = np.asarray(theta)
    k = min(n_derived, theta.shape[1])
    th = theta[:, :k]
    good = np.isfinite(th).all(-1)
    th_safe = np.where(good[..., None], th, _FILL_THETA)  # NaN rows: evaluated, then masked
    zz = np.broadcast_to(np.asarray(z, float)[:, None], th.shape[:2])
    d = model.derived(th_safe, zz)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "logmstar_surviving": np.asarray(d.logmstar_surviving, float),
            "log_sfr_100myr": np.log10(np.asarray(d.sfr_100myr, float)),
            "log_sfr_1gyr": np.log10(np.asarray(d.sfr_1gyr, float)),
            "log_z_mw": np.log10(np.asarray(d.z_mw, float)),
            "t_mw": np.asarray(d.t_mw, float),
        }
    return {k_: np.where(good, v, np.nan) for k_, v in out.items()}


def summarize(samples: Samples, *, model=None, z=None, n_derived: int = 500):
    """astropy Table: per-galaxy median / 16 / 84 % of the 12 parameters (and derived properties
    if ``model`` and ``z`` are given), acceptance, n_accepted, low_acceptance and ood flags."""
    from astropy.table import Table

    t = Table()
    th = samples.theta
    with np.errstate(all="ignore"):
        q = np.nanpercentile(th, [16, 50, 84], axis=1) if th.size else np.zeros((3, 0, 12))
    for i, name in enumerate(PARAM_NAMES):
        t[f"{name}_p50"], t[f"{name}_p16"], t[f"{name}_p84"] = q[1][:, i], q[0][:, i], q[2][:, i]
    if model is not None and z is not None:
        der = derived_samples(model, th, z, n_derived)
        for name, v in der.items():
            with np.errstate(all="ignore"):
                qq = np.nanpercentile(v, [16, 50, 84], axis=1)
            t[f"{name}_p50"], t[f"{name}_p16"], t[f"{name}_p84"] = qq[1], qq[0], qq[2]
    t["acceptance"] = samples.acceptance
    t["n_accepted"] = samples.n_accepted
    t["low_acceptance"] = samples.low_acceptance
    t["ood"] = samples.ood
    return t
