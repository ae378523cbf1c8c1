"""SEDflow's per-band photometric noise model (design spec section 9.1, step 3).

For each band the catalog uncertainty is expressed in **magnitudes**,
``sigma_mag = 2.5/ln10 * sigma_f / f``, and summarised by its median ``mu(f)`` and spread
``s(f)`` in bins of (Galactic-extinction corrected) flux ``f`` in **nanomaggies** (AB;
1 nmgy = 3.631 microJy, mag = 22.5 - 2.5 log10 f).

Binning and interpolation (this package's choice; SEDflow's exact one is UNCONFIRMED, spec
section 12): ``n_bins`` bins equally spaced in log10 f over the band's data range; adjacent bins
are then merged, low flux to high, until every bin holds at least ``min_per_bin`` galaxies (a
short remainder joins the last bin). A bin's centre is the median log10 f of its members; ``mu``
is the median of sigma_mag, ``s`` its standard deviation (``spread='std'``, as in the SEDflow
paper) or 1.4826 x the median absolute deviation (``spread='mad'``). Between bin centres ``mu`` and
``s`` are interpolated linearly in log10 f; beyond the outermost centres they are clamped to the
end values. The flux range the catalog covers, ``[min f, max f]`` per band, is recorded.

Simulation (:func:`add_noise`): ``sigma_mag' ~ N(mu(f), s(f))`` per band independently,
``sigma_f = sigma_mag' * f * ln10 / 2.5``, noisy flux ``f + N(0, sigma_f)``. Rows with any
``sigma_f <= 0`` (or non-finite) are flagged, as are rows whose noiseless flux lies outside the
fitted catalog's flux range in any band (SEDflow's cuts, spec 9.1 step 4); :func:`apply_cuts`
drops them on the host and reports the counts.

The package ships a table fitted to a real SDSS catalog (``data/noise_sdss_ugriz.json``; SDSS
ugriz) and one for GALEX FUV/NUV (``data/noise_galex_fuv_nuv.json``); :func:`default_noise_model`
loads them, and ``python sedflow_jax/data/make_noise_table.py`` regenerates them.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import warnings
from importlib import resources
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "NoiseModel",
    "NoisyPhotometry",
    "fit_noise_model",
    "catalog_sigma_mag",
    "default_noise_model",
    "available_default_bands",
    "sigma_mag_params",
    "sample_sigma_mag",
    "sample_sigma",
    "add_noise",
    "apply_cuts",
    "sigma_flux_to_mag",
    "sigma_mag_to_flux",
    "plot_noise_model",
    "DEFAULT_TABLES",
]

from ..sed.units import MAG_PER_LN
_FORMAT = "sedflow_jax.noise_model"
_VERSION = 1
_PAD_STEP = 1.0  # dex between padded (dummy) bin centres; values there repeat the last bin

#: shipped tables (package data) and the bands each holds
DEFAULT_TABLES = {
    "noise_sdss_ugriz.json": ("sdss_u", "sdss_g", "sdss_r", "sdss_i", "sdss_z"),
    "noise_galex_fuv_nuv.json": ("galex_fuv", "galex_nuv"),
}
_SDSS_BANDS = DEFAULT_TABLES["noise_sdss_ugriz.json"]


# ---------------------------------------------------------------------------------------------
# small unit helpers
# ---------------------------------------------------------------------------------------------
def sigma_flux_to_mag(sigma_f, flux):
    """sigma in flux units -> magnitudes: ``2.5/ln10 * sigma_f / flux`` (same shapes)."""
    return MAG_PER_LN * sigma_f / flux


def sigma_mag_to_flux(sigma_mag, flux):
    """sigma in magnitudes -> flux units: ``sigma_mag * flux * ln10 / 2.5`` (same shapes)."""
    return sigma_mag * flux / MAG_PER_LN


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class NoiseModel:
    """Per-band sigma_mag(f) model (a JAX pytree; arrays are float32 leaves).

    Attributes (n_b bands, n_k = the largest number of bins over bands):

    - ``bands``: tuple of band names, e.g. ``('sdss_u', ..., 'sdss_z')``.
    - ``log10_flux``: (n_b, n_k) bin centres, log10 of flux in nanomaggies. Bands with fewer bins
      are padded with increasing dummy centres that repeat the last bin's values, so
      interpolation clamps exactly as for an unpadded band.
    - ``median``: (n_b, n_k) median sigma_mag per bin (magnitudes).
    - ``spread``: (n_b, n_k) spread of sigma_mag per bin (magnitudes).
    - ``n_per_bin``: (n_b, n_k) int32 galaxies per bin (0 for padding).
    - ``n_bins``: (n_b,) int32 real bins per band.
    - ``flux_range``: (n_b, 2) [min, max] flux (nanomaggies) of the fitted catalog per band.
    - ``metadata``: JSON-serialisable dict (provenance, cuts, counts, bin edges, ...).
    """

    bands: tuple
    log10_flux: Any
    median: Any
    spread: Any
    n_per_bin: Any
    n_bins: Any
    flux_range: Any
    metadata: dict = dataclasses.field(default_factory=dict)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_per_band(cls, per_band: dict, metadata: Optional[dict] = None) -> "NoiseModel":
        """Build from ``{band: {'log10_flux_center', 'median_sigma_mag', 'spread_sigma_mag',
        'n_per_bin', 'flux_range'}}`` (lists or 1-D arrays, unpadded)."""
        bands = tuple(per_band)
        if not bands:
            raise ValueError("a NoiseModel needs at least one band")
        nk = max(len(per_band[b]["log10_flux_center"]) for b in bands)
        shape = (len(bands), nk)
        x = np.zeros(shape, np.float64)
        mu = np.zeros(shape, np.float64)
        sp = np.zeros(shape, np.float64)
        npb = np.zeros(shape, np.int64)
        nb = np.zeros(len(bands), np.int64)
        fr = np.zeros((len(bands), 2), np.float64)
        for i, b in enumerate(bands):
            d = per_band[b]
            c = np.asarray(d["log10_flux_center"], np.float64)
            m = np.asarray(d["median_sigma_mag"], np.float64)
            s = np.asarray(d["spread_sigma_mag"], np.float64)
            n = np.asarray(d.get("n_per_bin", np.zeros(len(c))), np.int64)
            k = len(c)
            if k == 0 or not (len(m) == len(s) == len(n) == k):
                raise ValueError(f"band {b}: bin arrays must be non-empty and of equal length")
            if np.any(np.diff(c) <= 0) or not np.all(np.isfinite(c)):
                raise ValueError(f"band {b}: bin centres must be finite and strictly increasing")
            if np.any(s < 0) or not np.all(np.isfinite(m)) or not np.all(np.isfinite(s)):
                raise ValueError(f"band {b}: median/spread must be finite, spread >= 0")
            x[i, :k], mu[i, :k], sp[i, :k], npb[i, :k] = c, m, s, n
            x[i, k:] = c[-1] + _PAD_STEP * np.arange(1, nk - k + 1)
            mu[i, k:], sp[i, k:] = m[-1], s[-1]
            nb[i] = k
            fr[i] = np.asarray(d["flux_range"], np.float64)
        return cls(
            bands=bands,
            log10_flux=jnp.asarray(x, jnp.float32),
            median=jnp.asarray(mu, jnp.float32),
            spread=jnp.asarray(sp, jnp.float32),
            n_per_bin=jnp.asarray(npb, jnp.int32),
            n_bins=jnp.asarray(nb, jnp.int32),
            flux_range=jnp.asarray(fr, jnp.float32),
            metadata=dict(metadata or {}),
        )

    def per_band(self) -> dict:
        """Unpadded per-band tables as plain Python lists (the JSON layout)."""
        out = {}
        nb = np.asarray(self.n_bins)
        for i, b in enumerate(self.bands):
            k = int(nb[i])
            out[b] = {
                "log10_flux_center": np.asarray(self.log10_flux[i, :k], np.float64).tolist(),
                "median_sigma_mag": np.asarray(self.median[i, :k], np.float64).tolist(),
                "spread_sigma_mag": np.asarray(self.spread[i, :k], np.float64).tolist(),
                "n_per_bin": np.asarray(self.n_per_bin[i, :k]).astype(int).tolist(),
                "flux_range": np.asarray(self.flux_range[i], np.float64).tolist(),
            }
        return out

    # -- selection / merging ---------------------------------------------------------------------
    def select(self, bands: Sequence[str]) -> "NoiseModel":
        """The model restricted to (and reordered as) ``bands``; KeyError names missing bands."""
        bands = tuple(bands)
        missing = [b for b in bands if b not in self.bands]
        if missing:
            raise KeyError(
                f"noise model has no band(s) {missing}; it holds {list(self.bands)}. "
                "Fit one with sedflow_jax.noise.fit_noise_model(...) from a catalog with those bands.")
        pb = self.per_band()
        md = dict(self.metadata)
        return NoiseModel.from_per_band({b: pb[b] for b in bands}, md)

    @staticmethod
    def concatenate(models: Sequence["NoiseModel"]) -> "NoiseModel":
        """Join models with disjoint bands (bands are independent in this model)."""
        per_band, md = {}, {"sources": []}
        for m in models:
            for b, d in m.per_band().items():
                if b in per_band:
                    raise ValueError(f"band {b} appears in more than one model")
                per_band[b] = d
            md["sources"].append(m.metadata)
        return NoiseModel.from_per_band(per_band, md)

    # -- I/O -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "units": {
                "flux": "nanomaggies (AB; 1 nmgy = 3.631 uJy; mag = 22.5 - 2.5 log10 f), "
                        "Galactic-extinction corrected where the metadata says so",
                "log10_flux_center": "log10(flux / nanomaggies)",
                "sigma": "magnitudes, sigma_mag = 2.5/ln10 * sigma_f / f",
            },
            "interpolation": "linear in log10 flux between bin centres; clamped beyond the outermost",
            "bands": self.per_band(),
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseModel":
        if d.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} table (format={d.get('format')!r})")
        if int(d.get("version", 0)) > _VERSION:
            raise ValueError(f"table version {d['version']} is newer than supported ({_VERSION})")
        return cls.from_per_band(d["bands"], d.get("metadata", {}))

    def save(self, path) -> None:
        """Write to ``.json`` (readable) or ``.npz`` (arrays + a JSON string; no pickle)."""
        path = os.fspath(path)
        d = self.to_dict()
        if path.endswith(".npz"):
            np.savez(path, table_json=np.asarray(json.dumps(d)))
        else:
            with open(path, "w") as fh:
                json.dump(d, fh, indent=1)
                fh.write("\n")

    @classmethod
    def load(cls, path) -> "NoiseModel":
        """Read a table written by :meth:`save` (``.json`` or ``.npz``)."""
        path = os.fspath(path)
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                d = json.loads(str(z["table_json"]))
        else:
            with open(path) as fh:
                d = json.load(fh)
        return cls.from_dict(d)

    def summary(self, fluxes=(1.0, 10.0, 100.0, 1000.0)) -> str:
        """Human-readable table of median sigma_mag at a few fluxes (nanomaggies)."""
        f = jnp.asarray(np.tile(np.asarray(fluxes, np.float32)[:, None], (1, len(self.bands))))
        mu, s = sigma_mag_params(self, f)
        lines = ["band        n_bins  flux range [nmgy]      " +
                 "  ".join(f"mu(f={x:g})" for x in fluxes)]
        for i, b in enumerate(self.bands):
            lo, hi = np.asarray(self.flux_range[i])
            vals = "  ".join(f"{float(mu[j, i]):.4f}+-{float(s[j, i]):.4f}" for j in range(len(fluxes)))
            lines.append(f"{b:11s} {int(self.n_bins[i]):6d}  [{lo:9.3g}, {hi:9.3g}]  {vals}")
        return "\n".join(lines)


def _nm_flatten(m: NoiseModel):
    children = (m.log10_flux, m.median, m.spread, m.n_per_bin, m.n_bins, m.flux_range)
    aux = (m.bands, json.dumps(m.metadata, sort_keys=True, default=str))
    return children, aux


def _nm_unflatten(aux, children):
    bands, md = aux
    return NoiseModel(bands, *children, metadata=json.loads(md))


jax.tree_util.register_pytree_node(NoiseModel, _nm_flatten, _nm_unflatten)


class NoisyPhotometry(NamedTuple):
    """Output of :func:`add_noise` (batch shape ``...``, n_b bands).

    - ``flux``: (..., n_b) noisy flux, nanomaggies (may be <= 0 for faint bands).
    - ``sigma``: (..., n_b) drawn flux uncertainty sigma_f, nanomaggies.
    - ``sigma_mag``: (..., n_b) the drawn sigma_mag' (= 2.5/ln10 sigma_f / noiseless f).
    - ``keep``: (...,) bool, ``sigma_ok & in_range`` (or ``sigma_ok`` with ``range_cut=False``).
    - ``sigma_ok``: (...,) bool, every sigma_f finite and > 0.
    - ``in_range``: (...,) bool, every noiseless flux inside the model's catalog flux range.
    """

    flux: Any
    sigma: Any
    sigma_mag: Any
    keep: Any
    sigma_ok: Any
    in_range: Any

    @property
    def keep_mask(self):
        """Alias of ``keep``."""
        return self.keep


# ---------------------------------------------------------------------------------------------
# evaluation and simulation (pure JAX)
# ---------------------------------------------------------------------------------------------
def _check_flux(noise: NoiseModel, flux):
    flux = jnp.asarray(flux)
    if not jnp.issubdtype(flux.dtype, jnp.floating):
        flux = flux.astype(jnp.float32)
    nb = len(noise.bands)
    if flux.ndim < 1 or flux.shape[-1] != nb:
        raise ValueError(f"flux must have shape (..., {nb}) for bands {noise.bands}, got {flux.shape}")
    return flux


_interp_bands = jax.vmap(jnp.interp, in_axes=(-1, 0, 0), out_axes=-1)


def sigma_mag_params(noise: NoiseModel, flux):
    """Median and spread of sigma_mag at the given noiseless fluxes.

    flux: (..., n_b) nanomaggies -> (mu, s), each (..., n_b) in magnitudes. Linear in log10 f
    between bin centres, clamped outside; flux <= 0 takes the faintest bin's values.
    """
    flux = _check_flux(noise, flux)
    tiny = jnp.finfo(flux.dtype).tiny
    logf = jnp.log10(jnp.maximum(flux, tiny))
    xp = noise.log10_flux.astype(flux.dtype)
    mu = _interp_bands(logf, xp, noise.median.astype(flux.dtype))
    s = _interp_bands(logf, xp, noise.spread.astype(flux.dtype))
    return mu, s


def sample_sigma_mag(key, noise: NoiseModel, flux):
    """Draw sigma_mag' ~ N(mu(f), s(f)) per band independently.

    key: PRNG key; flux: (..., n_b) nanomaggies -> (..., n_b) magnitudes (can be <= 0).
    """
    mu, s = sigma_mag_params(noise, flux)
    return mu + s * jax.random.normal(key, mu.shape, dtype=mu.dtype)


def sample_sigma(key, noise: NoiseModel, flux):
    """Draw flux uncertainties: sigma_f = sigma_mag' * f * ln10/2.5.

    key: PRNG key; flux: (..., n_b) nanomaggies -> sigma_f (..., n_b) nanomaggies (can be <= 0;
    such rows are dropped in SEDflow's training set, see :func:`add_noise`).
    """
    flux = _check_flux(noise, flux)
    return sigma_mag_to_flux(sample_sigma_mag(key, noise, flux), flux)


@functools.partial(jax.jit, static_argnames=("range_cut",))
def add_noise(key, noise: NoiseModel, flux, *, range_cut: bool = True) -> NoisyPhotometry:
    """SEDflow's toy noise: draw sigma_f per band, then noisy flux = f + N(0, sigma_f).

    key: PRNG key; flux: (..., n_b) noiseless flux in nanomaggies (band order ``noise.bands``).
    Returns :class:`NoisyPhotometry`; nothing is dropped here (jit-friendly) -- rows are flagged
    in ``keep`` (sigma_f <= 0 or non-finite in any band; with ``range_cut``, also a noiseless flux
    outside the fitted catalog's range in any band). Use :func:`apply_cuts` on the host to drop.

    ``sigma_mag`` is the drawn sigma_mag' (relative to the noiseless flux, as in SEDflow's noise
    model); a real catalog's sigma_mag is relative to the *observed* flux, which
    ``sigma_flux_to_mag(out.sigma, out.flux)`` reproduces for simulated rows.
    """
    flux = _check_flux(noise, flux)
    k_sig, k_eps = jax.random.split(key)
    smag = sample_sigma_mag(k_sig, noise, flux)
    sig = sigma_mag_to_flux(smag, flux)
    noisy = flux + sig * jax.random.normal(k_eps, flux.shape, dtype=flux.dtype)
    sigma_ok = jnp.all(jnp.isfinite(sig) & (sig > 0), axis=-1)
    fr = noise.flux_range.astype(flux.dtype)
    in_range = jnp.all((flux >= fr[:, 0]) & (flux <= fr[:, 1]), axis=-1)
    keep = sigma_ok & in_range if range_cut else sigma_ok
    return NoisyPhotometry(noisy, sig, smag, keep, sigma_ok, in_range)


def apply_cuts(noisy: NoisyPhotometry, *arrays):
    """Host-side: drop the rows flagged by :func:`add_noise` and count them.

    noisy: NoisyPhotometry with batch shape (n,); arrays: optional (n, ...) arrays to cut
    alongside (e.g. theta, redshift). Returns ``(kept, kept_arrays, report)``: ``kept`` a
    NoisyPhotometry of NumPy arrays with the rows where ``keep``; ``kept_arrays`` a tuple; ``report``
    a dict with ``n_total``, ``n_kept``, ``n_dropped``, ``n_sigma_nonpositive`` (rows with any
    sigma_f <= 0) and ``n_out_of_range`` (rows with any noiseless flux outside the catalog range;
    counted whether or not the range cut was applied, the two counts can overlap).
    """
    keep = np.asarray(noisy.keep, bool)
    if keep.ndim != 1:
        raise ValueError(f"apply_cuts expects a batch of shape (n,), got keep.shape={keep.shape}")
    kept = NoisyPhotometry(*(np.asarray(a)[keep] for a in noisy))
    out = []
    for a in arrays:
        a = np.asarray(a)
        if a.shape[:1] != keep.shape:
            raise ValueError(f"array with shape {a.shape} does not match {keep.shape[0]} rows")
        out.append(a[keep])
    report = {
        "n_total": int(keep.size),
        "n_kept": int(keep.sum()),
        "n_dropped": int((~keep).sum()),
        "n_sigma_nonpositive": int((~np.asarray(noisy.sigma_ok, bool)).sum()),
        "n_out_of_range": int((~np.asarray(noisy.in_range, bool)).sum()),
    }
    return kept, tuple(out), report


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
# shipped defaults
# ---------------------------------------------------------------------------------------------
def available_default_bands() -> tuple:
    """Bands covered by the shipped noise tables."""
    return tuple(b for bs in DEFAULT_TABLES.values() for b in bs)


def default_noise_model(bands: Sequence[str] = _SDSS_BANDS) -> NoiseModel:
    """The shipped noise model for ``bands`` (default SDSS ugriz), in that order.

    SDSS ugriz: fitted to 9,264 real SDSS Main-sample galaxies (NYU-VAGC via kcorrect's test
    catalog, MODELFLUX, 0.01 < z < 0.2, extinction corrected). GALEX FUV/NUV: fitted to the few
    hundred GALEX-detected galaxies of the same catalog (see the table's metadata). Raises
    KeyError for a band no shipped table holds.
    """
    bands = (bands,) if isinstance(bands, str) else tuple(bands)
    unknown = [b for b in bands if b not in available_default_bands()]
    if unknown:
        raise KeyError(
            f"no shipped noise table for band(s) {unknown}; shipped: {list(available_default_bands())}. "
            "Fit one from your catalog with sedflow_jax.noise.fit_noise_model(...).")
    models = []
    for fname, held in DEFAULT_TABLES.items():
        want = [b for b in bands if b in held]
        if want:
            ref = resources.files("sedflow_jax") / "data" / fname
            with resources.as_file(ref) as p:
                models.append(NoiseModel.load(p).select(want))
    model = models[0] if len(models) == 1 else NoiseModel.concatenate(models)
    return model.select(bands)


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
