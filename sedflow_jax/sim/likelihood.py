"""The Gaussian photometric likelihood of observed fluxes (written once, here).

``log L = -1/2 r^T C^-1 r`` with ``r = model flux - observed flux`` [nanomaggies] over the usable
bands, without the normalisation constant (as PROVABGS; it cancels in every posterior and in
self-normalised importance weights). ``C = diag(sigma^2)`` or a full covariance. Bands with a
non-finite flux or sigma, ``sigma <= 0``, or ``mask=False`` are left out.

float32: the precision matrix ``C^-1`` (``diag(1/sigma^2)``, or ``L^-T L^-1`` from a Cholesky
factor ``C = L L^T``) is formed in float64 and cast once; ``-1/2 r^T (C^-1 r)`` is then exact to
float32 rounding for any realistic errors (sigma > ~1e-19 nmgy) and chi^2 < ~3e38. A chi^2 that
overflows gives log L = -inf (a zero weight / rejected point), never NaN.

:func:`likelihood_data` sanitises one galaxy (numpy; raises when no band is usable),
:func:`likelihood_data_batch` a catalog (vectorised; returns a ``usable`` flag instead of
raising), :func:`log_likelihood` is the jit/vmap-able density of model fluxes.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["likelihood_data", "likelihood_data_batch", "log_likelihood"]


def _usable(flux, sigma, mask):
    ok = np.isfinite(flux)
    if mask is not None:
        ok &= np.broadcast_to(np.asarray(mask, bool), flux.shape)
    if sigma is not None:
        with np.errstate(invalid="ignore"):
            ok &= np.isfinite(sigma) & (sigma > 0)
    return ok


def _precision_of_cov(cov, ok):
    """(C^-1 (nb, nb) over the used bands, 0 elsewhere, float64; updated ok) of a covariance."""
    nb = ok.shape[0]
    ok = ok & np.isfinite(np.diag(cov)) & (np.diag(cov) > 0)
    ok &= np.all(np.isfinite(cov) | ~ok[None, :], axis=1)
    prec = np.zeros((nb, nb))
    if ok.any():
        sub = cov[np.ix_(ok, ok)]
        try:
            chol = np.linalg.cholesky(sub)
        except np.linalg.LinAlgError as exc:
            raise ValueError("covariance of the used bands is not positive definite") from exc
        inv_l = np.linalg.inv(chol)
        prec[np.ix_(ok, ok)] = inv_l.T @ inv_l
    return prec, ok


def likelihood_data(flux, sigma=None, *, mask=None, cov=None) -> dict:
    """Sanitised likelihood inputs of one galaxy.

    flux : (n_b,) nanomaggies; sigma : (n_b,) nanomaggies (ignored when ``cov`` is given);
    mask : (n_b,) bool, False = leave the band out; cov : (n_b, n_b) covariance [nmgy^2].
    Returns numpy arrays ``{'flux' (n_b,) float32 (0 where unused), 'prec' (n_b, n_b) float32
    inverse covariance over the used bands (0 rows / columns elsewhere), 'ok' (n_b,) bool}``.
    Raises ValueError when no band is usable.
    """
    flux = np.atleast_1d(np.asarray(flux, np.float64))
    nb = flux.shape[0]
    if cov is not None:
        cov = np.asarray(cov, np.float64)
        if cov.shape != (nb, nb):
            raise ValueError(f"cov must have shape ({nb}, {nb}), got {cov.shape}")
        prec, ok = _precision_of_cov(cov, _usable(flux, None, mask))
    else:
        if sigma is None:
            raise ValueError("give sigma or cov")
        sigma = np.broadcast_to(np.asarray(sigma, np.float64), (nb,))
        ok = _usable(flux, sigma, mask)
        prec = np.diag(np.where(ok, 1.0 / np.where(ok, sigma, 1.0) ** 2, 0.0))
    if not ok.any():
        raise ValueError("no usable band (all fluxes / sigmas non-finite, sigma <= 0, or masked)")
    return dict(flux=np.where(ok, flux, 0.0).astype(np.float32),
                prec=prec.astype(np.float32), ok=ok)


def likelihood_data_batch(flux, sigma, mask=None) -> dict:
    """:func:`likelihood_data` of m galaxies with diagonal errors, vectorised.

    flux, sigma : (m, n_b) nanomaggies; mask : (m, n_b) bool or None. Returns ``{'flux' (m, n_b),
    'prec' (m, n_b, n_b), 'ok' (m, n_b), 'usable' (m,) bool}`` (a galaxy without a usable band
    has ``usable=False`` and contributes log L = 0; the caller flags it).
    """
    flux = np.atleast_2d(np.asarray(flux, np.float64))
    sigma = np.broadcast_to(np.asarray(sigma, np.float64), flux.shape)
    ok = _usable(flux, sigma, mask)
    inv = np.where(ok, 1.0 / np.where(ok, sigma, 1.0) ** 2, 0.0)
    prec = inv[:, :, None] * np.eye(flux.shape[1])[None]
    return dict(flux=np.where(ok, flux, 0.0).astype(np.float32), prec=prec.astype(np.float32),
                ok=ok, usable=ok.any(1))


def log_likelihood(pred, data):
    """``-1/2 r^T C^-1 r``, r = pred - flux over the usable bands (jit-able; vmap it for many).

    pred : (n_b,) model fluxes [nanomaggies] of one point; data : one galaxy's
    :func:`likelihood_data` (or jnp arrays of it). Returns a scalar; -inf when chi^2 overflows.
    """
    r = jnp.where(data["ok"], pred - data["flux"], 0.0)
    chi2 = r @ (data["prec"] @ r)
    return jnp.where(jnp.isnan(chi2), -jnp.inf, -0.5 * chi2)
