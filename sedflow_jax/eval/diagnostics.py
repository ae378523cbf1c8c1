"""Calibration and comparison diagnostics of posterior samples, and their plots.

Generic: arrays in, numbers / figures out; nothing here knows about galaxies (except
:func:`plot_sed_fit`, which takes any object with the SEDModel interface).

Shapes: ``true`` (n, d) -- the parameters the data were simulated from; ``samples`` (n, m, d) --
m posterior draws for each of the n simulations.

* :func:`sbc_ranks` / :func:`sbc_uniformity` -- simulation-based calibration (Talts et al. 2018):
  the rank of the truth among the draws is uniform on {0..m} for a calibrated posterior;
  tested per parameter with a chi-square test on binned ranks and a KS test.
* :func:`pp_values` / :func:`coverage` -- expected vs empirical coverage of central credible
  intervals (the p-p plot of SEDflow's validation).
* :func:`tarp` -- Lemos et al. (2023) "TARP" expected coverage with random reference points: a
  joint (all parameters at once) coverage test.
* :func:`c2st` -- classifier two-sample test: k-fold accuracy of a small classifier (MLP, or
  logistic regression on quadratic features) telling two sample sets apart; 0.5 means
  indistinguishable.
* plots: :func:`plot_sbc`, :func:`plot_coverage`, :func:`plot_corner`, :func:`plot_sed_fit`.
"""
from __future__ import annotations

import functools
import math
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..sed.units import AB_FNU_CGS, C_ANGSTROM_S
from ..util import as_key

__all__ = [
    "sbc_ranks",
    "sbc_uniformity",
    "pp_values",
    "coverage",
    "tarp",
    "c2st",
    "plot_sbc",
    "plot_coverage",
    "plot_corner",
    "plot_sed_fit",
    "DEFAULT_LEVELS",
]

DEFAULT_LEVELS = np.linspace(0.05, 0.95, 19)


def _check_true_samples(true, samples):
    true = np.asarray(true, np.float64)
    samples = np.asarray(samples, np.float64)
    if true.ndim == 1:
        true = true[:, None]
    if samples.ndim == 2:
        samples = samples[..., None]
    if samples.ndim != 3 or true.ndim != 2 or samples.shape[0] != true.shape[0] \
            or samples.shape[2] != true.shape[1]:
        raise ValueError(f"need true (n, d) and samples (n, m, d); got {true.shape}, {samples.shape}")
    return true, samples


def _finite_rows(v) -> np.ndarray:
    """(n, d) float64 (a 1-D input is one column) without the rows holding NaN or inf."""
    v = np.asarray(v, np.float64)
    if v.ndim == 1:
        v = v[:, None]
    return v[np.all(np.isfinite(v), axis=1)]


# =============================================================================================
# SBC
# =============================================================================================
def sbc_ranks(true, samples, *, seed: Optional[int] = 0) -> np.ndarray:
    """Rank of each true value among its posterior draws.

    true (n, d), samples (n, m, d) -> ranks (n, d) int in {0, ..., m}: the number of draws
    below the truth. Ties (discrete draws) are broken at random with ``seed`` (None: counted
    as below-only). NaN draws are ignored by counting them neither below nor tied (a row with
    NaN draws then has a smaller effective m).
    """
    true, samples = _check_true_samples(true, samples)
    below = np.sum(samples < true[:, None, :], axis=1)
    if seed is not None:
        ties = np.sum(samples == true[:, None, :], axis=1)
        if np.any(ties):
            rng = np.random.default_rng(seed)
            # uniform position of the truth among its tied draws
            below = below + np.floor(rng.uniform(size=ties.shape) * (ties + 1)).astype(int)
    return below.astype(int)


def sbc_uniformity(ranks, m: int, n_bins: Optional[int] = None, *, seed: int = 0) -> dict:
    """Per-parameter tests that ranks are uniform on {0, ..., m}.

    ranks (n, d); m = number of draws per simulation; n_bins : bins for the chi-square test
    (default: ``min(20, m + 1)`` reduced until the expected count per bin is >= 5).
    Bins group consecutive rank values as evenly as possible; the expected count of each bin is
    exact (its number of rank values / (m + 1)).
    Returns a dict of (d,) arrays: ``chi2``, ``chi2_pvalue``, ``ks``, ``ks_pvalue`` (KS on
    ``(rank + U(0,1)) / (m + 1)``, which is exactly U(0, 1) under calibration; jitter seeded), and
    ``n_bins``.
    """
    from scipy import stats

    r = np.asarray(ranks)
    if r.ndim == 1:
        r = r[:, None]
    n, d = r.shape
    if np.any(r < 0) or np.any(r > m):
        raise ValueError(f"ranks must lie in [0, {m}]")
    if n_bins is None:
        n_bins = min(20, m + 1)
        while n_bins > 2 and n / n_bins < 5:
            n_bins -= 1
    n_bins = int(max(2, min(n_bins, m + 1)))
    edges = np.round(np.linspace(0, m + 1, n_bins + 1)).astype(int)  # rank-value edges
    width = np.diff(edges)
    expected = n * width / (m + 1)
    chi2 = np.zeros(d)
    pch = np.zeros(d)
    ks = np.zeros(d)
    pks = np.zeros(d)
    rng = np.random.default_rng(seed)
    for j in range(d):
        counts = np.bincount(np.searchsorted(edges, r[:, j], side="right") - 1, minlength=n_bins)
        chi2[j] = np.sum((counts - expected) ** 2 / expected)
        pch[j] = stats.chi2.sf(chi2[j], n_bins - 1)
        u = (r[:, j] + rng.uniform(size=n)) / (m + 1)
        res = stats.kstest(u, "uniform")
        ks[j], pks[j] = res.statistic, res.pvalue
    return dict(chi2=chi2, chi2_pvalue=pch, ks=ks, ks_pvalue=pks, n_bins=n_bins)


# =============================================================================================
# coverage
# =============================================================================================
def pp_values(true, samples) -> np.ndarray:
    """Posterior CDF at the truth, (n, d): (rank + 1/2) / (m + 1) (uniform if calibrated)."""
    true, samples = _check_true_samples(true, samples)
    m = samples.shape[1]
    return (sbc_ranks(true, samples, seed=None) + 0.5) / (m + 1)


def coverage(true, samples, levels=None) -> tuple[np.ndarray, np.ndarray]:
    """Empirical coverage of central credible intervals, per parameter.

    true (n, d), samples (n, m, d), levels (k,) in (0, 1) (default 0.05 ... 0.95) ->
    ``(levels (k,), coverage (k, d))``: the fraction of simulations whose truth lies inside the
    central ``level`` interval ``[q_{(1-l)/2}, q_{(1+l)/2}]`` of its draws (computed from the
    truth's posterior CDF value :func:`pp_values`). Calibrated: coverage ~ level;
    over-confident posteriors under-cover (coverage < level).
    """
    levels = DEFAULT_LEVELS if levels is None else np.atleast_1d(np.asarray(levels, np.float64))
    if np.any((levels <= 0) | (levels >= 1)):
        raise ValueError("levels must lie in (0, 1)")
    u = pp_values(true, samples)  # (n, d)
    dist = np.abs(2.0 * u - 1.0)  # inside the central l-interval <=> |2u - 1| <= l
    cov = np.mean(dist[None, :, :] <= levels[:, None, None], axis=1)
    return levels, cov


def tarp(true, samples, levels=None, *, seed: int = 0, references=None,
         normalize: bool = True) -> dict:
    """TARP expected coverage (Lemos et al. 2023), a joint test over all parameters.

    For each simulation a reference point is drawn uniformly in the bounding box of ``true``
    (or taken from ``references`` (n, d)); f_i = fraction of draws closer to the reference than
    the truth is. ECP(l) = mean_i [f_i < l]; a calibrated posterior gives ECP(l) = l.
    Coordinates are standardised by the spread of ``true`` first (``normalize``).
    Returns ``{'levels' (k,), 'ecp' (k,), 'f' (n,), 'max_deviation', 'ks_pvalue'}``
    (KS test of f against U(0, 1)).
    """
    from scipy import stats

    true, samples = _check_true_samples(true, samples)
    levels = np.linspace(0.0, 1.0, 21) if levels is None else np.asarray(levels, np.float64)
    if normalize:
        mu = true.mean(0)
        sd = true.std(0)
        sd = np.where(sd > 0, sd, 1.0)
        true = (true - mu) / sd
        samples = (samples - mu) / sd
    rng = np.random.default_rng(seed)
    if references is None:
        lo, hi = true.min(0), true.max(0)
        references = lo + (hi - lo) * rng.uniform(size=true.shape)
    else:
        references = np.asarray(references, np.float64)
        if normalize:
            references = (references - mu) / sd
    d_samp = np.linalg.norm(samples - references[:, None, :], axis=-1)  # (n, m)
    d_true = np.linalg.norm(true - references, axis=-1)  # (n,)
    f = np.mean(d_samp < d_true[:, None], axis=1)
    ecp = np.mean(f[None, :] < levels[:, None], axis=1)
    return dict(levels=levels, ecp=ecp, f=f, max_deviation=float(np.max(np.abs(ecp - levels))),
                ks_pvalue=float(stats.kstest(f, "uniform").pvalue))


# =============================================================================================
# C2ST
# =============================================================================================
def _quad_features(x):
    d = x.shape[-1]
    iu = np.triu_indices(d)
    return jnp.concatenate([x, (x[..., :, None] * x[..., None, :])[..., iu[0], iu[1]]], axis=-1)


def _init_mlp(key, sizes):
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, k = jax.random.split(key)
        params.append((jax.random.normal(k, (a, b)) * math.sqrt(2.0 / a), jnp.zeros(b)))
    return params


def _mlp(params, x):
    h = x
    for w, b in params[:-1]:
        h = jax.nn.gelu(h @ w + b)
    w, b = params[-1]
    return (h @ w + b)[..., 0]


@functools.lru_cache(maxsize=16)
def _c2st_trainer(classifier: str, d_in: int, hidden: int, n_layers: int, steps: int, lr: float,
                  weight_decay: float):
    import optax

    sizes = (d_in,) + (hidden,) * (n_layers if classifier == "mlp" else 0) + (1,)
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)

    def feats(x):
        return _quad_features(x) if classifier == "quadratic" else x

    def train_eval(key, x_tr, y_tr, x_te, y_te):
        # standardise features on the training fold
        f_tr, f_te = feats(x_tr), feats(x_te)
        mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
        f_tr, f_te = (f_tr - mu) / sd, (f_te - mu) / sd
        params = _init_mlp(key, (f_tr.shape[-1],) + sizes[1:])

        def loss(p):
            logit = _mlp(p, f_tr)
            return jnp.mean(optax.sigmoid_binary_cross_entropy(logit, y_tr))

        def body(carry, _):
            p, st = carry
            g = jax.grad(loss)(p)
            upd, st = tx.update(g, st, p)
            return (optax.apply_updates(p, upd), st), None

        (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
        pred = _mlp(p, f_te) > 0
        return jnp.mean(pred == (y_te > 0.5))

    return jax.jit(jax.vmap(train_eval))


def c2st(samples_a, samples_b, key=0, *, n_folds: int = 5, classifier: str = "mlp",
         hidden: int = 32, n_layers: int = 2, steps: int = 500, lr: float = 3e-3,
         weight_decay: float = 1e-4, max_samples: int = 5000, standardize: bool = True,
         return_folds: bool = False):
    """Classifier two-sample test: mean k-fold test accuracy of telling ``a`` from ``b``.

    samples_a (n_a, d), samples_b (n_b, d): both are subsampled (without replacement) to
    ``n = min(n_a, n_b, max_samples)`` rows so the classes are balanced; rows with NaN are
    dropped. classifier : ``'mlp'`` (``n_layers`` x ``hidden`` GELU units; wider nets overfit
    at these sample sizes without early stopping) or ``'quadratic'`` (logistic regression on
    [x, x_i x_j] -- optimal for two Gaussians). Full-batch AdamW for ``steps`` steps with a cosine
    learning-rate decay; the ``n_folds`` folds train in parallel (vmap).
    Returns the accuracy (0.5 = indistinguishable, 1 = disjoint), or ``(mean, per-fold)`` with
    ``return_folds``.
    """
    a, b = _finite_rows(samples_a), _finite_rows(samples_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sample sets differ in dimension: {a.shape} vs {b.shape}")
    if classifier not in ("mlp", "quadratic"):
        raise ValueError(f"classifier must be 'mlp' or 'quadratic', got {classifier!r}")
    if n_folds < 2:
        raise ValueError("n_folds must be >= 2")
    key = as_key(key)
    n = min(len(a), len(b), int(max_samples))
    n -= n % n_folds
    if n < 2 * n_folds:
        raise ValueError(f"too few samples for {n_folds}-fold C2ST (n = {n})")
    k_a, k_b, k_p, k_i = jax.random.split(key, 4)
    a = a[np.asarray(jax.random.permutation(k_a, len(a)))[:n]]
    b = b[np.asarray(jax.random.permutation(k_b, len(b)))[:n]]
    if standardize:
        both = np.concatenate([a, b])
        mu, sd = both.mean(0), both.std(0)
        sd = np.where(sd > 0, sd, 1.0)
        a, b = (a - mu) / sd, (b - mu) / sd
    x = np.concatenate([a, b]).astype(np.float32)
    y = np.concatenate([np.zeros(n), np.ones(n)]).astype(np.float32)
    perm = np.asarray(jax.random.permutation(k_p, 2 * n))
    x, y = x[perm], y[perm]
    folds = np.arange(2 * n) % n_folds
    fs = 2 * n // n_folds
    te = np.stack([np.flatnonzero(folds == k) for k in range(n_folds)])  # (k, fs)
    tr = np.stack([np.flatnonzero(folds != k) for k in range(n_folds)])  # (k, 2n - fs)
    d = x.shape[1]
    hidden = int(hidden)
    d_in = d + d * (d + 1) // 2 if classifier == "quadratic" else d
    fn = _c2st_trainer(classifier, d_in, hidden, int(n_layers), int(steps), float(lr),
                       float(weight_decay))
    keys = jax.random.split(k_i, n_folds)
    acc = np.asarray(fn(keys, jnp.asarray(x[tr]), jnp.asarray(y[tr]), jnp.asarray(x[te]),
                        jnp.asarray(y[te])), np.float64)
    del fs
    mean = float(acc.mean())
    return (mean, acc) if return_folds else mean


# =============================================================================================
# plots
# =============================================================================================
def _names(names, d, prefix="x"):
    if names is None:
        return [f"{prefix}{i}" for i in range(d)]
    names = list(names)
    if len(names) != d:
        raise ValueError(f"{len(names)} names for {d} parameters")
    return names


def _grid(d, size=2.4, max_cols=4):
    import matplotlib.pyplot as plt

    cols = min(d, max_cols)
    rows = -(-d // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.ravel()[d:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def _finish(fig, path):
    if path is not None:
        fig.savefig(str(path), dpi=120, bbox_inches="tight")
    return fig


def plot_sbc(ranks, names=None, path=None, *, m: Optional[int] = None,
             n_bins: Optional[int] = None, band: float = 0.99):
    """Histograms of SBC ranks (n, d) per parameter with the ``band`` (default 99 %) binomial
    interval of a uniform histogram shaded. ``m``: draws per simulation (default max rank).
    Returns the matplotlib Figure (saved to ``path`` if given)."""
    from scipy import stats

    r = np.asarray(ranks)
    if r.ndim == 1:
        r = r[:, None]
    n, d = r.shape
    m = int(r.max()) if m is None else int(m)
    u = sbc_uniformity(r, m, n_bins)
    nb = u["n_bins"]
    edges = np.round(np.linspace(0, m + 1, nb + 1)).astype(int)
    p = np.diff(edges) / (m + 1)
    lo = stats.binom.ppf((1 - band) / 2, n, p)
    hi = stats.binom.ppf((1 + band) / 2, n, p)
    fig, axes = _grid(d)
    for j, (ax, name) in enumerate(zip(axes, _names(names, d))):
        counts = np.bincount(np.searchsorted(edges, r[:, j], side="right") - 1, minlength=nb)
        ax.fill_between(edges, np.append(lo, lo[-1]), np.append(hi, hi[-1]), step="post",
                        color="0.85", label=f"{int(band * 100)}% uniform")
        ax.stairs(counts, edges, color="C0", lw=1.5)
        ax.axhline(n / nb, color="0.5", lw=0.8, ls="--")
        ax.set_title(f"{name}  (p={u['chi2_pvalue'][j]:.2g})", fontsize=9)
        ax.set_xlim(0, m + 1)
        ax.set_yticks([])
        ax.set_xlabel("rank", fontsize=8)
    fig.suptitle(f"SBC ranks (n={n}, m={m})", fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


def plot_coverage(levels, cov, names=None, path=None, *, n: Optional[int] = None,
                  band: float = 0.95, title: str = "coverage", ax=None):
    """Expected vs empirical coverage (p-p plot).

    levels (k,); cov (k, d) (as :func:`coverage` returns; one line per parameter), or a dict
    label -> (k,) / (k, d) (one line per label, e.g. flow vs MCMC, averaged over parameters
    when 2-D). ``n`` (number of simulations) adds the ``band`` binomial interval around the
    diagonal. Returns the Figure.
    """
    import matplotlib.pyplot as plt
    from scipy import stats

    levels = np.asarray(levels, np.float64)
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.2, 4.2))
    else:
        fig = ax.figure
    if n is not None:
        lo = stats.binom.ppf((1 - band) / 2, n, levels) / n
        hi = stats.binom.ppf((1 + band) / 2, n, levels) / n
        ax.fill_between(levels, lo, hi, color="0.88", label=f"{int(band * 100)}% (n={n})")
    ax.plot([0, 1], [0, 1], color="0.4", ls="--", lw=1)
    if isinstance(cov, Mapping):
        for label, c in cov.items():
            c = np.asarray(c, np.float64)
            ax.plot(levels, c if c.ndim == 1 else c.mean(1), lw=1.6, label=str(label))
    else:
        c = np.asarray(cov, np.float64)
        if c.ndim == 1:
            c = c[:, None]
        nm = _names(names, c.shape[1])
        cmap = plt.get_cmap("viridis")
        for j in range(c.shape[1]):
            ax.plot(levels, c[:, j], lw=1.2, color=cmap(j / max(1, c.shape[1] - 1)), label=nm[j])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("credibility level")
    ax.set_ylabel("empirical coverage")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, loc="upper left", ncol=2)
    fig.tight_layout()
    return _finish(fig, path)


def _hpd_levels(h, fracs):
    """Density thresholds enclosing the given probability fractions of a 2-D histogram."""
    flat = np.sort(h.ravel())[::-1]
    cum = np.cumsum(flat)
    cum /= cum[-1] if cum[-1] > 0 else 1.0
    out = []
    for f in fracs:
        i = min(np.searchsorted(cum, f), len(flat) - 1)
        out.append(flat[i])
    return out


def _corner_sets(sample_sets, max_points: int) -> dict:
    """label -> finite (n, d) float64 rows (at most ``max_points``, a fixed random subset)."""
    if not isinstance(sample_sets, Mapping):
        sample_sets = {"samples": sample_sets}
    sets = {}
    for k, v in sample_sets.items():
        v = _finite_rows(v)
        if len(v) > max_points:
            v = v[np.random.default_rng(0).choice(len(v), max_points, replace=False)]
        sets[k] = v
    d = next(iter(sets.values())).shape[1]
    if any(v.shape[1] != d for v in sets.values()):
        raise ValueError("all sample sets must have the same dimension")
    return sets


def _corner_ranges(sets: dict, tr) -> np.ndarray:
    """(d, 2): the central 99.5 % of all sets, widened to the truths, padded by 5 %."""
    allv = np.concatenate(list(sets.values()))
    lo = np.percentile(allv, 0.25, axis=0)
    hi = np.percentile(allv, 99.75, axis=0)
    if tr is not None:
        lo, hi = np.fmin(lo, tr), np.fmax(hi, tr)
    pad = 0.05 * np.where(hi > lo, hi - lo, 1.0)
    return np.stack([lo - pad, hi + pad], axis=1)


def _corner_contours(ax, xv, yv, xr, yr, color, *, bins, levels, smooth) -> None:
    """HPD contours of a lightly smoothed 2-D histogram of (xv, yv)."""
    from scipy.ndimage import gaussian_filter

    h, xe, ye = np.histogram2d(xv, yv, bins=bins, range=[xr, yr])
    if smooth:
        h = gaussian_filter(h, smooth)
    lv = sorted(set(_hpd_levels(h, sorted(levels, reverse=True))))
    lv = [x for x in lv if x > 0]
    if len(lv) >= 1 and h.max() > 0:
        xc, yc = 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1])
        try:
            ax.contour(xc, yc, h.T, levels=lv + [h.max() * 1.0001], colors=[color],
                       linewidths=1.0)
        except ValueError:  # degenerate levels
            pass


def _corner_truth(ax, tr, i: int, j: int) -> None:
    if i == j:
        ax.axvline(tr[i], color="k", lw=0.8)
    else:
        ax.axvline(tr[j], color="k", lw=0.8)
        ax.axhline(tr[i], color="k", lw=0.8)
        ax.plot(tr[j], tr[i], "s", color="k", ms=3)


def _corner_axes(ax, i: int, j: int, d: int, nm, ranges) -> None:
    """Limits, ticks and labels of panel (row i, column j)."""
    ax.set_xlim(ranges[j])
    if i != j:
        ax.set_ylim(ranges[i])
    if i == j:
        ax.set_yticks([])
    if i < d - 1:
        ax.set_xticklabels([])
    else:
        ax.set_xlabel(nm[j], fontsize=8)
    if j > 0 and i != j:
        ax.set_yticklabels([])
    elif i != j:
        ax.set_ylabel(nm[i], fontsize=8)
    ax.tick_params(labelsize=6)


def plot_corner(sample_sets, names=None, truths=None, path=None, *, bins: int = 40,
                levels: Sequence[float] = (0.68, 0.95), ranges=None, colors=None,
                max_points: int = 200_000, smooth: float = 0.8):
    """A corner plot of one or several sample sets (own implementation, matplotlib only).

    sample_sets : dict label -> (n, d) (or a single (n, d) array); names : d labels;
    truths : (d,) or None (lines); ranges : (d, 2) or None (central 99.5 % of all sets, widened
    to include truths); levels : probability mass of the 2-D contours (HPD of a lightly
    smoothed histogram); diagonal: normalised 1-D histograms. Returns the Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    sets = _corner_sets(sample_sets, max_points)
    d = next(iter(sets.values())).shape[1]
    nm = _names(names, d)
    tr = None if truths is None else np.asarray(truths, np.float64).ravel()
    ranges = np.asarray(_corner_ranges(sets, tr) if ranges is None else ranges, np.float64)
    colors = colors or [f"C{i}" for i in range(len(sets))]
    size = max(1.3, min(2.2, 16.0 / d))
    fig, axes = plt.subplots(d, d, figsize=(size * d, size * d), squeeze=False)
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            if j > i:
                ax.set_visible(False)
                continue
            for v, c in zip(sets.values(), colors):
                if i == j:
                    ax.hist(v[:, i], bins=bins, range=ranges[i], density=True, histtype="step",
                            color=c, lw=1.2)
                else:
                    _corner_contours(ax, v[:, j], v[:, i], ranges[j], ranges[i], c, bins=bins,
                                     levels=levels, smooth=smooth)
            if tr is not None:
                _corner_truth(ax, tr, i, j)
            _corner_axes(ax, i, j, d, nm, ranges)
    handles = [Line2D([], [], color=c, label=str(k)) for k, c in zip(sets, colors)]
    if tr is not None:
        handles.append(Line2D([], [], color="k", label="truth"))
    fig.legend(handles=handles, loc="upper right", fontsize=9, frameon=False)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return _finish(fig, path)


def plot_sed_fit(model, theta_samples, z, flux, sigma, path=None, *, best=None,
                 n_draws: int = 100, seed: int = 0, wave_range=None, ax=None, title=None):
    """Best-fit SED over the photometry, with the filter curves (as SEDflow's Fig. 2).

    model : an SEDModel (``sed``, ``photometry``, ``filters``); theta_samples (n, 12) posterior
    draws of the physical parameters; z : redshift; flux, sigma : (n_b,) nanomaggies (NaN
    allowed: not drawn). best : (12,) parameters of the line (default: the draw whose model
    photometry has the smallest chi-square among the ``n_draws`` plotted ones).
    The band shows the 16-84 % range of the SED over ``n_draws`` random draws; the observed
    and best-fit photometry are shown as f_lambda at each filter's effective wavelength, in
    1e-17 erg/s/cm^2/A. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    th = np.asarray(theta_samples, np.float64)
    if th.ndim == 1:
        th = th[None]
    th = th[np.all(np.isfinite(th), axis=1)]
    if len(th) == 0:
        raise ValueError("no finite theta samples")
    rng = np.random.default_rng(seed)
    pick = th[rng.choice(len(th), min(n_draws, len(th)), replace=False)]
    flux = np.asarray(flux, np.float64)
    sigma = np.asarray(sigma, np.float64)
    zz = np.full(len(pick), float(z))
    phot = np.asarray(model.photometry(pick, zz), np.float64)
    ok = np.isfinite(flux) & np.isfinite(sigma) & (sigma > 0)
    chi2 = np.sum(np.where(ok, (phot - np.where(ok, flux, 0)) ** 2
                           / np.where(ok, sigma, 1) ** 2, 0.0), axis=1)
    if best is None:
        best = pick[int(np.argmin(chi2))]
    best = np.asarray(best, np.float64)
    sed_draws = model.sed(pick, zz)
    sed_best = model.sed(best, float(z))
    wave = np.asarray(sed_best.wave_obs, np.float64)
    lo16, hi84 = np.percentile(np.asarray(sed_draws.flux_lambda, np.float64), [16, 84], axis=0)
    filters = list(model.filters)
    lam_eff = np.array([f.effective_wavelength for f in filters])
    to_flam = AB_FNU_CGS * 1e-9 * C_ANGSTROM_S / lam_eff**2 / 1e-17  # nanomaggies -> 1e-17 f_lambda
    best_phot = np.asarray(model.photometry(best, float(z)), np.float64)
    if wave_range is None:
        wave_range = (min(f.wave[0] for f in filters) * 0.8, max(f.wave[-1] for f in filters) * 1.1)
    sel = (wave >= wave_range[0]) & (wave <= wave_range[1])
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4))
    else:
        fig = ax.figure
    ax.fill_between(wave[sel], lo16[sel], hi84[sel], color="C0", alpha=0.25, lw=0,
                    label="posterior 16-84%")
    ax.plot(wave[sel], np.asarray(sed_best.flux_lambda, np.float64)[sel], color="C0", lw=0.8,
            label="best fit")
    ax.scatter(lam_eff, best_phot * to_flam, marker="s", s=30, facecolor="none",
               edgecolor="C0", zorder=3, label="best-fit photometry")
    ax.errorbar(lam_eff[ok], (flux * to_flam)[ok], yerr=(sigma * to_flam)[ok], fmt="o",
                color="k", ms=4, zorder=4, label="observed")
    top = np.nanmax(np.concatenate([hi84[sel], (flux * to_flam)[ok] + (sigma * to_flam)[ok]]))
    ax.set_ylim(0, 1.3 * top if np.isfinite(top) and top > 0 else None)
    ax.set_xlim(*wave_range)
    ax.set_xlabel(r"observed wavelength [$\AA$]")
    ax.set_ylabel(r"$f_\lambda$ [$10^{-17}$ erg s$^{-1}$ cm$^{-2}$ $\AA^{-1}$]")
    ax2 = ax.twinx()
    for k, f in enumerate(filters):
        ax2.fill_between(f.wave, 0, f.response / np.max(f.response), color=f"C{k + 1}",
                         alpha=0.12, lw=0)
        ax2.text(lam_eff[k], 1.02, f.name.split("_")[-1], ha="center", fontsize=8,
                 color=f"C{k + 1}")
    ax2.set_ylim(0, 4.0)
    ax2.set_yticks([])
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title or f"z = {float(z):.4f}", fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)
