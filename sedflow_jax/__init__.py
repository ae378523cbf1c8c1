"""sedflow-jax: a JAX-native, differentiable PROVABGS SED model and SEDflow amortized posteriors.

Public entry points (imported lazily so that ``import sedflow_jax`` stays cheap and never touches
global JAX configuration):

- :func:`load_model` -> :class:`SEDModel` (photometry / sed / derived of the PROVABGS model)
- :func:`load_ssp_grid`, :class:`SSPGrid` (the shipped BC03 grid, DSPS HDF5 FSPS grids)
- :func:`simulate` (training sets), :func:`mock_catalog` (mock galaxies with known truths)
- :func:`read_photometry` (catalogs as users have them: short band names, NSA NMGY, SDSS
  MODELFLUX recognised), :func:`catalog_bands` (which bands a catalog provides)
- :func:`load_posterior` (use without training: a shipped model by name, or the one matching a
  catalog's bands), :func:`available_posteriors`
- :func:`train_posterior` -> :class:`AmortizedPosterior` (sample / sample_batched / log_prob)
- :func:`infer_catalog` (plain, in memory) and :func:`infer_catalog_streaming` (chunked,
  resumable, over devices and hosts): posteriors for whole catalogs

The package is layered (see ``docs/architecture.md``): ``sed`` (physics) and ``nn`` (flows) at
the bottom, then ``sim`` (priors, noise, training sets), ``io`` (catalogs), ``sbi`` and ``mcmc``
(inference), ``eval`` (diagnostics), and ``cli`` / ``demo`` on top.
"""
from __future__ import annotations

import importlib

from .version import __version__

__all__ = ["__version__"]  # plus the lazy names below (dir(sedflow_jax) lists them)

_LAZY = {
    "load_model": "sedflow_jax.sed.model",
    "SEDModel": "sedflow_jax.sed.model",
    "ModelConfig": "sedflow_jax.sed.model",
    "PARAM_NAMES": "sedflow_jax.sed.params",
    "SAMPLING_NAMES": "sedflow_jax.sed.params",
    "load_ssp_grid": "sedflow_jax.sed.ssp",
    "load_dsps_hdf5": "sedflow_jax.sed.ssp",
    "SSPGrid": "sedflow_jax.sed.ssp",
    "load_filter": "sedflow_jax.sed.photometry",
    "Filter": "sedflow_jax.sed.photometry",
    "simulate": "sedflow_jax.sim.simulate",
    "load_training_set": "sedflow_jax.sim.readers",
    "provabgs_prior": "sedflow_jax.sim.prior",
    "default_noise_model": "sedflow_jax.sim.noise",
    "fit_noise_model": "sedflow_jax.sim.noise_fit",
    "mock_catalog": "sedflow_jax.io.mocks",
    "read_photometry": "sedflow_jax.io.catalog",
    "ColumnSpec": "sedflow_jax.io.catalog",
    "catalog_bands": "sedflow_jax.io.catalog",
    "AmortizedPosterior": "sedflow_jax.sbi.posterior",
    "train_posterior": "sedflow_jax.sbi.training",
    "load_posterior": "sedflow_jax.sbi.defaults",
    "available_posteriors": "sedflow_jax.sbi.defaults",
    "infer_catalog": "sedflow_jax.sbi.inference",
    "infer_catalog_streaming": "sedflow_jax.sbi.streaming",
}


def __getattr__(name):  # PEP 562 lazy attributes
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sedflow_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
