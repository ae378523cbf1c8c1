"""Fitting the per-band noise model (:class:`sedflow_jax.sim.noise.NoiseModel`) to a real
catalog, and plotting it (host side, NumPy; astropy reads the tables).

Binning (see :mod:`sedflow_jax.sim.noise`): ``n_bins`` bins equally spaced in log10 f over the
band's data range, merged low flux to high until each holds ``min_per_bin`` galaxies; per bin
the median log10 f (centre), the median sigma_mag and its spread (``'std'`` or ``'mad'``).
"""
from __future__ import annotations

import datetime
import math
import os
import warnings
from typing import Optional

import jax.numpy as jnp
import numpy as np

from ..sed.units import MAG_PER_LN
from .noise import NoiseModel, sigma_mag_params

__all__ = ["catalog_sigma_mag", "fit_noise_model", "plot_noise_model"]


# ---------------------------------------------------------------------------------------------
# fitting (host side, NumPy)
# ---------------------------------------------------------------------------------------------
def _read_table(table):
    from astropy.table import Table

    if isinstance(table, (str, os.PathLike)):
        path = os.fspath(table)
        if path.lower().endswith((".csv",)):
            return Table.read(path, format="ascii.csv")
        return Table.read(path)
    if isinstance(table, Table):
        return table
    return Table(table)


def _column(table, name):
    if name not in table.colnames:
        raise KeyError(f"column {name!r} not in table; columns are {table.colnames}")
    col = np.ma.asarray(table[name]).astype(np.float64)  # masked entries -> NaN
    return np.ma.filled(col, np.nan)


def _band_matrix(table, cols, n_bands, what):
    """A (n_rows, n_bands) float64 matrix from a vector column name, a list of scalar column
    names, or an array."""
    if cols is None:
        return None
    if isinstance(cols, str):
        x = _column(table, cols)
        if x.ndim == 1:
            x = x[:, None]
        if x.shape[1] != n_bands:
            raise ValueError(f"{what} column {cols!r} has {x.shape[1]} entries per row, "
                             f"expected {n_bands} (one per band)")
        return x
    if isinstance(cols, (list, tuple)) and all(isinstance(c, str) for c in cols):
        if len(cols) != n_bands:
            raise ValueError(f"{what}: {len(cols)} columns given for {n_bands} bands")
        return np.stack([_column(table, c).reshape(-1) for c in cols], axis=1)
    x = np.asarray(cols, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.shape != (len(table), n_bands):
        raise ValueError(f"{what} array has shape {x.shape}, expected {(len(table), n_bands)}")
    return x


def catalog_sigma_mag(table, flux_cols, ivar_cols=None, bands=None, *, err_cols=None,
                      extinction_col=None, zcol=None, zrange=None, flux_scale=1.0):
    """Extract per-band (flux [nmgy], sigma_mag) of the usable rows of a catalog (host side).

    Arguments as :func:`fit_noise_model`. Returns ``(data, report)``: ``data[band] =
    (flux, sigma_mag)`` 1-D float64 arrays of the rows kept for that band; ``report`` a dict of
    counts (``n_rows``, ``n_after_zcut``, per band ``n_used`` / ``n_skipped_invalid``).
    """
    t = _read_table(table)
    if bands is None:
        raise ValueError("bands (names, one per flux column) are required")
    bands = (bands,) if isinstance(bands, str) else tuple(bands)
    nb = len(bands)
    if (ivar_cols is None) == (err_cols is None):
        raise ValueError("give exactly one of ivar_cols (inverse variance) or err_cols (1-sigma)")
    f = _band_matrix(t, flux_cols, nb, "flux")
    if ivar_cols is not None:
        iv = _band_matrix(t, ivar_cols, nb, "ivar")
        with np.errstate(divide="ignore", invalid="ignore"):
            sig = np.where(iv > 0, 1.0 / np.sqrt(np.where(iv > 0, iv, 1.0)), np.nan)
    else:
        sig = _band_matrix(t, err_cols, nb, "err")
        sig = np.where(sig > 0, sig, np.nan)
    scale = np.broadcast_to(np.asarray(flux_scale, np.float64), (nb,))
    f = f * scale
    sig = sig * scale
    if extinction_col is not None:
        a = _band_matrix(t, extinction_col, nb, "extinction")
        corr = 10.0 ** (0.4 * a)  # dereddened = observed * 10**(0.4 A); sigma scales likewise
        f = f * corr
        sig = sig * corr
    rows = np.ones(len(t), bool)
    report = {"n_rows": int(len(t))}
    if zrange is not None:
        if zcol is None:
            raise ValueError("zrange needs zcol")
        z = _column(t, zcol).reshape(-1)
        rows = np.isfinite(z) & (z > zrange[0]) & (z < zrange[1])
        report["zcut"] = f"{zrange[0]} < {zcol} < {zrange[1]}"
    report["n_after_zcut"] = int(rows.sum())
    data, per = {}, {}
    for i, b in enumerate(bands):
        good = rows & np.isfinite(f[:, i]) & np.isfinite(sig[:, i]) & (f[:, i] > 0) & (sig[:, i] > 0)
        skipped = int(rows.sum() - good.sum())
        per[b] = {"n_used": int(good.sum()), "n_skipped_invalid": skipped}
        if skipped:
            warnings.warn(f"fit_noise_model: band {b}: skipped {skipped} of {int(rows.sum())} rows "
                          "(NaN/inf, flux <= 0 or ivar/err <= 0)", stacklevel=3)
        data[b] = (f[good, i], MAG_PER_LN * sig[good, i] / f[good, i])
    report["bands"] = per
    return data, report


def _bin_band(flux, smag, n_bins, min_per_bin, spread):
    lf = np.log10(flux)
    lo, hi = float(lf.min()), float(lf.max())
    if hi <= lo:
        hi = lo + 1e-6
    edges = np.linspace(lo, hi, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, lf, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    groups, cur, cur_n = [], [], 0  # merge adjacent bins until each holds >= min_per_bin
    for k in range(n_bins):
        cur.append(k)
        cur_n += counts[k]
        if cur_n >= min_per_bin:
            groups.append(cur)
            cur, cur_n = [], 0
    if cur:
        if groups:
            groups[-1] = groups[-1] + cur
        else:
            groups.append(cur)
    groups = [g for g in groups if counts[g].sum() > 0]
    centers, med, spr, npb, bin_edges = [], [], [], [], [float(edges[groups[0][0]])]
    for g in groups:
        m = np.isin(idx, g)
        s = smag[m]
        centers.append(float(np.median(lf[m])))
        med.append(float(np.median(s)))
        if s.size < 2:
            spr.append(0.0)
        elif spread == "std":
            spr.append(float(np.std(s, ddof=1)))
        else:
            spr.append(float(1.4826 * np.median(np.abs(s - np.median(s)))))
        npb.append(int(m.sum()))
        bin_edges.append(float(edges[g[-1] + 1]))
    centers = np.asarray(centers)
    if np.any(np.diff(centers) <= 0):  # only with heavily tied fluxes: fall back to bin midpoints
        be = np.asarray(bin_edges)
        centers = 0.5 * (be[:-1] + be[1:])
    return {
        "log10_flux_center": centers.tolist(),
        "median_sigma_mag": med,
        "spread_sigma_mag": spr,
        "n_per_bin": npb,
        "flux_range": [float(flux.min()), float(flux.max())],
        "bin_edges_log10_flux": bin_edges,
    }


def fit_noise_model(table, flux_cols, ivar_cols=None, bands=None, *, err_cols=None,
                    n_bins: int = 20, min_per_bin: int = 25, spread: str = "mad",
                    extinction_col=None, zcol=None, zrange=None, flux_scale=1.0,
                    metadata: Optional[dict] = None) -> NoiseModel:
    """Fit the per-band sigma_mag(f) model to a catalog.

    table: astropy Table (or anything ``Table()`` accepts), or a path astropy can read
      (FITS / ECSV / CSV).
    flux_cols: one vector column name with shape (n, n_b) (SDSS style, e.g. ``'MODELFLUX'``), a
      list of n_b scalar column names (``['flux_g', 'flux_r']``), or an (n, n_b) array. Fluxes in
      nanomaggies (else pass ``flux_scale``, per band or scalar, multiplying flux and error).
    ivar_cols: the same for inverse variances (nmgy^-2), e.g. ``'MODELFLUX_IVAR'``; or give
      ``err_cols`` (1-sigma errors in flux units) instead.
    bands: band names, one per flux column, e.g. ``('sdss_u', ..., 'sdss_z')``.
    n_bins, min_per_bin: initial log10-flux bins over each band's range, and the minimum count
      per bin after merging neighbours (see module docstring).
    spread: ``'std'`` (sample standard deviation, the SEDflow paper) or ``'mad'`` (1.4826 MAD).
    extinction_col: Galactic extinction A_b in magnitudes (vector column, list of columns or
      array). Fluxes *and* errors are multiplied by 10**(0.4 A) (sigma_mag is unchanged, the
      flux axis moves to intrinsic fluxes, matching noiseless model fluxes).
    zcol, zrange: keep rows with zrange[0] < z < zrange[1] (strict).

    Rows with NaN/inf, flux <= 0 or ivar <= 0 in a band are skipped for that band only; the
    count is warned and recorded in ``metadata['bands'][band]['n_skipped_invalid']``.
    """
    if spread not in ("std", "mad"):
        raise ValueError(f"spread must be 'std' or 'mad', got {spread!r}")
    if int(n_bins) < 1 or int(min_per_bin) < 1:
        raise ValueError("n_bins and min_per_bin must be >= 1")
    data, report = catalog_sigma_mag(
        table, flux_cols, ivar_cols, bands, err_cols=err_cols, extinction_col=extinction_col,
        zcol=zcol, zrange=zrange, flux_scale=flux_scale)
    per_band = {}
    for b, (flux, smag) in data.items():
        if flux.size < 2:
            raise ValueError(f"band {b}: only {flux.size} usable rows, cannot fit a noise model")
        if flux.size < min_per_bin:
            warnings.warn(f"band {b}: {flux.size} usable rows < min_per_bin={min_per_bin}; one bin",
                          stacklevel=2)
        per_band[b] = _bin_band(flux, smag, int(n_bins), int(min_per_bin), spread)
        report["bands"][b]["bin_edges_log10_flux"] = per_band[b].pop("bin_edges_log10_flux")
    src = os.fspath(table) if isinstance(table, (str, os.PathLike)) else "astropy Table"
    md = {
        "source": src,
        "flux_cols": flux_cols if isinstance(flux_cols, (str, list, tuple)) else "array",
        "ivar_cols": ivar_cols if isinstance(ivar_cols, (str, list, tuple, type(None))) else "array",
        "err_cols": err_cols if isinstance(err_cols, (str, list, tuple, type(None))) else "array",
        "flux_scale": np.broadcast_to(np.asarray(flux_scale, float), (len(per_band),)).tolist(),
        "extinction_corrected": extinction_col is not None,
        "extinction_col": extinction_col if isinstance(extinction_col, (str, list, tuple, type(None)))
        else "array",
        "n_bins_initial": int(n_bins),
        "min_per_bin": int(min_per_bin),
        "spread": spread,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **report,
    }
    md.update(metadata or {})
    return NoiseModel.from_per_band(per_band, md)


# ---------------------------------------------------------------------------------------------
# plotting
# ---------------------------------------------------------------------------------------------
def plot_noise_model(noise: NoiseModel, table=None, path=None, *, flux_cols=None, ivar_cols=None,
                     err_cols=None, extinction_col=None, zcol=None, zrange=None, flux_scale=1.0,
                     data: Optional[dict] = None):
    """Plot sigma_mag vs flux per band: model median and +-spread, optionally over catalog data.

    table (+ the column arguments of :func:`fit_noise_model`), or ``data={band: (flux, sigma_mag)}``,
    adds the catalog points and their binned medians. Saves to ``path`` if given (Agg backend);
    returns the matplotlib Figure.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if table is not None and data is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data, _ = catalog_sigma_mag(table, flux_cols, ivar_cols, noise.bands, err_cols=err_cols,
                                        extinction_col=extinction_col, zcol=zcol, zrange=zrange,
                                        flux_scale=flux_scale)
    nb = len(noise.bands)
    ncol = min(nb, 3)
    nrow = int(math.ceil(nb / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    for i, b in enumerate(noise.bands):
        ax = axes[i // ncol][i % ncol]
        k = int(noise.n_bins[i])
        lo, hi = np.log10(np.asarray(noise.flux_range[i], np.float64))
        grid = np.linspace(lo - 0.3, hi + 0.3, 200)
        f = np.zeros((grid.size, nb), np.float32)
        f[:, i] = 10 ** grid
        mu, s = (np.asarray(a)[:, i] for a in sigma_mag_params(noise, jnp.asarray(f)))
        if data is not None and b in data:
            fx, sm = data[b]
            ax.scatter(fx, sm, s=2, c="0.6", alpha=0.4, lw=0, label="catalog", rasterized=True)
        ax.plot(10 ** grid, mu, "C0-", label="model median")
        ax.fill_between(10 ** grid, mu - s, mu + s, color="C0", alpha=0.25, label="model +-spread")
        ax.plot(10 ** np.asarray(noise.log10_flux[i, :k]), np.asarray(noise.median[i, :k]), "C1o",
                ms=3, label="bin centres")
        for e in (lo, hi):
            ax.axvline(10 ** e, color="k", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        pos = mu[mu > 0]
        if pos.size:
            ax.set_ylim(0.3 * pos.min(), 5 * pos.max())
        ax.set_title(b)
        ax.set_xlabel("flux [nanomaggies]")
        ax.set_ylabel(r"$\sigma$ [mag]")
    for j in range(nb, nrow * ncol):
        axes[j // ncol][j % ncol].set_visible(False)
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
