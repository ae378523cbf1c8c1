"""Filters and AB synthetic photometry in nanomaggies (photon counting, as speclite does).

maggies = int f_lambda(l) R(l) l dl / int f_lambda^AB(l) R(l) l dl,  f_lambda^AB = 3631 Jy c / l^2.

As in speclite's ``get_ab_maggies``: the numerator is a trapezoid sum on the *spectrum's* wavelength
grid with the response linearly interpolated onto it (zero outside the curve); the AB normalisation
is the trapezoid integral on the filter's own nodes. Results are multiplied by 1e9 (nanomaggies):
mag_AB = 22.5 - 2.5 log10(nMgy).

Shipped filters (sedflow_jax/data/filters, licences beside them):
``sdss_u sdss_g sdss_r sdss_i sdss_z`` (speclite ``sdss2010noatm-*``: what SEDflow used),
``galex_fuv galex_nuv`` (from provabgs). Any speclite name (e.g. ``decam2014-g``) is loaded through
speclite; a user curve is a :class:`Filter` or a ``(name, wave, response)`` tuple.
"""
from __future__ import annotations

import dataclasses
from importlib import resources
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .units import AB_FNU_CGS, C_ANGSTROM_S, GALEX_BANDS, MPC_CM, SDSS_BANDS

SHIPPED_FILTERS = SDSS_BANDS + GALEX_BANDS
DEFAULT_FILTERS = SDSS_BANDS


class FilterError(ValueError):
    """Unknown filter name or an invalid response curve."""


@dataclasses.dataclass(frozen=True, eq=False)
class Filter:
    """A response curve: ``wave`` [Angstrom, observed frame] increasing, ``response`` >= 0."""

    name: str
    wave: np.ndarray
    response: np.ndarray

    def __post_init__(self):
        w = np.asarray(self.wave, float)
        r = np.asarray(self.response, float)
        if w.ndim != 1 or w.shape != r.shape or w.size < 3:
            raise FilterError(f"filter {self.name!r}: wave and response must be 1-D, same length >= 3")
        if not np.all(np.diff(w) > 0) or w[0] <= 0:
            raise FilterError(f"filter {self.name!r}: wavelengths must be positive and increasing")
        if not np.all(np.isfinite(r)) or np.any(r < 0) or not np.any(r > 0):
            raise FilterError(f"filter {self.name!r}: response must be finite, >= 0, not all 0")
        object.__setattr__(self, "wave", w)
        object.__setattr__(self, "response", r)

    @property
    def ab_norm(self) -> float:
        """int f_lambda^AB R lambda dl / (3631 Jy c) = int R / lambda dl (trapezoid, filter nodes)."""
        return float(np.trapezoid(self.response / self.wave, self.wave))

    @property
    def effective_wavelength(self) -> float:
        return float(np.trapezoid(self.response * self.wave**2, self.wave) /
                     np.trapezoid(self.response * self.wave, self.wave))

    def __repr__(self):
        return f"Filter({self.name!r}, {self.wave[0]:.0f}-{self.wave[-1]:.0f} A)"


def _read_ecsv(path, name) -> Filter:
    from astropy.table import Table

    t = Table.read(path, format="ascii.ecsv")
    return Filter(name, np.asarray(t["wavelength"], float), np.asarray(t["response"], float))


def load_filter(spec) -> Filter:
    """A :class:`Filter` from a shipped name, a speclite name, a Filter, or (name, wave, response)."""
    if isinstance(spec, Filter):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) == 3:
        return Filter(str(spec[0]), np.asarray(spec[1]), np.asarray(spec[2]))
    if not isinstance(spec, str):
        raise FilterError(f"cannot interpret {spec!r} as a filter")
    if spec in SHIPPED_FILTERS:
        with resources.as_file(resources.files("sedflow_jax") / "data" / "filters") as p:
            return _read_ecsv(p / f"{spec}.ecsv", spec)
    try:
        import speclite.filters as slf

        f = slf.load_filter(spec)
    except Exception as exc:  # unknown to speclite too
        raise FilterError(
            f"unknown filter {spec!r}: use one of {SHIPPED_FILTERS}, a speclite name "
            "(e.g. 'decam2014-g'), or pass (name, wave_angstrom, response)"
        ) from exc
    return Filter(spec, np.asarray(f.wavelength, float), np.asarray(f.response, float))


def load_filters(specs: Sequence | None) -> tuple[Filter, ...]:
    specs = DEFAULT_FILTERS if specs is None else specs
    if isinstance(specs, (str, Filter)):
        specs = [specs]
    out = tuple(load_filter(s) for s in specs)
    names = [f.name for f in out]
    if len(set(names)) != len(names):
        raise FilterError(f"duplicate filter names in {names}")
    return out


def trapezoid_weights(x):
    """Node weights w such that sum(w * y) == np.trapezoid(y, x). numpy (n,)."""
    x = np.asarray(x, float)
    d = np.diff(x)
    w = np.zeros_like(x)
    w[:-1] += 0.5 * d
    w[1:] += 0.5 * d
    return w


class PhotTables(NamedTuple):
    """Galaxy-independent photometry constants for a rest-frame wavelength slice.

    The observed-frame transmission R_f(lambda (1+z)) * lambda * (trapezoid weight) is tabulated
    on a uniform redshift grid (step ``dz``) and interpolated linearly in z: the band integral of
    a fixed spectrum is smooth in z, so the error is ~ dz^2/8 |d^2 ln F/dz^2| < 1e-5 mag. Each
    filter only keeps the window of rest-frame nodes it can see, starting at ``starts[f]``.

    wave : (n_w,) rest-frame nodes [Angstrom]; lw : (n_w,) lambda * trapezoid weight [A^2];
    tz : tuple over filters of (n_z, width_f) tabulated transmissions; dz : grid step;
    starts : tuple of window starts;
    log_k : (n_f,) ln of [lsun * 1e9 / (4 pi Mpc^2 * 3631 Jy * c * int R/l dl)] (see model).
    """

    wave: jnp.ndarray
    lw: jnp.ndarray
    tz: tuple
    dz: float
    starts: tuple
    log_k: jnp.ndarray


def _support(f: Filter):
    """(lo, hi) observed wavelengths outside which the response is zero."""
    nz = np.nonzero(f.response > 0)[0]
    return f.wave[max(nz[0] - 1, 0)], f.wave[min(nz[-1] + 1, len(f.wave) - 1)]


def phot_slice(wave_rest, filters: Sequence[Filter], z_max: float):
    """Index slice of ``wave_rest`` covering every filter for 0 < z <= z_max (one node padding)."""
    lo = min(_support(f)[0] for f in filters) / (1.0 + z_max)
    hi = max(_support(f)[1] for f in filters)
    if wave_rest[0] > lo or wave_rest[-1] < hi:
        raise FilterError(
            f"SSP grid wavelengths {wave_rest[0]:.0f}-{wave_rest[-1]:.0f} A (rest) do not cover the "
            f"filters ({lo:.0f}-{hi:.0f} A rest) for redshifts up to {z_max}"
        )
    i0 = max(int(np.searchsorted(wave_rest, lo, side="right")) - 2, 0)
    i1 = min(int(np.searchsorted(wave_rest, hi, side="left")) + 2, len(wave_rest))
    return slice(i0, i1)


def phot_tables(wave_rest, filters: Sequence[Filter], lsun_cgs: float, z_max: float,
                dz: float = 5e-4, dtype=jnp.float32):
    """Build :class:`PhotTables` for the (already sliced) rest wavelengths ``wave_rest``."""
    w = np.asarray(wave_rest, float)
    lw = w * trapezoid_weights(w)
    log_k = [
        np.log(lsun_cgs * 1e9 / (4.0 * np.pi * MPC_CM**2 * AB_FNU_CGS * C_ANGSTROM_S * f.ab_norm))
        for f in filters
    ]
    n_z = int(np.ceil(z_max / dz)) + 2
    zg = np.arange(n_z) * dz
    windows = []
    for f in filters:
        lo, hi = _support(f)
        i0 = max(int(np.searchsorted(w, lo / (1 + zg[-1]), side="right")) - 1, 0)
        i1 = min(int(np.searchsorted(w, hi, side="left")) + 1, len(w))
        windows.append((i0, i1))
    tz = []
    for f, (i0, i1) in zip(filters, windows):
        lam_obs = w[None, i0:i1] * (1.0 + zg[:, None])
        tz.append(np.interp(lam_obs, f.wave, f.response, left=0.0, right=0.0) * lw[None, i0:i1])
    return PhotTables(
        wave=jnp.asarray(w, dtype),
        lw=jnp.asarray(lw, dtype),
        tz=tuple(jnp.asarray(t, dtype) for t in tz),
        dz=float(dz),
        starts=tuple(a for a, _ in windows),
        log_k=jnp.asarray(log_k, dtype),
    )


def band_integrals(lum, z, tables: PhotTables):
    """sum_n L_n R_f(lambda_n (1+z)) lambda_n w_n for each filter: lum (n_w,) -> (n_f,)."""
    u = z / tables.dz
    i = jnp.clip(jnp.floor(u).astype(jnp.int32), 0, tables.tz[0].shape[0] - 2)
    a = u - i
    out = []
    for tz, s in zip(tables.tz, tables.starts):
        t = tz[i] * (1.0 - a) + tz[i + 1] * a  # (width_f,)
        out.append(jnp.dot(jax.lax.dynamic_slice_in_dim(lum, s, tz.shape[1]), t))
    return jnp.stack(out)


def ab_nanomaggies(wave_obs, flam, filters: Sequence[Filter]):
    """AB nanomaggies of an observed spectrum (numpy, float64).

    wave_obs : (n,) [Angstrom]; flam : (..., n) f_lambda [erg/s/cm^2/A]. Returns (..., n_filters).
    The spectrum must cover each filter's full curve (as speclite requires).
    """
    w = np.asarray(wave_obs, float)
    flam = np.asarray(flam, float)
    tw = trapezoid_weights(w)
    out = []
    for f in filters:
        if w[0] > f.wave[0] or w[-1] < f.wave[-1]:
            raise FilterError(f"spectrum {w[0]:.0f}-{w[-1]:.0f} A does not cover filter {f.name}")
        r = np.interp(w, f.wave, f.response, left=0.0, right=0.0)
        num = np.sum(flam * r * w * tw, axis=-1)
        out.append(1e9 * num / (AB_FNU_CGS * C_ANGSTROM_S * f.ab_norm))
    return np.stack(out, axis=-1)


def nmgy_to_mag(nmgy):
    """AB magnitude from nanomaggies: 22.5 - 2.5 log10(f)."""
    return 22.5 - 2.5 * jnp.log10(nmgy)
