"""Catalog I/O: photometry tables in, the flow's conditioning vector out, with bad rows flagged.

Default column layout (what :func:`sedflow_jax.mock_catalog` writes and ``infer`` reads):
``flux_<band>`` [nanomaggies], ``flux_ivar_<band>`` [nanomaggies^-2] for each model band
(e.g. ``flux_sdss_r``), and ``z``. Other layouts map through ``flux_fmt`` / ``ivar_fmt`` /
``z_col``; SDSS/NSA-style vector columns (``NMGY`` (n, n_bands) + ``NMGY_IVAR``) through
``vector_flux`` / ``vector_ivar``.

Nothing is silently dropped: every row gets a ``flag`` bit mask and the counts are returned.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

MAG_PER_LN = 2.5 / np.log(10.0)

FLAG_NONFINITE = 1  # NaN / inf flux, ivar or z
FLAG_NONPOSITIVE_FLUX = 2  # flux <= 0: no magnitude
FLAG_BAD_IVAR = 4  # ivar <= 0
FLAG_Z_RANGE = 8  # redshift outside the model / training range
FLAG_NAMES = {FLAG_NONFINITE: "non-finite value", FLAG_NONPOSITIVE_FLUX: "flux <= 0",
              FLAG_BAD_IVAR: "ivar <= 0", FLAG_Z_RANGE: "redshift out of range"}


class CatalogError(ValueError):
    """A catalog the reader cannot use (missing columns, wrong shapes, units)."""


class Photometry(NamedTuple):
    """flux, sigma : (n, n_bands) nanomaggies; z : (n,); flag : (n,) int bit mask (0 = usable);
    counts : dict flag name -> number of rows; bands : tuple of band names."""

    flux: np.ndarray
    sigma: np.ndarray
    z: np.ndarray
    flag: np.ndarray
    counts: dict
    bands: tuple


def read_table(table):
    """An astropy Table from a Table or a path (FITS, ECSV, CSV, HDF5 by extension)."""
    from astropy.table import Table

    if isinstance(table, Table):
        return table
    return Table.read(table)


def read_photometry(table, bands: Sequence[str], *, flux_fmt="flux_{band}",
                    ivar_fmt="flux_ivar_{band}", z_col="z", vector_flux=None, vector_ivar=None,
                    z_range=None) -> Photometry:
    """Read fluxes, sigmas and redshifts of ``bands`` and flag unusable rows."""
    t = read_table(table)
    bands = tuple(bands)
    if vector_flux is not None:
        for c in (vector_flux, vector_ivar):
            if c not in t.colnames:
                raise CatalogError(f"catalog has no column {c!r}")
        flux = np.asarray(t[vector_flux], float)
        ivar = np.asarray(t[vector_ivar], float)
        if flux.ndim != 2 or flux.shape[1] != len(bands) or ivar.shape != flux.shape:
            raise CatalogError(f"{vector_flux}/{vector_ivar} must have shape (n, {len(bands)})")
    else:
        fc = [flux_fmt.format(band=b) for b in bands]
        ic = [ivar_fmt.format(band=b) for b in bands]
        missing = [c for c in fc + ic if c not in t.colnames]
        if missing:
            raise CatalogError(f"catalog is missing columns {missing} (have {t.colnames[:20]})")
        for c in fc:
            unit = getattr(t[c], "unit", None)
            if unit is not None and str(unit) not in ("nanomaggy", "nmgy", "nanomaggies", ""):
                raise CatalogError(f"column {c} has unit {unit}; fluxes must be in nanomaggies")
        flux = np.column_stack([np.asarray(t[c], float) for c in fc])
        ivar = np.column_stack([np.asarray(t[c], float) for c in ic])
    if z_col not in t.colnames:
        raise CatalogError(f"catalog has no redshift column {z_col!r}")
    z = np.asarray(t[z_col], float)
    flag = np.zeros(len(t), int)
    bad = ~(np.isfinite(flux).all(1) & np.isfinite(ivar).all(1) & np.isfinite(z))
    flag[bad] |= FLAG_NONFINITE
    with np.errstate(invalid="ignore"):
        flag[(flux <= 0).any(1)] |= FLAG_NONPOSITIVE_FLUX
        flag[(ivar <= 0).any(1)] |= FLAG_BAD_IVAR
        if z_range is not None:
            flag[~((z > z_range[0]) & (z <= z_range[1]))] |= FLAG_Z_RANGE
        sigma = np.where(ivar > 0, 1.0 / np.sqrt(np.where(ivar > 0, ivar, 1.0)), np.nan)
    counts = {name: int(np.sum(flag & bit > 0)) for bit, name in FLAG_NAMES.items()}
    counts["usable"] = int(np.sum(flag == 0))
    return Photometry(flux, sigma, z, flag, counts, bands)


def to_conditioning(flux, sigma, z):
    """SEDflow's x = [mag_b..., sigma_mag_b..., z] (n, 2 n_bands + 1); NaN where flux <= 0."""
    flux = np.asarray(flux, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(flux > 0, 22.5 - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)
        smag = np.where(flux > 0, MAG_PER_LN * np.asarray(sigma, float) / flux, np.nan)
    return np.column_stack([mag, smag, np.asarray(z, float)])


def x_names(bands: Sequence[str]):
    return tuple(f"mag_{b}" for b in bands) + tuple(f"sigma_mag_{b}" for b in bands) + ("z",)


def mock_catalog(key, n: int, *, model=None, prior=None, noise=None, max_tries: int = 10):
    """An astropy Table of ``n`` mock galaxies drawn from the prior, with known truths.

    Columns: the 12 true parameters (``logmstar``, ``beta1``, ... as in
    :data:`sedflow_jax.model.PARAM_NAMES`), ``z``, noisy ``flux_<band>`` and ``flux_ivar_<band>``
    [nanomaggies, nanomaggies^-2] (the layout ``infer`` reads), and the noiseless
    ``flux_model_<band>``. Rows failing the noise model's cuts are redrawn (the training set's
    keep rule), so every row is a usable galaxy. ``key``: int seed or jax key.
    """
    from astropy.table import Table

    from . import simulation as S
    from .model import PARAM_NAMES

    got, tries = [], 0
    need = int(n)
    if need <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    import jax

    base = jax.random.key(key) if isinstance(key, (int, np.integer)) else key
    while need > 0 and tries < max_tries:
        r = S.simulate(jax.random.fold_in(base, tries), int(need * 1.3) + 16, model, prior, noise,
                       include_flux=True, progress=False)
        k = np.asarray(r.keep)
        got.append({a: np.asarray(getattr(r, a))[k] for a in
                    ("theta", "z", "flux", "sigma", "flux_model")})
        need -= int(k.sum())
        tries += 1
        bands = tuple(r.manifest["bands"])
    cat = {a: np.concatenate([g[a] for g in got])[:n] for a in got[0]}
    if len(cat["z"]) < n:
        raise RuntimeError(f"only {len(cat['z'])} of {n} mock rows passed the noise cuts")
    t = Table()
    for i, name in enumerate(PARAM_NAMES):
        t[name] = cat["theta"][:, i]
    t["z"] = cat["z"]
    for j, b in enumerate(bands):
        t[f"flux_{b}"] = cat["flux"][:, j]
        t[f"flux_{b}"].unit = "nanomaggy"
        t[f"flux_ivar_{b}"] = 1.0 / cat["sigma"][:, j] ** 2
        t[f"flux_model_{b}"] = cat["flux_model"][:, j]
        t[f"flux_model_{b}"].unit = "nanomaggy"
    t.meta["bands"] = list(bands)
    t.meta["origin"] = "sedflow_jax.mock_catalog (prior draws + noise model)"
    return t
