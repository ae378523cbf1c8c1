"""The generic target of every sampler: a log density on a box (or on R^d), its unconstrained
parametrisation (used by NUTS), conditioning on fixed coordinates, and the NumPyro model of it.

* :class:`Target`, :func:`make_target` -- ``f(x, data)`` on a box; ``data`` is a traced pytree,
  so one compiled sampler serves many data (many galaxies);
* :func:`condition` -- hold some coordinates fixed;
* :func:`box_affine`, :func:`site_log_density`, :func:`numpyro_model` -- the sampler's site
  ``y``: unconstrained (logit of the box, log-Jacobian added) or an affine image of the box.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

__all__ = ["Target", "make_target", "condition", "box_affine", "site_log_density",
           "numpyro_model", "INIT_MARGIN", "SPACES"]

INIT_MARGIN = 1e-4  # starting points are kept this fraction of the box width off the edges
SPACES = ("unconstrained", "constrained")


@dataclasses.dataclass(frozen=True, eq=False)
class Target:
    """A log density on a box (some or all coordinates may be unbounded).

    log_density : ``f(x (d,), data) -> scalar`` log density (up to a constant) in the
        *constrained* coordinates x; pure JAX; may return -inf outside the support. ``data`` is a
        pytree of arrays passed as a traced argument (so one compiled sampler serves many data).
    low, high : (d,) float64 bounds; -inf / +inf for unbounded sides.
    data : the pytree handed to ``log_density``.
    names : d coordinate names.
    to_params : optional map (..., d) -> (..., p) to physical parameters (numpy or JAX).
    param_names : p names of those.
    prior_sample : optional ``(key, n) -> (n, d)`` prior draws (used by ``init='prior'`` and as
        starting points of the optimiser); default: uniform on the box, N(0, 1) where unbounded.
    prior_scale : optional (d,) prior standard deviations (radius of the ``'optimize'`` ball is
        1e-3 x this); default: box width / sqrt(12), 1 where unbounded.
    log_coords : indices of bounded coordinates with ``low > 0`` that the unconstrained map
        treats in log space, ``x = exp(log lo + (log hi - log lo) sigmoid(y))`` (a better metric
        for scale-like parameters; the target density is unchanged, the Jacobian is included).
    """

    log_density: Callable
    low: np.ndarray
    high: np.ndarray
    data: Any = None
    names: tuple = ()
    to_params: Optional[Callable] = None
    param_names: Optional[tuple] = None
    prior_sample: Optional[Callable] = None
    prior_scale: Optional[np.ndarray] = None
    log_coords: tuple = ()

    def __post_init__(self):
        for i in self.log_coords:
            if not (np.isfinite(self.low[i]) and np.isfinite(self.high[i]) and self.low[i] > 0):
                raise ValueError(f"log_coords: coordinate {i} needs finite bounds with low > 0")

    @property
    def dim(self) -> int:
        return int(self.low.shape[0])

    def replace(self, **kw) -> "Target":
        return dataclasses.replace(self, **kw)

    # ---- the unconstrained parametrisation used by NUTS (and optionally the ensembles) ----
    @property
    def _kinds(self):
        lo_f, hi_f = np.isfinite(self.low), np.isfinite(self.high)
        logc = np.zeros(self.dim, bool)
        logc[list(self.log_coords)] = True
        return (np.flatnonzero(lo_f & hi_f & ~logc), np.flatnonzero(lo_f & ~hi_f),
                np.flatnonzero(~lo_f & hi_f), np.flatnonzero(logc))

    def constrain(self, y):
        """Unconstrained y (..., d) -> x (..., d) and log|dx/dy| (...,) (JAX)."""
        y = jnp.asarray(y)
        both, lower, upper, logc = self._kinds
        x, ldj = y, jnp.zeros(y.shape[:-1], y.dtype)
        if both.size:
            lo = jnp.asarray(self.low[both], y.dtype)
            hi = jnp.asarray(self.high[both], y.dtype)
            yb = y[..., both]
            xb = jnp.clip(lo + (hi - lo) * jax.nn.sigmoid(yb), lo, hi)
            x = x.at[..., both].set(xb)
            ldj = ldj + jnp.sum(jnp.log(hi - lo) + jax.nn.log_sigmoid(yb)
                                + jax.nn.log_sigmoid(-yb), axis=-1)
        if logc.size:
            llo = jnp.asarray(np.log(self.low[logc]), y.dtype)
            lhi = jnp.asarray(np.log(self.high[logc]), y.dtype)
            yc = y[..., logc]
            lx = llo + (lhi - llo) * jax.nn.sigmoid(yc)
            x = x.at[..., logc].set(jnp.clip(jnp.exp(lx), self.low[logc], self.high[logc]))
            ldj = ldj + jnp.sum(lx + jnp.log(lhi - llo) + jax.nn.log_sigmoid(yc)
                                + jax.nn.log_sigmoid(-yc), axis=-1)
        if lower.size:
            lo = jnp.asarray(self.low[lower], y.dtype)
            yl = y[..., lower]
            x = x.at[..., lower].set(lo + jnp.exp(yl))
            ldj = ldj + jnp.sum(yl, axis=-1)
        if upper.size:
            hi = jnp.asarray(self.high[upper], y.dtype)
            yu = y[..., upper]
            x = x.at[..., upper].set(hi - jnp.exp(yu))
            ldj = ldj + jnp.sum(yu, axis=-1)
        return x, ldj

    def unconstrain(self, x):
        """Constrained x (..., d) strictly inside the support -> unconstrained y (numpy)."""
        x = np.asarray(x, np.float64)
        y = x.copy()
        both, lower, upper, logc = self._kinds
        if both.size:
            lo, hi = self.low[both], self.high[both]
            p = np.clip((x[..., both] - lo) / (hi - lo), 1e-12, 1 - 1e-12)
            y[..., both] = np.log(p) - np.log1p(-p)
        if logc.size:
            llo, lhi = np.log(self.low[logc]), np.log(self.high[logc])
            xc = np.clip(x[..., logc], self.low[logc], self.high[logc])
            p = np.clip((np.log(xc) - llo) / (lhi - llo), 1e-12, 1 - 1e-12)
            y[..., logc] = np.log(p) - np.log1p(-p)
        if lower.size:
            y[..., lower] = np.log(np.maximum(x[..., lower] - self.low[lower], 1e-300))
        if upper.size:
            y[..., upper] = np.log(np.maximum(self.high[upper] - x[..., upper], 1e-300))
        return y

    def log_density_unconstrained(self, y, data):
        """log density of y (d,) including the log-Jacobian of :meth:`constrain`."""
        x, ldj = self.constrain(y)
        return self.log_density(x, data) + ldj

    # ---- prior helpers ----
    def scale(self) -> np.ndarray:
        if self.prior_scale is not None:
            return np.asarray(self.prior_scale, np.float64)
        w = self.high - self.low
        return np.where(np.isfinite(w), w / math.sqrt(12.0), 1.0)

    def sample_prior(self, key, n: int) -> np.ndarray:
        """(n, d) draws used for ``init='prior'`` and as optimiser starting points."""
        if self.prior_sample is not None:
            return np.asarray(self.prior_sample(key, n), np.float64)
        ku, kn = jax.random.split(key)
        u = np.asarray(jax.random.uniform(ku, (n, self.dim)), np.float64)
        g = np.asarray(jax.random.normal(kn, (n, self.dim)), np.float64)
        lo, hi = self.low, self.high
        both = np.isfinite(lo) & np.isfinite(hi)
        x = np.where(both, np.where(both, lo, 0) + u * np.where(both, hi - lo, 1), 0.0)
        x = np.where(np.isfinite(lo) & ~np.isfinite(hi),
                     np.where(np.isfinite(lo), lo, 0) + np.abs(g), x)
        x = np.where(~np.isfinite(lo) & np.isfinite(hi),
                     np.where(np.isfinite(hi), hi, 0) - np.abs(g), x)
        x = np.where(~np.isfinite(lo) & ~np.isfinite(hi), g, x)
        return x

    def interior(self, x) -> np.ndarray:
        """Clip points (..., d) a little inside the box (1e-4 of the width off each edge)."""
        x = np.asarray(x, np.float64)
        w = self.high - self.low
        m = np.where(np.isfinite(w), INIT_MARGIN * w, 0.0)
        lo = np.where(np.isfinite(self.low), self.low + m, -np.inf)
        hi = np.where(np.isfinite(self.high), self.high - m, np.inf)
        return np.clip(x, lo, hi)

    def in_support(self, x) -> np.ndarray:
        x = np.asarray(x, np.float64)
        return np.all((x >= self.low) & (x <= self.high), axis=-1) & np.all(np.isfinite(x), -1)


def make_target(log_density: Callable, dim: int, *, low=None, high=None, data=None, names=None,
                to_params=None, param_names=None, prior_sample=None, prior_scale=None,
                log_coords=()) -> Target:
    """A generic :class:`Target` from ``log_density(x (dim,), data) -> scalar``.

    ``low`` / ``high``: (dim,) bounds (None: unbounded; +-inf entries allowed).
    """
    lo = np.full(dim, -np.inf) if low is None else \
        np.broadcast_to(np.asarray(low, np.float64), (dim,)).copy()
    hi = np.full(dim, np.inf) if high is None else \
        np.broadcast_to(np.asarray(high, np.float64), (dim,)).copy()
    if np.any(lo >= hi):
        raise ValueError("low must be < high in every coordinate")
    names = tuple(names) if names is not None else tuple(f"x{i}" for i in range(dim))
    if len(names) != dim:
        raise ValueError(f"{len(names)} names for {dim} dimensions")
    return Target(log_density, lo, hi, data, names, to_params,
                  None if param_names is None else tuple(param_names), prior_sample,
                  None if prior_scale is None else np.asarray(prior_scale, np.float64),
                  tuple(int(i) for i in log_coords))


_CONDITIONED: dict = {}


def condition(target: Target, fixed: dict) -> Target:
    """The target with some coordinates held fixed: a :class:`Target` of the free ones.

    fixed : {index or name: value}. The fixed values travel in ``data`` (so targets of many
    galaxies with the same fixed *indices* share one compiled sampler); ``to_params`` maps the
    free coordinates back through the full vector, so ``theta`` of a result stays complete.
    """
    if not fixed:
        return target
    idx = []
    for k in fixed:
        i = target.names.index(k) if isinstance(k, str) else int(k)
        if not 0 <= i < target.dim:
            raise ValueError(f"fixed coordinate {k!r} out of range")
        idx.append(i)
    vals = np.asarray([float(v) for v in fixed.values()], np.float64)
    order = np.argsort(idx)
    idx = tuple(int(i) for i in np.asarray(idx)[order])
    vals = vals[order]
    if len(set(idx)) != len(idx):
        raise ValueError("a coordinate is fixed twice")
    lo, hi = target.low[list(idx)], target.high[list(idx)]
    if np.any(vals < lo) or np.any(vals > hi) or not np.all(np.isfinite(vals)):
        raise ValueError("fixed values must be finite and inside the bounds")
    free = tuple(i for i in range(target.dim) if i not in idx)
    if not free:
        raise ValueError("nothing left to sample")
    key = (target.log_density, target.dim, idx)
    fn = _CONDITIONED.get(key)
    if fn is None:
        base = target.log_density
        free_a, fix_a = np.asarray(free), np.asarray(idx)

        def fn(x, data):
            full = jnp.zeros(x.shape[:-1] + (target.dim,), x.dtype)
            full = full.at[..., free_a].set(x).at[..., fix_a].set(data["fixed"].astype(x.dtype))
            return base(full, data["base"])

        _CONDITIONED[key] = fn

    def expand(xf):
        xf = np.asarray(xf, np.float64)
        full = np.empty(xf.shape[:-1] + (target.dim,))
        full[..., list(free)] = xf
        full[..., list(idx)] = vals
        return full

    def free_prior_sample(key, n):
        return np.asarray(target.prior_sample(key, n))[:, list(free)]

    def free_to_params(xf):
        return target.to_params(expand(xf))

    prior_sample = None if target.prior_sample is None else free_prior_sample
    to_params = free_to_params if target.to_params is not None else (
        expand if target.param_names is None else None)

    log_coords = tuple(free.index(i) for i in target.log_coords if i in free)
    return Target(
        log_density=fn, low=target.low[list(free)], high=target.high[list(free)],
        data=dict(base=target.data, fixed=jnp.asarray(vals, jnp.float32)),
        names=tuple(target.names[i] for i in free), to_params=to_params,
        param_names=target.param_names if target.param_names is not None else target.names,
        prior_sample=prior_sample,
        prior_scale=None if target.prior_scale is None else target.prior_scale[list(free)],
        log_coords=log_coords)


# ---------------------------------------------------------------------------------------------
# the galaxy target
# ---------------------------------------------------------------------------------------------


def box_affine(target: Target):
    """Centre and scale of the 'constrained' site: x = c + a y maps the box onto [-2, 2]."""
    w = target.high - target.low
    bounded = np.isfinite(w)
    c = np.where(bounded, 0.5 * (np.where(bounded, target.low, 0)
                                 + np.where(bounded, target.high, 0)), 0.0)
    a = np.where(bounded, np.where(bounded, w, 1.0) / 4.0, 1.0)
    return c, a


def site_log_density(target: Target, space: str):
    """``logp(y, data)`` of the sampler's site y (see :func:`numpyro_model`)."""
    if space == "unconstrained":
        def logp(y, data):
            return target.log_density_unconstrained(y, data)
    elif space == "constrained":
        lo, hi = target.low, target.high
        c, a = box_affine(target)

        def logp(y, data):
            x = c + a * y
            inside = jnp.all((x >= lo) & (x <= hi))
            lp = target.log_density(x, data)
            return jnp.where(inside & jnp.isfinite(lp), lp, -jnp.inf)
    else:
        raise ValueError(f"space must be 'unconstrained' or 'constrained', got {space!r}")
    return logp


def _zero_cotangent(a):
    a = jnp.asarray(a)
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


def _value_and_grad_once(logp):
    """``logp(y, data)`` whose value and gradient in y come from one compiled function.

    An eager ``jax.value_and_grad`` of a jitted function (NumPyro's initialisation of a chain)
    compiles three programs (the value, its linearisation, the transpose: ~3 s each for the SED
    model); this one compiles ``value_and_grad(logp)`` once and reuses it for both. Reverse
    mode only (no ``jax.jvp``); ``data`` gets zero cotangents."""
    vg = jax.jit(jax.value_and_grad(logp))

    @jax.custom_vjp
    def f(y, data):
        return vg(y, data)[0]

    def fwd(y, data):
        v, g = vg(y, data)
        return v, (g, data)

    def bwd(res, ct):
        g, data = res
        return ct * g, jax.tree_util.tree_map(_zero_cotangent, data)

    f.defvjp(fwd, bwd)
    return f


def numpyro_model(target: Target, *, space: str = "unconstrained"):
    """A NumPyro model of ``target``: ``model(data)`` with one site ``'y'`` (d,).

    ``space='unconstrained'``: y is the unconstrained vector (``x = target.constrain(y)[0]``)
    and the log-Jacobian is included; ``'constrained'``: y is an affine image of x (the box
    maps onto [-2, 2]^d, so NumPyro's default initialisation lands inside; -inf outside the box;
    only for gradient-free samplers). Use with ``MCMC(...).run(key, target.data)``.
    """
    d = target.dim
    # compiled: NumPyro traces the model eagerly when it initialises each chain (op by op, ~7 s
    # per chain for the SED model); inside the sampler's own jit it is inlined
    logp = _value_and_grad_once(site_log_density(target, space))

    def model(data):
        y = numpyro.sample("y", dist.ImproperUniform(dist.constraints.real, (), (d,)))
        numpyro.factor("log_density", logp(y, data))

    return model
