"""Mock galaxies with known truths: whole catalogs drawn like the training set, and single
galaxies at a fixed redshift (for MCMC checks and benchmarks)."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..sed.params import PARAM_NAMES
from ..sim import noise as N
from ..sim import prior as P
from ..sim.simulate import simulate
from ..util import as_key

__all__ = ["mock_catalog", "mock_truths", "MockGalaxy", "mock_galaxy"]


def mock_catalog(key, n: int, *, model=None, prior=None, noise=None, max_tries: int = 10):
    """An astropy Table of ``n`` mock galaxies drawn from the prior, with known truths.

    Columns: the 12 true parameters (``logmstar``, ``beta1``, ... as in
    :data:`sedflow_jax.sed.params.PARAM_NAMES`), ``z``, noisy ``flux_<band>`` and ``flux_ivar_<band>``
    [nanomaggies, nanomaggies^-2] (the layout ``infer`` reads), and the noiseless
    ``flux_model_<band>``. Rows failing the noise model's cuts are redrawn (the training set's
    keep rule), so every row is a usable galaxy. ``key``: int seed or jax key.
    """
    from astropy.table import Table

    got, tries = [], 0
    need = int(n)
    if need <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    base = as_key(key)
    while need > 0 and tries < max_tries:
        r = simulate(jax.random.fold_in(base, tries), int(need * 1.3) + 16, model, prior, noise,
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


class MockGalaxy(NamedTuple):
    """One mock galaxy at a fixed redshift: the truth and its noisy photometry."""

    s: np.ndarray  # (11,) true parameters in the sampling space
    theta: np.ndarray  # (12,) true PROVABGS parameters
    flux: np.ndarray  # (n_bands,) noisy fluxes [nanomaggies], float64
    sigma: np.ndarray  # (n_bands,) their 1-sigma errors [nanomaggies], float64


def mock_galaxy(model, z: float, key_theta, key_noise, *, prior=None, noise=None) -> MockGalaxy:
    """A single mock galaxy: s ~ ``prior`` (default PROVABGS) drawn with ``key_theta``, the
    model's photometry at redshift ``z``, noise from ``noise`` (default: the package's noise
    model for ``model.filter_names``) drawn with ``key_noise``. Unlike :func:`mock_catalog`
    nothing is redrawn: the noise model's cuts are not applied (MCMC fits any such galaxy).
    Keys: jax PRNG keys or int seeds."""
    prior = prior or P.provabgs_prior()
    noise = noise or N.default_noise_model(model.filter_names)
    s = np.asarray(P.sample_sampling(as_key(key_theta), prior, 1))[0]
    theta = np.asarray(P.from_sampling(jnp.asarray(s)))
    noisy = N.add_noise(as_key(key_noise), noise, model.photometry(theta, z))
    return MockGalaxy(s, theta, np.asarray(noisy.flux, np.float64),
                      np.asarray(noisy.sigma, np.float64))


def mock_truths(table) -> tuple:
    """The true parameters of a mock catalog's rows: ``(theta (n, 12) float64 in PARAM_NAMES
    order, s (n, 11) float32 in the sampling space)``."""
    missing = [c for c in PARAM_NAMES if c not in table.colnames]
    if missing:
        raise ValueError(f"not a mock catalog: no truth columns {missing}")
    theta = np.column_stack([np.asarray(table[name], float) for name in PARAM_NAMES])
    return theta, np.asarray(P.to_sampling(jnp.asarray(theta, jnp.float32)))
