"""sedflow-jax: a JAX-native, differentiable PROVABGS SED model and SEDflow amortized posteriors.

Public entry points (imported lazily so that ``import sedflow_jax`` stays cheap and never touches
global JAX configuration):

- :func:`load_model` -> :class:`SEDModel` (photometry / sed / derived of the PROVABGS model)
- :func:`load_ssp_grid`, :class:`SSPGrid` (the shipped BC03 grid, DSPS HDF5 FSPS grids)
- :func:`simulate` (training sets), :func:`mock_catalog` (mock galaxies with known truths)
- :func:`train_posterior` -> :class:`AmortizedPosterior` (sample / sample_batched / log_prob)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": "sedflow_jax.model",
    "SEDModel": "sedflow_jax.model",
    "ModelConfig": "sedflow_jax.model",
    "PARAM_NAMES": "sedflow_jax.model",
    "load_ssp_grid": "sedflow_jax.ssp",
    "load_dsps_hdf5": "sedflow_jax.ssp",
    "SSPGrid": "sedflow_jax.ssp",
    "load_filter": "sedflow_jax.photometry",
    "Filter": "sedflow_jax.photometry",
    "simulate": "sedflow_jax.simulation",
    "load_training_set": "sedflow_jax.simulation",
    "mock_catalog": "sedflow_jax.catalog",
    "read_photometry": "sedflow_jax.catalog",
    "AmortizedPosterior": "sedflow_jax.posterior",
    "train_posterior": "sedflow_jax.posterior",
    "provabgs_prior": "sedflow_jax.prior",
    "default_noise_model": "sedflow_jax.noise",
    "fit_noise_model": "sedflow_jax.noise",
}


def __getattr__(name):  # PEP 562 lazy attributes
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sedflow_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
