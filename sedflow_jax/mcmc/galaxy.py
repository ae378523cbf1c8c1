"""The posterior of one galaxy as a :class:`~sedflow_jax.mcmc.target.Target`: the same prior +
likelihood as the flow.

The target lives in the 11-dim sampling space of :mod:`sedflow_jax.sim.prior`::

    s = [logM, u1, u2, u3, fburst, tburst, log10 g1, log10 g2, tau_bc, tau_ism, n_dust]

with

* prior: the PROVABGS box :func:`sedflow_jax.sim.prior.sampling_bounds`, with the density
  :func:`sedflow_jax.sim.prior.log_prob_sampling` -- ``gamma_density='loguniform'`` (uniform
  in log10 gamma: SEDflow's training prior, the default, what the flow must reproduce) or
  ``'flat'`` (flat in gamma, PROVABGS's MCMC; it adds the log-Jacobian ``ln10 (s6 + s7)`` of
  the log10 map);
* likelihood: :func:`sedflow_jax.sim.likelihood.log_likelihood` (the one written for the flow's
  importance sampling too): Gaussian on the photometry in nanomaggies, ``-1/2 r^T C^-1 r`` with
  ``r = model(from_sampling(s), z) - flux`` over the usable bands (diagonal ``C = diag(sigma^2)``
  or a full covariance), no normalisation constant (as PROVABGS). Bands with a non-finite flux or
  sigma, ``sigma <= 0``, or ``mask=False`` are left out.

A target built by :func:`galaxy_target` for the same model / prior / gamma density shares one
log-density function (the data are traced arguments), so a catalog pays the compile of a
sampler once per sampler configuration.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import jax.numpy as jnp
import numpy as np

from ..sim import likelihood as L
from ..sim import prior as P
from .target import Target, condition

__all__ = ["galaxy_log_density", "galaxy_data", "galaxy_target", "resolve_target"]

# one log-density function per (model, prior, gamma_density): targets of different galaxies
# share it, so the compiled samplers are shared too
_GALAXY_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def galaxy_log_density(model, prior: P.Prior, gamma_density: str):
    """``f(x (11,), data) -> log prior + log likelihood`` (data from :func:`galaxy_data`
    plus ``'tables'``: ``model.tables``), one function per (model, prior, gamma_density)."""
    per_model = _GALAXY_FNS.setdefault(model, {})
    key = (prior, gamma_density)
    if key in per_model:
        return per_model[key]
    phot = model.photometry_kernel()
    lo, hi = (np.asarray(a, np.float32) for a in P.sampling_bounds(prior))

    def log_density(x, data):
        xc = jnp.clip(x, lo, hi)
        lp = P.log_prob_sampling(prior, x, gamma_density)  # -inf outside the box
        pred = phot(P.from_sampling(xc), data["z"], data["tables"])
        return lp + L.log_likelihood(pred, data)

    per_model[key] = log_density
    return log_density


def galaxy_data(flux, sigma=None, z=None, *, mask=None, cov=None, z_max=None) -> dict:
    """Sanitised likelihood inputs of one galaxy (float32 arrays).

    flux : (n_b,) nanomaggies; sigma : (n_b,) nanomaggies (ignored when ``cov`` is given);
    z : redshift; mask : (n_b,) bool, False = leave the band out; cov : (n_b, n_b) covariance
    [nanomaggies^2]. Bands with non-finite flux / sigma or sigma <= 0 are masked too.
    Returns :func:`sedflow_jax.sim.likelihood.likelihood_data` as jnp arrays (``'flux'``,
    ``'prec'`` (n_b, n_b) inverse covariance over the used bands (0 elsewhere), ``'ok'``) plus
    ``'z'``. Raises ValueError when no band is usable or z is invalid.
    """
    d = L.likelihood_data(flux, sigma, mask=mask, cov=cov)
    z = float(np.asarray(z, np.float64))
    if not np.isfinite(z) or z <= 0 or (z_max is not None and z > z_max):
        raise ValueError(f"redshift must be finite and in (0, {z_max}], got {z}")
    return dict(flux=jnp.asarray(d["flux"]), prec=jnp.asarray(d["prec"]),
                ok=jnp.asarray(d["ok"]), z=jnp.float32(z))


def galaxy_target(model, flux, sigma=None, z=None, *, mask=None, cov=None,
                  prior: Optional[P.Prior] = None, gamma_density: str = "loguniform",
                  log_tburst: bool = True, fixed: Optional[dict] = None) -> Target:
    """The posterior of one galaxy in the 11-dim sampling space (see the module docstring).

    model : :class:`~sedflow_jax.sed.model.SEDModel` (bands = ``model.filter_names``);
    flux, sigma : (n_b,) nanomaggies; z : redshift; mask / cov : see :func:`galaxy_data`;
    prior : default :func:`sedflow_jax.sim.prior.provabgs_prior`; gamma_density : ``'loguniform'``
    (SEDflow; default) or ``'flat'`` (PROVABGS MCMC); log_tburst : let the unconstrained map
    (NUTS) treat tburst in log space (young bursts change the SED fastest; the posterior density
    is unchanged); fixed : {sampling-coordinate name or index: value} held fixed (see
    :func:`condition`; e.g. ``{'tburst': 2.0}``).
    """
    prior = P.provabgs_prior() if prior is None else prior
    if gamma_density not in ("loguniform", "flat"):
        raise ValueError(f"gamma_density must be 'loguniform' or 'flat', got {gamma_density!r}")
    nb = len(model.filter_names)
    if np.shape(flux) != (nb,):
        raise ValueError(f"flux must have shape ({nb},) in the band order {model.filter_names}")
    # the model's tables travel with the data (traced arguments, not constants of the program)
    data = dict(galaxy_data(flux, sigma, z, mask=mask, cov=cov, z_max=model.config.z_max),
                tables=model.tables)
    lo, hi = (np.asarray(a, np.float64) for a in P.sampling_bounds(prior, jnp.float32))

    def prior_sample(key, n):
        return np.asarray(P.sample_sampling(key, prior, int(n)), np.float64)

    def to_params(s):
        s = np.asarray(s)
        return np.asarray(P.from_sampling(jnp.asarray(s, jnp.float32)))

    target = Target(
        log_density=galaxy_log_density(model, prior, gamma_density),
        low=lo, high=hi, data=data, names=P.SAMPLING_NAMES, to_params=to_params,
        param_names=P.PARAM_NAMES, prior_sample=prior_sample,
        prior_scale=np.asarray(P.sampling_bounds(prior)[1] - P.sampling_bounds(prior)[0],
                               np.float64) / math.sqrt(12.0),
        log_coords=(5,) if log_tburst and lo[5] > 0 else ())
    return condition(target, fixed) if fixed else target



def resolve_target(model_or_target, flux, sigma, z, mask, cov, prior, gamma_density,
                   fixed=None) -> Target:
    """The :class:`Target` a runner samples: ``model_or_target`` itself (conditioned on
    ``fixed``), or :func:`galaxy_target` of an SEDModel and one galaxy's photometry."""
    if isinstance(model_or_target, Target):
        if any(a is not None for a in (flux, sigma, z, mask, cov)):
            raise ValueError("flux/sigma/z/mask/cov are only used with an SEDModel, not a Target")
        return condition(model_or_target, fixed) if fixed else model_or_target
    if flux is None or z is None:
        raise ValueError("give flux, sigma (or cov) and z with an SEDModel")
    return galaxy_target(model_or_target, flux, sigma, z, mask=mask, cov=cov, prior=prior,
                         gamma_density=gamma_density, fixed=fixed)

