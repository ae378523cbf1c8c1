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

Calibration floor (optional; off by default, and then everything above is unchanged bit for
bit): real catalogs add a photometric-calibration floor to their errors that SDSS MODELFLUX
errors lack (NSA NMGY_IVAR: sigma_mag >= 0.02 in g, r, i, 0.03 in z, 0.05 in u; SDSS's own
calibration is ~1 % in griz and ~2 % in u, Padmanabhan et al. 2008). With ``floor_mag_max``
(n_b,) set, each simulated row draws "floor on" with probability ``1 - floor_p_zero`` (one draw
per row: a catalog has a floor in all its bands or in none), and then a floor per band
``c_b ~ U(0, floor_mag_max_b)`` (else ``c_b = 0``); the drawn ``sigma_mag' > 0`` becomes
``sqrt(sigma_mag'^2 + c_b^2)`` *before* the flux noise is drawn, so the noisy flux is consistent
with the reported error (``sigma_mag' <= 0`` is left as is and still dropped). The floor draws
use their own stream (``fold_in(key, 0x0F1)``), so the fitted-sigma and flux-noise draws are the
same as without the floor. See :func:`with_calibration_floor` and
``default_noise_model(..., calibration_floor=True)``.

The package ships a table fitted to a real SDSS catalog (``data/noise_sdss_ugriz.json``; SDSS
ugriz) and one for GALEX FUV/NUV (``data/noise_galex_fuv_nuv.json``); :func:`default_noise_model`
loads them, and ``python sedflow_jax/data/make_noise_table.py`` regenerates them.

Fitting a model to a catalog (:func:`~sedflow_jax.sim.noise_fit.fit_noise_model`) and plotting
it live in :mod:`sedflow_jax.sim.noise_fit`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from importlib import resources
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "NoiseModel",
    "NoisyPhotometry",
    "default_noise_model",
    "available_default_bands",
    "sigma_mag_params",
    "sample_sigma_mag",
    "sample_sigma",
    "add_noise",
    "apply_cuts",
    "sigma_flux_to_mag",
    "sigma_mag_to_flux",
    "with_calibration_floor",
    "draw_floor",
    "add_floor",
    "RECOMMENDED_FLOOR_MAG_MAX",
    "RECOMMENDED_FLOOR_P_ZERO",
    "NSA_FLOOR_MAG",
    "DEFAULT_TABLES",
]

from ..sed.units import GALEX_BANDS, MAG_PER_LN, SDSS_BANDS
_FORMAT = "sedflow_jax.noise_model"
_VERSION = 2  # newest readable; tables are written as version 1 unless they carry a floor
_FLOOR_VERSION = 2  # written with a calibration floor, so older readers refuse, not ignore, it
_FLOOR_STREAM = 0x0F1  # fold_in constant of the floor draws (independent of the other draws)
_PAD_STEP = 1.0  # dex between padded (dummy) bin centres; values there repeat the last bin

#: shipped tables (package data) and the bands each holds
DEFAULT_TABLES = {
    "noise_sdss_ugriz.json": SDSS_BANDS,
    "noise_galex_fuv_nuv.json": GALEX_BANDS,
}

#: recommended calibration-floor ranges [mag]: c_b ~ U(0, max_b) on a floor-on row. They cover
#: the NSA's NMGY_IVAR floors (u 0.05, griz 0.02-0.03) and SDSS's ~2 % (u) / ~1 % (griz)
#: calibration (Padmanabhan et al. 2008) with margin; GALEX's zero points are good to ~0.05
#: (FUV) and ~0.03 (NUV) mag (Morrissey et al. 2007), hence 0.08 / 0.05 there.
RECOMMENDED_FLOOR_MAG_MAX = {
    "sdss_u": 0.08, "sdss_g": 0.05, "sdss_r": 0.05, "sdss_i": 0.05, "sdss_z": 0.05,
    "galex_fuv": 0.08, "galex_nuv": 0.05,
}
#: the NSA's calibration floors on NMGY_IVAR [mag] (sigma_mag >= these in its ugriz)
NSA_FLOOR_MAG = {"sdss_u": 0.05, "sdss_g": 0.02, "sdss_r": 0.02, "sdss_i": 0.02, "sdss_z": 0.03}
#: recommended probability that a row has no floor at all (keeps floor-free catalogs covered)
RECOMMENDED_FLOOR_P_ZERO = 0.5


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
    - ``floor_mag_max``: None (no calibration floor, the default) or (n_b,) float32 upper ends
      [mag] of the per-band floor range, c_b ~ U(0, floor_mag_max_b) on a floor-on row.
    - ``floor_p_zero``: probability that a row has no floor (a static float; used only with
      ``floor_mag_max``). See the module docstring and :func:`with_calibration_floor`.
    """

    bands: tuple
    log10_flux: Any
    median: Any
    spread: Any
    n_per_bin: Any
    n_bins: Any
    flux_range: Any
    metadata: dict = dataclasses.field(default_factory=dict)
    floor_mag_max: Any = None
    floor_p_zero: float = 0.0

    @property
    def has_floor(self) -> bool:
        """True when rows draw a calibration floor (``floor_mag_max`` is set)."""
        return self.floor_mag_max is not None

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
                "Fit one with sedflow_jax.sim.noise_fit.fit_noise_model(...) from a catalog with those bands.")
        pb = self.per_band()
        md = dict(self.metadata)
        out = NoiseModel.from_per_band({b: pb[b] for b in bands}, md)
        if not self.has_floor:
            return out
        fm = dict(zip(self.bands, np.asarray(self.floor_mag_max, np.float64)))
        return with_calibration_floor(out, fm, self.floor_p_zero)

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
        out = NoiseModel.from_per_band(per_band, md)
        floored = [m for m in models if m.has_floor]
        if not floored:
            return out
        p0 = {m.floor_p_zero for m in floored}
        if len(p0) > 1 or len(floored) < len(models):
            raise ValueError("concatenate: every model needs the same calibration floor "
                             f"setting (floor_p_zero {sorted(p0)}; {len(floored)} of "
                             f"{len(models)} have one)")
        fm = {b: float(v) for m in floored for b, v in zip(m.bands, np.asarray(m.floor_mag_max))}
        return with_calibration_floor(out, fm, p0.pop())

    # -- I/O -------------------------------------------------------------------------------------
    def floor_dict(self) -> Optional[dict]:
        """The calibration floor as JSON (None without one): ``floor_mag_max`` {band: mag},
        ``p_zero`` and a description of the distribution."""
        if not self.has_floor:
            return None
        fm = np.asarray(self.floor_mag_max, np.float64)
        return {
            "floor_mag_max": {b: float(v) for b, v in zip(self.bands, fm)},
            "p_zero": float(self.floor_p_zero),
            "distribution": "per row: no floor with probability p_zero, else per band "
                            "c_b ~ U(0, floor_mag_max_b) [mag]",
            "combination": "sigma_mag = sqrt(sigma_mag_fit^2 + c_b^2) where sigma_mag_fit > 0, "
                           "before the flux noise is drawn",
        }

    def to_dict(self) -> dict:
        """JSON layout (version 1 without a floor: unchanged; version 2 adds
        ``calibration_floor``)."""
        d = self._table_dict()
        if self.has_floor:
            d["version"] = _FLOOR_VERSION
            d["calibration_floor"] = self.floor_dict()
        return d

    def _table_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "version": 1,
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
        model = cls.from_per_band(d["bands"], d.get("metadata", {}))
        cf = d.get("calibration_floor")
        if cf is None:
            return model
        return with_calibration_floor(model, cf["floor_mag_max"], float(cf["p_zero"]))

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
        if self.has_floor:
            fm = ", ".join(f"{b} {float(v):.3f}" for b, v in zip(self.bands, self.floor_mag_max))
            lines.append(f"calibration floor: none with p={self.floor_p_zero:g}, else "
                         f"c ~ U(0, max) mag, max: {fm}")
        return "\n".join(lines)


def _nm_flatten(m: NoiseModel):
    children = (m.log10_flux, m.median, m.spread, m.n_per_bin, m.n_bins, m.flux_range,
                m.floor_mag_max)
    aux = (m.bands, json.dumps(m.metadata, sort_keys=True, default=str), float(m.floor_p_zero))
    return children, aux


def _nm_unflatten(aux, children):
    bands, md, p_zero = aux
    *table, floor = children
    return NoiseModel(bands, *table, metadata=json.loads(md), floor_mag_max=floor,
                      floor_p_zero=p_zero)


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


def draw_floor(key, noise: NoiseModel, shape):
    """Calibration floors c (shape = (..., n_b)) [mag] of :attr:`NoiseModel.floor_mag_max`:
    per row (leading axes) none with probability ``floor_p_zero``, else c_b ~ U(0, max_b).
    Zeros for a model without a floor. ``key`` is used as given (add_noise folds it)."""
    if not noise.has_floor:
        return jnp.zeros(shape, jnp.float32)
    fmax = jnp.asarray(noise.floor_mag_max, jnp.float32)
    k_on, k_c = jax.random.split(key)
    on = jax.random.uniform(k_on, tuple(shape[:-1]) + (1,)) >= noise.floor_p_zero
    return jnp.where(on, jax.random.uniform(k_c, tuple(shape)) * fmax, 0.0)


def add_floor(sigma_mag, floor):
    """sigma_mag (..., n_b) combined in quadrature with floor (..., n_b) [mag] where
    sigma_mag > 0 (non-positive values, dropped later, are kept as they are; a zero floor
    leaves sigma_mag bit for bit)."""
    floor = floor.astype(sigma_mag.dtype)
    tot = jnp.sqrt(sigma_mag * sigma_mag + floor * floor)
    return jnp.where((sigma_mag > 0) & (floor > 0), tot, sigma_mag)  # floor 0: exactly as fitted


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

    With a calibration floor (``noise.has_floor``) ``sigma_mag`` is the fitted draw combined in
    quadrature with the row's floor (:func:`draw_floor`, :func:`add_floor`), and the flux noise is
    drawn with that inflated sigma; without one the result is exactly the floor-free model's.
    """
    flux = _check_flux(noise, flux)
    k_sig, k_eps = jax.random.split(key)
    smag = sample_sigma_mag(k_sig, noise, flux)
    if noise.has_floor:  # static (pytree structure): the floor-free path is untouched
        floor = draw_floor(jax.random.fold_in(key, _FLOOR_STREAM), noise, smag.shape)
        smag = add_floor(smag, floor)
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
# shipped defaults
# ---------------------------------------------------------------------------------------------
def available_default_bands() -> tuple:
    """Bands covered by the shipped noise tables."""
    return tuple(b for bs in DEFAULT_TABLES.values() for b in bs)


def _floor_vector(bands: tuple, floor_mag_max) -> np.ndarray:
    """(n_b,) floor maxima from None (recommended), a scalar, {band: mag} or a sequence."""
    if floor_mag_max is None:
        missing = [b for b in bands if b not in RECOMMENDED_FLOOR_MAG_MAX]
        if missing:
            raise KeyError(f"no recommended calibration floor for band(s) {missing}; pass "
                           "floor_mag_max={band: mag, ...}")
        floor_mag_max = RECOMMENDED_FLOOR_MAG_MAX
    if isinstance(floor_mag_max, dict):
        missing = [b for b in bands if b not in floor_mag_max]
        if missing:
            raise KeyError(f"floor_mag_max has no value for band(s) {missing}")
        floor_mag_max = [floor_mag_max[b] for b in bands]
    v = np.broadcast_to(np.asarray(floor_mag_max, np.float64), (len(bands),)).copy()
    if not np.all(np.isfinite(v) & (v >= 0)):
        raise ValueError(f"floor_mag_max must be finite and >= 0, got {v.tolist()}")
    return v


def with_calibration_floor(noise: NoiseModel, floor_mag_max=None,
                           p_zero: float = RECOMMENDED_FLOOR_P_ZERO) -> NoiseModel:
    """``noise`` with a per-row calibration floor switched on (module docstring).

    floor_mag_max: None (:data:`RECOMMENDED_FLOOR_MAG_MAX`: u 0.08, griz 0.05, FUV 0.08, NUV
    0.05 mag), a scalar for every band, {band: mag} or an (n_b,) sequence in ``noise.bands``
    order; p_zero: probability in [0, 1) that a row has no floor (default
    :data:`RECOMMENDED_FLOOR_P_ZERO` = 0.5). The floor is saved with the model (to_dict / JSON,
    hence in a training set's manifest).
    """
    bands = tuple(noise.bands)
    v = _floor_vector(bands, floor_mag_max)
    if not 0.0 <= float(p_zero) < 1.0:
        raise ValueError(f"p_zero must be in [0, 1), got {p_zero}")
    return dataclasses.replace(noise, floor_mag_max=jnp.asarray(v, jnp.float32),
                               floor_p_zero=float(p_zero))


def default_noise_model(bands: Sequence[str] = SDSS_BANDS, *,
                        calibration_floor: bool = False) -> NoiseModel:
    """The shipped noise model for ``bands`` (default SDSS ugriz), in that order.

    SDSS ugriz: fitted to 9,264 real SDSS Main-sample galaxies (NYU-VAGC via kcorrect's test
    catalog, MODELFLUX, 0.01 < z < 0.2, extinction corrected). GALEX FUV/NUV: fitted to the few
    hundred GALEX-detected galaxies of the same catalog (see the table's metadata). Raises
    KeyError for a band no shipped table holds.

    calibration_floor: True switches on the recommended floor (:func:`with_calibration_floor`
    with its defaults: half the rows without a floor, the other half c_b ~ U(0, max_b) with max
    u 0.08, griz 0.05 mag), so that catalogs with calibration floors in their errors (NSA:
    sigma_mag >= 0.02 in gri) lie inside the training support; False (default) is the fitted
    SDSS MODELFLUX model as is (i-band sigma_mag <= ~0.02).
    """
    bands = (bands,) if isinstance(bands, str) else tuple(bands)
    unknown = [b for b in bands if b not in available_default_bands()]
    if unknown:
        raise KeyError(
            f"no shipped noise table for band(s) {unknown}; shipped: {list(available_default_bands())}. "
            "Fit one from your catalog with sedflow_jax.sim.noise_fit.fit_noise_model(...).")
    models = []
    for fname, held in DEFAULT_TABLES.items():
        want = [b for b in bands if b in held]
        if want:
            ref = resources.files("sedflow_jax") / "data" / fname
            with resources.as_file(ref) as p:
                models.append(NoiseModel.load(p).select(want))
    model = models[0] if len(models) == 1 else NoiseModel.concatenate(models)
    model = model.select(bands)
    return with_calibration_floor(model) if calibration_floor else model
