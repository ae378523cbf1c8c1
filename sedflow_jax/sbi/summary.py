"""Per-galaxy summaries of posterior draws: percentiles of the 12 parameters and of derived
properties (surviving stellar mass, SFR over 100 Myr and 1 Gyr, mass-weighted metallicity and
age)."""
from __future__ import annotations

import numpy as np

from ..sed.params import PARAM_NAMES
from .sampling import Samples

__all__ = ["DERIVED", "derived_samples", "nanpercentile_rows", "summary_columns", "summarize"]


def nanpercentile_rows(a, qs):
    """``np.nanpercentile(a, qs, axis=1)`` (linear interpolation) for a (m, n, p), vectorised
    (numpy's falls back to a Python loop over rows when NaNs are present)."""
    a = np.asarray(a)
    if a.dtype.kind != "f":
        a = a.astype(np.float64)
    # sorted along a contiguous last axis, in the input's precision (NaN last); the
    # interpolation below is float64
    a = np.ascontiguousarray(np.moveaxis(a, 1, -1))  # (m, p, n), a copy
    a.sort(axis=-1)
    k = np.isfinite(a).sum(-1)  # (m, p)
    out = []
    for q in qs:
        pos = (k - 1) * (q / 100.0)
        i0 = np.clip(np.floor(pos).astype(np.int64), 0, None)
        i1 = np.clip(np.ceil(pos).astype(np.int64), 0, None)
        v0 = np.take_along_axis(a, i0[..., None], -1)[..., 0].astype(np.float64)
        v1 = np.take_along_axis(a, i1[..., None], -1)[..., 0].astype(np.float64)
        t = pos - np.floor(pos)
        v = np.where(t >= 0.5, v1 - (v1 - v0) * (1 - t), v0 + (v1 - v0) * t)
        out.append(np.where(k > 0, v, np.nan))
    return np.stack(out) if out else np.zeros((0,) + a.shape[:2])


_FILL_THETA = np.array([10.0, 1, 0, 0, 0, 0, 1.0, 1e-3, 1e-3, 0, 0, 0])


DERIVED = ("logmstar_surviving", "log_sfr_100myr", "log_sfr_1gyr", "log_z_mw", "t_mw")


def derived_samples(model, theta, z, n_derived: int = 500, *, max_draws: int = 65536):
    """Derived properties of posterior draws: theta (m, n, 12), z (m,) -> dict name -> (m, k),
    k = min(n_derived, n). Evaluated in groups of galaxies holding at most ``max_draws`` draws
    (memory: rows x draws, never rows alone); a group shorter than that is padded only to the
    next power of two. NaN draws, and galaxies with z outside the model's (0, z_max], give NaN."""
    theta = np.asarray(theta)
    m = theta.shape[0]
    k = max(0, min(int(n_derived), theta.shape[1]))
    out = {name: np.full((m, k), np.nan) for name in DERIVED}
    if m == 0 or k == 0:
        return out
    z = np.asarray(z, float).reshape(m)
    z_max = float(model.config.z_max)
    with np.errstate(invalid="ignore"):
        z_ok = np.isfinite(z) & (z > 0) & (z <= z_max)
    th = theta[:, :k]
    good = np.isfinite(th).all(-1) & z_ok[:, None]
    th_safe = np.where(good[..., None], th, _FILL_THETA)  # NaN rows: evaluated, then masked
    z_safe = np.where(z_ok, z, 0.5 * z_max)
    group = min(max(1, int(max_draws) // k), 1 << max(0, (m - 1).bit_length()))
    for s in range(0, m, group):
        e = min(m, s + group)
        tg = np.concatenate([th_safe[s:e], np.broadcast_to(_FILL_THETA, (group - (e - s), k, 12))])
        zg = np.concatenate([z_safe[s:e], np.full(group - (e - s), 0.5 * z_max)])
        d = _derived_values(model, tg, zg)
        for name, v in d.items():
            out[name][s:e] = np.where(good[s:e], v[: e - s], np.nan)
    return out


def _derived_values(model, theta, z) -> dict:
    d = model.derived_draws(theta, z)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "logmstar_surviving": np.asarray(d.logmstar_surviving, float),
            "log_sfr_100myr": np.log10(np.asarray(d.sfr_100myr, float)),
            "log_sfr_1gyr": np.log10(np.asarray(d.sfr_1gyr, float)),
            "log_z_mw": np.log10(np.asarray(d.z_mw, float)),
            "t_mw": np.asarray(d.t_mw, float),
        }


def summary_columns(samples: Samples, *, model=None, z=None, n_derived: int = 500,
                    max_draws: int = 65536) -> dict:
    """The per-galaxy summary columns of ``samples`` (m galaxies), in output order:
    ``<param>_p50/_p16/_p84`` of the 12 parameters, the same of the derived properties (with
    ``model`` and ``z``; see :func:`derived_samples`), ``acceptance``, ``n_accepted``,
    ``low_acceptance``, ``ood``. The one summary of every inference path."""
    cols = {}
    th = np.asarray(samples.theta)
    m = th.shape[0]
    with np.errstate(all="ignore"):
        q = nanpercentile_rows(th, [16, 50, 84]) if m else np.zeros((3, 0, len(PARAM_NAMES)))
    for i, name in enumerate(PARAM_NAMES):
        cols[f"{name}_p50"], cols[f"{name}_p16"], cols[f"{name}_p84"] = q[1][:, i], q[0][:, i], \
            q[2][:, i]
    if model is not None and z is not None:
        der = derived_samples(model, th, z, n_derived, max_draws=max_draws)
        for name in DERIVED:
            with np.errstate(all="ignore"):
                qq = nanpercentile_rows(der[name][..., None], [16, 50, 84])[..., 0] if m \
                    else np.zeros((3, 0))
            cols[f"{name}_p50"], cols[f"{name}_p16"], cols[f"{name}_p84"] = qq[1], qq[0], qq[2]
    cols["acceptance"] = np.asarray(samples.acceptance, np.float64)
    cols["n_accepted"] = np.asarray(samples.n_accepted, np.int64)
    cols["low_acceptance"] = np.asarray(samples.low_acceptance, bool)
    cols["ood"] = np.asarray(samples.ood, bool)
    return cols


def summarize(samples: Samples, *, model=None, z=None, n_derived: int = 500,
              max_draws: int = 65536):
    """astropy Table of :func:`summary_columns`: per-galaxy median / 16 / 84 % of the 12
    parameters (and derived properties if ``model`` and ``z`` are given), acceptance,
    n_accepted, low_acceptance and ood flags."""
    from astropy.table import Table

    return Table(summary_columns(samples, model=model, z=z, n_derived=n_derived,
                                 max_draws=max_draws))
