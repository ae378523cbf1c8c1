"""Convergence diagnostics (Vehtari et al. 2021: rank-normalised split R-hat, bulk / tail ESS),
and conservative versions for ensemble samplers, whose walkers are not independent chains."""
from __future__ import annotations

import numpy as np
from numpyro.diagnostics import effective_sample_size, gelman_rubin
from scipy.special import ndtri
from scipy.stats import rankdata

__all__ = ["split_rhat", "ess_bulk", "ess_tail", "ensemble_convergence", "convergence"]


def _split(x):
    """(chains, draws, ...) -> (2 chains, draws // 2, ...)."""
    n = x.shape[1] // 2
    return np.concatenate([x[:, :n], x[:, x.shape[1] - n:]], axis=0)


def _rank_normal(x):
    """Rank-normalise over all chains and draws, per trailing coordinate."""
    flat = x.reshape(-1, *x.shape[2:])
    r = rankdata(flat, axis=0, method="average")
    z = ndtri((r - 3.0 / 8.0) / (flat.shape[0] + 0.25))
    return z.reshape(x.shape)


def _rhat_plain(x):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(gelman_rubin(x), np.float64)


def _ess_plain(x):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(effective_sample_size(x), np.float64)


def _const(x):
    return np.all(x == x[:1, :1], axis=(0, 1))


def split_rhat(samples) -> np.ndarray:
    """Rank-normalised split R-hat, max of bulk and folded (tail) versions.

    samples : (chains, draws, d) -> (d,). NaN if a coordinate is constant or non-finite.
    """
    x = np.asarray(samples, np.float64)
    if x.shape[1] < 4:
        return np.full(x.shape[2:], np.nan)
    xs = _split(x)
    bulk = _rhat_plain(_rank_normal(xs))
    fold = np.abs(xs - np.median(xs.reshape(-1, *xs.shape[2:]), axis=0))
    tail = _rhat_plain(_rank_normal(fold))
    out = np.maximum(bulk, tail)
    return np.where(_const(x) | ~np.all(np.isfinite(x), axis=(0, 1)), np.nan, out)


def ess_bulk(samples) -> np.ndarray:
    """Bulk effective sample size (rank-normalised split chains). (chains, draws, d) -> (d,)."""
    x = np.asarray(samples, np.float64)
    if x.shape[1] < 4:
        return np.full(x.shape[2:], np.nan)
    out = _ess_plain(_rank_normal(_split(x)))
    return np.where(_const(x), np.nan, out)


def ess_tail(samples) -> np.ndarray:
    """Tail ESS: min over the 5 % and 95 % quantile indicators. (chains, draws, d) -> (d,)."""
    x = np.asarray(samples, np.float64)
    if x.shape[1] < 4:
        return np.full(x.shape[2:], np.nan)
    xs = _split(x)
    flat = xs.reshape(-1, *xs.shape[2:])
    out = []
    for q in (0.05, 0.95):
        ind = (xs <= np.quantile(flat, q, axis=0)).astype(np.float64)
        e = _ess_plain(ind)
        out.append(np.where(_const(ind), np.nan, e))
    return np.where(_const(x), np.nan, np.fmin(out[0], out[1]))


def _ensemble_ess(series, n_walkers):
    """ESS of walker-averaged statistics: series (walkers, draws, d) of a per-draw statistic."""
    m = series.mean(0)  # (draws, d): the ensemble mean at each step
    n = m.shape[0]
    tau_ess = _ess_plain(m[None])  # = draws / tau of the mean chain
    var_pool = series.reshape(-1, series.shape[-1]).var(0)
    var_mean = m.var(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        gain = np.minimum(n_walkers, var_pool / var_mean)
    out = np.minimum(tau_ess, n) * gain
    return np.where(np.isfinite(out), out, np.nan)


def ensemble_convergence(samples) -> dict:
    """Conservative diagnostics for ensemble samplers (walkers are not independent chains).

    samples (walkers, draws, d). The walkers of an ensemble share slow collective modes (the
    ensemble drifts as a whole) that per-walker autocorrelations hardly see, so treating walkers
    as chains gives wildly optimistic ESS. Here:
    ESS = (draws / tau_m) x min(walkers, var_pooled / var(m)), with m_t the walker average at
    step t (of the rank-normalised draws for the bulk, of the 5 % / 95 % quantile indicators for
    the tail) and tau_m its integrated autocorrelation time -- the ESS of the ensemble-mean
    estimator; R-hat = max(rank-normalised split R-hat with walkers as chains, R-hat between
    4 consecutive segments of the run with all walkers pooled), which sees a common drift.
    """
    x = np.asarray(samples, np.float64)
    w, n = x.shape[:2]
    if n < 8:
        nan = np.full(x.shape[2:], np.nan)
        return dict(rhat=nan, ess_bulk=nan, ess_tail=nan.copy())
    z = _rank_normal(x)
    eb = _ensemble_ess(z, w)
    flat = x.reshape(-1, *x.shape[2:])
    tails = []
    for q in (0.05, 0.95):
        ind = (x <= np.quantile(flat, q, axis=0)).astype(np.float64)
        tails.append(np.where(_const(ind), np.nan, _ensemble_ess(ind, w)))
    et = np.fmin(tails[0], tails[1])
    seg = n // 4
    segs = np.stack([x[:, i * seg:(i + 1) * seg].reshape(-1, *x.shape[2:]) for i in range(4)])
    r_seg = np.maximum(_rhat_plain(_rank_normal(segs)), 1.0)
    rhat = np.fmax(split_rhat(x), r_seg)
    const = _const(x)
    return dict(rhat=np.where(const, np.nan, rhat), ess_bulk=np.where(const, np.nan, eb),
                ess_tail=np.where(const, np.nan, et))


def convergence(samples, *, ensemble: bool = False) -> dict:
    """``{'rhat', 'ess_bulk', 'ess_tail'}`` each (d,) for samples (chains, draws, d).

    ``ensemble=True`` (walkers of ESS / AIES): :func:`ensemble_convergence`; otherwise the
    rank-normalised split R-hat and bulk / tail ESS of independent chains (Vehtari et al. 2021).
    """
    if ensemble:
        return ensemble_convergence(samples)
    return dict(rhat=split_rhat(samples), ess_bulk=ess_bulk(samples), ess_tail=ess_tail(samples))
