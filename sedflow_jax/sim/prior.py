"""PROVABGS / SEDflow priors and the 11-dim sampling-space transforms (pure JAX).

Two parameter spaces are used throughout the package:

* the **physical** 12-vector ``theta`` (:data:`PARAM_NAMES`)::

      [logmstar, beta1, beta2, beta3, beta4, fburst, tburst, gamma1, gamma2, tau_bc, tau_ism, n_dust]

  logmstar in log10 Msun (total mass formed); beta_i >= 0 with sum 1 (SFH NMF weights);
  fburst dimensionless; tburst in Gyr (lookback time of the burst); gamma1, gamma2 in absolute
  metallicity units (Z); tau_bc, tau_ism optical depths at 5500 A; n_dust dimensionless.

* the **sampling** 11-vector ``s`` (:data:`SAMPLING_NAMES`), SEDflow's ``thetas_unt``
  (design spec section 9.2)::

      [logmstar, u1, u2, u3, fburst, tburst, log10 gamma1, log10 gamma2, tau_bc, tau_ism, n_dust]

  with the stick-breaking warp (spec section 1.1)
  ``beta1 = 1-u1, beta2 = u1(1-u2), beta3 = u1 u2 (1-u3), beta4 = u1 u2 u3``.

The canonical prior (:func:`provabgs_prior`, PROVABGS paper Table 1 = SEDflow = DESI runs) draws
``u ~ U(0,1)^3``: this is *not* a flat Dirichlet (E[beta] = (1/2, 1/4, 1/8, 1/8)); a true flat
Dirichlet(1,1,1,1) is available as ``beta='dirichlet'`` (``u_k ~ Beta(4-k, 1)``, E[beta] = 1/4).

Prior *density* conventions (spec section 1.2): the distribution that is **sampled** (and that
SEDflow's BoxUniform/training set uses) is log-uniform in gamma (``gamma_density='loguniform'``);
PROVABGS's MCMC uses a density that is **flat** in gamma and, for :func:`default_nmf_prior`, flat in
tburst too (``gamma_density='flat'``). Both are available by name in :func:`log_prob` and
:func:`log_prob_sampling`; all densities returned here are normalised.

Everything is pure: no global state, explicit PRNG keys, float32 by default; functions act on the
last axis so any leading batch shape works, and all are ``jit``/``vmap``-able. A :class:`Prior`
is a hashable static pytree (no array leaves), so it can be passed straight into ``jax.jit``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

__all__ = [
    "PARAM_NAMES",
    "SAMPLING_NAMES",
    "N_PARAMS",
    "N_SAMPLING",
    "Prior",
    "provabgs_prior",
    "default_nmf_prior",
    "sample",
    "sample_sampling",
    "sample_redshift",
    "log_prob",
    "log_prob_sampling",
    "log_prob_redshift",
    "to_sampling",
    "from_sampling",
    "unit_cube_to_sampling",
    "sampling_to_unit_cube",
    "in_support",
    "in_support_theta",
    "sampling_bounds",
    "log_abs_det_jacobian_to_sampling",
]

from ..sed.params import N_PARAMS, N_SAMPLING, PARAM_NAMES, SAMPLING_NAMES

_LN10 = math.log(10.0)
_BETA_MODES = ("uniform", "dirichlet")
_TBURST_SCALES = ("linear", "log")
_DENSITIES = ("loguniform", "flat")


def _pair(x, name):
    lo, hi = (float(v) for v in x)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"prior range for {name} must be finite with low < high, got {x!r}")
    return (lo, hi)


@dataclasses.dataclass(frozen=True)
class Prior:
    """Box-type prior of the PROVABGS NMF-burst model (all fields static, hashable).

    Ranges are ``(low, high)`` in physical units (see module docstring):

    - ``logmstar``: uniform in log10 Msun.
    - ``beta``: ``'uniform'`` (PROVABGS/SEDflow stick-breaking, u ~ U(0,1)^3) or ``'dirichlet'``
      (true flat Dirichlet(1,1,1,1) via u_k ~ Beta(4-k, 1)).
    - ``fburst``: uniform.
    - ``tburst``: Gyr; ``tburst_scale='linear'`` (uniform) or ``'log'`` (log-uniform).
    - ``gamma``: range shared by gamma1 and gamma2, sampled log-uniform (absolute Z units).
    - ``tau_bc``, ``tau_ism``, ``n_dust``: uniform.
    - ``redshift``: z ~ U(zmin, zmax) for simulations (z is not a fitted parameter).
    - ``name``: a label only.
    """

    logmstar: tuple = (7.0, 12.5)
    beta: str = "uniform"
    fburst: tuple = (0.0, 1.0)
    tburst: tuple = (0.01, 13.27)
    tburst_scale: str = "linear"
    gamma: tuple = (4.5e-5, 1.5e-2)
    tau_bc: tuple = (0.0, 3.0)
    tau_ism: tuple = (0.0, 3.0)
    n_dust: tuple = (-2.0, 1.0)
    redshift: tuple = (0.0, 0.2)
    name: str = "provabgs"

    def __post_init__(self):
        for f in ("logmstar", "fburst", "tburst", "gamma", "tau_bc", "tau_ism", "n_dust", "redshift"):
            object.__setattr__(self, f, _pair(getattr(self, f), f))
        if self.beta not in _BETA_MODES:
            raise ValueError(f"beta must be one of {_BETA_MODES}, got {self.beta!r}")
        if self.tburst_scale not in _TBURST_SCALES:
            raise ValueError(f"tburst_scale must be one of {_TBURST_SCALES}, got {self.tburst_scale!r}")
        if self.gamma[0] <= 0:
            raise ValueError("gamma range must be positive (log-uniform prior)")
        if self.tburst_scale == "log" and self.tburst[0] <= 0:
            raise ValueError("tburst range must be positive for tburst_scale='log'")

    @property
    def zmin(self) -> float:
        return self.redshift[0]

    @property
    def zmax(self) -> float:
        return self.redshift[1]

    def replace(self, **changes) -> "Prior":
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # ranges of the 11 sampling coordinates, as Python floats
    def _sampling_ranges(self):
        lg = (math.log10(self.gamma[0]), math.log10(self.gamma[1]))
        return (
            self.logmstar, (0.0, 1.0), (0.0, 1.0), (0.0, 1.0), self.fburst, self.tburst,
            lg, lg, self.tau_bc, self.tau_ism, self.n_dust,
        )


jax.tree_util.register_static(Prior)


def provabgs_prior(*, beta: str = "uniform", zmin: float = 0.0, zmax: float = 0.2) -> Prior:
    """The canonical PROVABGS/SEDflow prior (spec section 1; the package default).

    logM* ~ U(7, 12.5); beta by uniform stick-breaking (``beta='dirichlet'`` for a true flat
    Dirichlet); fburst ~ U(0, 1); tburst ~ U(0.01, 13.27) Gyr; gamma1, gamma2 log-uniform on
    [4.5e-5, 1.5e-2]; tau_bc, tau_ism ~ U(0, 3); n_dust ~ U(-2, 1); z ~ U(zmin, zmax).
    """
    return Prior(beta=beta, redshift=(zmin, zmax), name="provabgs")


def default_nmf_prior(*, beta: str = "uniform", zmin: float = 0.0, zmax: float = 0.2) -> Prior:
    """provabgs ``default_NMF_prior``: tburst LOG-uniform on [1e-2, 13.27] Gyr and gamma
    log-uniform on [4.5e-5, 4.5e-2]; all else as :func:`provabgs_prior`. Not what the papers or
    SEDflow used (spec section 1)."""
    return Prior(
        beta=beta, tburst=(1e-2, 13.27), tburst_scale="log", gamma=(4.5e-5, 4.5e-2),
        redshift=(zmin, zmax), name="default_nmf",
    )


def _check_prior(prior):
    if not isinstance(prior, Prior):
        raise TypeError(f"expected a Prior, got {type(prior).__name__}")


def _check_last(x, n, what):
    if x.shape[-1:] != (n,):
        raise ValueError(f"{what} must have last axis of size {n}, got shape {x.shape}")


def _as_float(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


# ---------------------------------------------------------------------------------------------
# bounds and support
# ---------------------------------------------------------------------------------------------
def sampling_bounds(prior: Prior, dtype=jnp.float32):
    """BoxUniform bounds of the 11-dim sampling space.

    Returns ``(low, high)``, each shape (11,). For :func:`provabgs_prior` this is exactly
    SEDflow's ANPE box (spec section 9.2)::

        low  = [7, 0, 0, 0, 0, 0.01, log10 4.5e-5, log10 4.5e-5, 0, 0, -2]
        high = [12.5, 1, 1, 1, 1, 13.27, log10 1.5e-2, log10 1.5e-2, 3, 3, 1]
    """
    _check_prior(prior)
    r = prior._sampling_ranges()
    return (jnp.asarray([a for a, _ in r], dtype=dtype), jnp.asarray([b for _, b in r], dtype=dtype))


@jax.jit
def in_support(prior: Prior, s):
    """Whether sampling-space points lie in the (closed) prior box.

    s: (..., 11) -> bool (...,). NaN is outside.
    """
    _check_prior(prior)
    s = _as_float(s)
    _check_last(s, N_SAMPLING, "s")
    low, high = sampling_bounds(prior, dtype=s.dtype)
    return jnp.all((s >= low) & (s <= high), axis=-1)


@functools.partial(jax.jit, static_argnames=("simplex_atol",))
def in_support_theta(prior: Prior, theta, *, simplex_atol: float = 1e-5):
    """Whether physical 12-vectors lie in the prior support.

    theta: (..., 12) -> bool (...,). Requires every beta_i >= 0 and |sum(beta) - 1| <= simplex_atol
    (beta on the simplex), gamma and all other entries inside their ranges (closed).
    """
    _check_prior(prior)
    theta = _as_float(theta)
    _check_last(theta, N_PARAMS, "theta")
    beta = theta[..., 1:5]
    on_simplex = jnp.all(beta >= 0, axis=-1) & (jnp.abs(jnp.sum(beta, axis=-1) - 1.0) <= simplex_atol)
    checks = [on_simplex]
    for idx, (lo, hi) in (
        (0, prior.logmstar), (5, prior.fburst), (6, prior.tburst), (7, prior.gamma), (8, prior.gamma),
        (9, prior.tau_bc), (10, prior.tau_ism), (11, prior.n_dust),
    ):
        x = theta[..., idx]
        checks.append((x >= lo) & (x <= hi))
    out = checks[0]
    for c in checks[1:]:
        out = out & c
    return out


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------
@jax.jit
def from_sampling(s):
    """Sampling-space 11-vectors -> physical 12-vectors (stick-breaking warp, gamma = 10**s).

    s: (..., 11) [logM, u1, u2, u3, fburst, tburst, log10 g1, log10 g2, tau_bc, tau_ism, n_dust]
    -> theta: (..., 12) in :data:`PARAM_NAMES` order. No support check.
    """
    s = _as_float(s)
    _check_last(s, N_SAMPLING, "s")
    u1, u2, u3 = s[..., 1], s[..., 2], s[..., 3]
    b1 = 1.0 - u1
    b2 = u1 * (1.0 - u2)
    b3 = u1 * u2 * (1.0 - u3)
    b4 = u1 * u2 * u3
    g1 = jnp.power(10.0, s[..., 6]).astype(s.dtype)
    g2 = jnp.power(10.0, s[..., 7]).astype(s.dtype)
    return jnp.stack(
        [s[..., 0], b1, b2, b3, b4, s[..., 4], s[..., 5], g1, g2, s[..., 8], s[..., 9], s[..., 10]],
        axis=-1,
    )


def _safe_ratio(num, den):
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


@jax.jit
def to_sampling(theta):
    """Physical 12-vectors -> sampling-space 11-vectors (inverse stick-breaking, log10 gamma).

    theta: (..., 12) -> s: (..., 11). On the simplex this equals provabgs's inverse
    (u1 = 1 - b1, u_i = 1 - b_i / prod_{k<i} u_k); it is computed in the equivalent, better
    conditioned form u1 = b2+b3+b4, u2 = (b3+b4)/(b2+b3+b4), u3 = b4/(b3+b4) (a vanishing
    denominator gives u = 0: every u there maps to the same beta). gamma must be > 0.
    """
    theta = _as_float(theta)
    _check_last(theta, N_PARAMS, "theta")
    b2, b3, b4 = theta[..., 2], theta[..., 3], theta[..., 4]
    u1 = b2 + b3 + b4
    u2 = _safe_ratio(b3 + b4, u1)
    u3 = _safe_ratio(b4, b3 + b4)
    return jnp.stack(
        [theta[..., 0], u1, u2, u3, theta[..., 5], theta[..., 6],
         jnp.log10(theta[..., 7]), jnp.log10(theta[..., 8]),
         theta[..., 9], theta[..., 10], theta[..., 11]],
        axis=-1,
    )


@jax.jit
def unit_cube_to_sampling(prior: Prior, cube):
    """Inverse CDFs: unit-cube points -> sampling-space points of the *sampled* prior.

    cube: (..., 11) in [0, 1] -> s: (..., 11). Uniform coordinates map linearly; log10 gamma
    linearly (gamma log-uniform); u_k: identity for ``beta='uniform'``, ``c**(1/(4-k))``
    (Beta(4-k, 1) quantile) for ``beta='dirichlet'``; tburst: linear, or
    ``lo * (hi/lo)**c`` for ``tburst_scale='log'``.
    """
    _check_prior(prior)
    c = _as_float(cube)
    _check_last(c, N_SAMPLING, "cube")
    r = prior._sampling_ranges()
    cols = []
    for i in range(N_SAMPLING):
        ci = c[..., i]
        lo, hi = r[i]
        if i in (1, 2, 3):
            if prior.beta == "dirichlet":
                ci = jnp.power(ci, 1.0 / (4 - i)) if i < 3 else ci
            cols.append(ci)
        elif i == 5 and prior.tburst_scale == "log":
            cols.append(jnp.exp(math.log(lo) + ci * math.log(hi / lo)).astype(c.dtype))
        else:
            cols.append(lo + ci * (hi - lo))
    return jnp.stack(cols, axis=-1)


@jax.jit
def sampling_to_unit_cube(prior: Prior, s):
    """CDFs of the sampled prior: sampling-space points -> unit cube (inverse of
    :func:`unit_cube_to_sampling`). s: (..., 11) -> cube: (..., 11); not clipped."""
    _check_prior(prior)
    s = _as_float(s)
    _check_last(s, N_SAMPLING, "s")
    r = prior._sampling_ranges()
    cols = []
    for i in range(N_SAMPLING):
        si = s[..., i]
        lo, hi = r[i]
        if i in (1, 2, 3):
            if prior.beta == "dirichlet" and i < 3:
                si = jnp.power(si, float(4 - i))
            cols.append(si)
        elif i == 5 and prior.tburst_scale == "log":
            cols.append((jnp.log(si) - math.log(lo)) / math.log(hi / lo))
        else:
            cols.append((si - lo) / (hi - lo))
    return jnp.stack(cols, axis=-1)


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("n", "dtype"))
def sample_sampling(key, prior: Prior, n: int, dtype=jnp.float32):
    """Draw n points of the sampled prior in the 11-dim sampling space.

    key: PRNG key; n: static int -> s: (n, 11). Under ``jax.jit`` mark ``n`` static.
    """
    _check_prior(prior)
    cube = jax.random.uniform(key, (n, N_SAMPLING), dtype=dtype)
    return unit_cube_to_sampling(prior, cube)


def sample(key, prior: Prior, n: int, dtype=jnp.float32, *, sampling_space: bool = False):
    """Draw n parameter vectors from the prior.

    key: PRNG key; n: static int -> theta: (n, 12) in :data:`PARAM_NAMES` order, or (n, 11)
    sampling-space vectors if ``sampling_space=True`` (same draws as :func:`sample_sampling`).
    """
    s = sample_sampling(key, prior, n, dtype=dtype)
    return s if sampling_space else from_sampling(s)


@functools.partial(jax.jit, static_argnames=("n", "dtype"))
def sample_redshift(key, prior: Prior, n: int, dtype=jnp.float32):
    """Draw n redshifts z ~ U(zmin, zmax] (never exactly zmin: the model needs z > 0).

    key: PRNG key; n: static int -> z: (n,).
    """
    _check_prior(prior)
    u = jax.random.uniform(key, (n,), dtype=dtype)  # [0, 1)
    return prior.zmax - (prior.zmax - prior.zmin) * u


def log_prob_redshift(prior: Prior, z):
    """Log density of the redshift prior U(zmin, zmax). z: (...,) -> (...,), -inf outside."""
    _check_prior(prior)
    z = _as_float(z)
    inside = (z >= prior.zmin) & (z <= prior.zmax)
    return jnp.where(inside, -math.log(prior.zmax - prior.zmin), -jnp.inf).astype(z.dtype)


# ---------------------------------------------------------------------------------------------
# densities
# ---------------------------------------------------------------------------------------------
def _resolve_densities(prior, gamma_density, tburst_density):
    if gamma_density not in _DENSITIES:
        raise ValueError(f"gamma_density must be one of {_DENSITIES}, got {gamma_density!r}")
    if tburst_density is None:
        if gamma_density == "flat":
            tburst_density = "flat"  # PROVABGS MCMC: every LogUniformPrior has a flat lnPrior
        else:
            tburst_density = "loguniform" if prior.tburst_scale == "log" else "flat"
    if tburst_density not in _DENSITIES:
        raise ValueError(f"tburst_density must be one of {_DENSITIES} or None, got {tburst_density!r}")
    return gamma_density, tburst_density


def _safe_log(x):
    ok = x > 0
    return jnp.where(ok, jnp.log(jnp.where(ok, x, 1.0)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("gamma_density", "tburst_density"))
def log_prob_sampling(prior: Prior, s, gamma_density: str = "loguniform",
                      tburst_density: Optional[str] = None):
    """Normalised log density of the prior in the 11-dim sampling space.

    s: (..., 11) -> (...,); -inf outside the box :func:`sampling_bounds`.

    gamma_density:
      ``'loguniform'`` -- the sampled (SEDflow training / BoxUniform) density: uniform in
      log10 gamma, i.e. ``-log(log10 hi - log10 lo)`` per gamma coordinate;
      ``'flat'`` -- PROVABGS MCMC: flat in gamma on [lo, hi], which in log10-gamma coordinates is
      ``log(gamma ln10) - log(hi - lo)``. The two differ by exactly that Jacobian.
    tburst_density: ``'flat'`` (uniform in tburst) or ``'loguniform'``; ``None`` means the
      sampled scale of the prior when ``gamma_density='loguniform'`` and ``'flat'`` when
      ``gamma_density='flat'`` (PROVABGS's MCMC density for :func:`default_nmf_prior`).
    beta: ``'uniform'`` -> 0 on [0,1]^3; ``'dirichlet'`` -> log(3 u1^2) + log(2 u2).
    """
    _check_prior(prior)
    gamma_density, tburst_density = _resolve_densities(prior, gamma_density, tburst_density)
    s = _as_float(s)
    _check_last(s, N_SAMPLING, "s")
    r = prior._sampling_ranges()
    lp = jnp.zeros(s.shape[:-1], dtype=s.dtype)
    const = 0.0
    for i in (0, 4, 8, 9, 10):
        const -= math.log(r[i][1] - r[i][0])
    if prior.beta == "dirichlet":
        const += math.log(6.0)
        lp = lp + 2.0 * _safe_log(s[..., 1]) + _safe_log(s[..., 2])
    t_lo, t_hi = prior.tburst
    if tburst_density == "flat":
        const -= math.log(t_hi - t_lo)
    else:
        const -= math.log(math.log(t_hi / t_lo))
        lp = lp - _safe_log(s[..., 5])
    g_lo, g_hi = prior.gamma
    if gamma_density == "loguniform":
        const -= 2.0 * math.log(math.log10(g_hi) - math.log10(g_lo))
    else:
        const += 2.0 * (math.log(_LN10) - math.log(g_hi - g_lo))
        lp = lp + _LN10 * (s[..., 6] + s[..., 7])  # log(gamma) = ln10 * log10(gamma)
    lp = lp + const
    return jnp.where(in_support(prior, s), lp, -jnp.inf).astype(s.dtype)


@jax.jit
def log_abs_det_jacobian_to_sampling(theta):
    """log |det d s / d theta_free| of :func:`to_sampling`, theta_free = theta without beta4.

    theta: (..., 12) -> (...,). Equals ``-2 log u1 - log u2 - log(gamma1 ln10) - log(gamma2 ln10)``
    with u from :func:`to_sampling` (-inf-safe: returns +inf where u1 or u2 vanish).
    """
    s = to_sampling(theta)
    theta = _as_float(theta)
    return (
        -2.0 * _safe_log(s[..., 1]) - _safe_log(s[..., 2])
        - _safe_log(theta[..., 7]) - _safe_log(theta[..., 8]) - 2.0 * math.log(_LN10)
    )


@functools.partial(jax.jit, static_argnames=("gamma_density", "tburst_density", "simplex_atol"))
def log_prob(prior: Prior, theta, gamma_density: str = "loguniform",
             tburst_density: Optional[str] = None, *, simplex_atol: float = 1e-5):
    """Normalised log density of physical 12-vectors.

    theta: (..., 12) -> (...,). The density is with respect to Lebesgue measure on the 11 free
    coordinates (logM, beta1, beta2, beta3, fburst, tburst, gamma1, gamma2, tau_bc, tau_ism,
    n_dust); beta4 = 1 - beta1 - beta2 - beta3 is implied. -inf outside the support, including
    beta off the simplex (any beta_i < 0 or |sum - 1| > simplex_atol).

    For ``beta='uniform'`` the beta part is ``-log(1 - beta1) - log(beta3 + beta4)``; for
    ``'dirichlet'`` it is log 6 (flat Dirichlet(1,1,1,1)). gamma: ``'loguniform'`` gives
    ``-log(gamma) - log(ln(hi/lo))`` per gamma, ``'flat'`` gives ``-log(hi - lo)`` (PROVABGS MCMC);
    ``tburst_density`` as in :func:`log_prob_sampling`.
    """
    _check_prior(prior)
    theta = _as_float(theta)
    _check_last(theta, N_PARAMS, "theta")
    ok = in_support_theta(prior, theta, simplex_atol=simplex_atol)
    # evaluate on a safe point where outside, so that no NaN leaks (gradients included)
    safe = jnp.asarray([0.5 * (prior.logmstar[0] + prior.logmstar[1]), 0.25, 0.25, 0.25, 0.25,
                        0.5, 0.5 * (prior.tburst[0] + prior.tburst[1]),
                        math.sqrt(prior.gamma[0] * prior.gamma[1]),
                        math.sqrt(prior.gamma[0] * prior.gamma[1]),
                        0.5, 0.5, 0.0], dtype=theta.dtype)
    th = jnp.where(ok[..., None], theta, safe)
    s = to_sampling(th)
    lp = log_prob_sampling(prior, jnp.clip(s, *sampling_bounds(prior, s.dtype)),
                           gamma_density, tburst_density)
    lp = lp + log_abs_det_jacobian_to_sampling(th)
    return jnp.where(ok, lp, -jnp.inf).astype(theta.dtype)
