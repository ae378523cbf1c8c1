"""SEDflow's conditioning vector ``x`` (the layout is written once, here).

``x = [mag_b ..., sigma_mag_b ..., z]`` (2 n_bands + 1 columns) with
``mag = 22.5 - 2.5 log10 f`` and ``sigma_mag = 2.5 / ln 10 * sigma_f / f`` of the *observed*
(noisy) flux ``f`` [nanomaggies] and its error ``sigma_f``: relative to the noisy flux, as a
real catalog's errors are. Both NaN where ``f <= 0`` (no magnitude).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..sed.units import MAG_PER_LN, NMGY_ZERO_POINT

__all__ = ["x_names", "to_conditioning", "n_bands_from_x"]


def x_names(bands: Sequence[str]) -> tuple:
    """Column names of x for these bands: ``mag_<b>`` ..., ``sigma_mag_<b>`` ..., ``z``."""
    bands = tuple(bands)
    return tuple(f"mag_{b}" for b in bands) + tuple(f"sigma_mag_{b}" for b in bands) + ("z",)


def n_bands_from_x(d: int) -> int:
    """Number of bands of an x with ``d`` columns (2 n_bands + 1)."""
    if d < 3 or (d - 1) % 2:
        raise ValueError(f"a SEDflow context has 2 n_bands + 1 columns; got {d}")
    return (d - 1) // 2


def to_conditioning(flux, sigma, z, *, xp=np):
    """x (n, 2 n_bands + 1) of fluxes / errors (n, n_bands) [nanomaggies] and z (n,).

    ``xp=np`` (default): float64 numpy, for catalogs; ``xp=jax.numpy``: traceable, in the
    inputs' dtype (the simulation kernel, float32)."""
    if xp is np:
        flux = np.asarray(flux, float)
        sigma = np.asarray(sigma, float)
        z = np.asarray(z, float)
    pos = flux > 0
    safe = xp.where(pos, flux, 1.0)
    nan = xp.asarray(np.nan, dtype=safe.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = xp.where(pos, NMGY_ZERO_POINT - 2.5 * xp.log10(safe), nan)
        smag = xp.where(pos, MAG_PER_LN * sigma / safe, nan)
    return xp.concatenate([mag, smag, z[:, None].astype(mag.dtype)], axis=-1)
