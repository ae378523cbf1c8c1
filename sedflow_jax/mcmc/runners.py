"""The samplers: NUTS in the unconstrained space, NumPyro's ensemble slice sampler (ESS, the
zeus algorithm PROVABGS uses) and affine-invariant ensemble sampler (AIES, emcee's), on any
:class:`~sedflow_jax.mcmc.target.Target` or one galaxy's photometry.

Compiled samplers are cached per (sampler settings, target function and box): the data are
traced arguments, so the galaxies of a catalog share them. :func:`clear_caches` frees them.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.util
from numpyro.infer import AIES, ESS, MCMC, NUTS

from ..util import as_key
from .compiled import COMPILED, LRUCache, evaluate_log_density, float_dtype, target_key
from .convergence import convergence
from .galaxy import resolve_target
from .results import MCMCResult
from .starts import initial_points
from .target import SPACES, Target, box_affine, numpyro_model, site_log_density

__all__ = ["SAMPLERS", "run_sampler", "run_nuts", "run_ess", "run_aies", "default_num_chains",
           "default_chain_method", "set_cpu_devices", "clear_caches"]

SAMPLERS = ("nuts", "ess", "aies")
_MCMC_CACHE = LRUCache(8)
_NUTS_FIELDS = ("diverging", "num_steps", "accept_prob", "adapt_state.step_size")


def _ensemble_kernel(kind: str, logp, **kw):
    """NumPyro ESS / AIES whose potential takes the data from the (traced) model arguments.

    NumPyro's ensemble kernels bind the potential to the data of the first ``run`` and ignore
    ``jit_model_args`` afterwards (a cached compiled sampler would keep sampling the first
    galaxy); these subclasses rebuild the potential from ``model_args`` in ``init`` and inside
    the traced ``sample`` so one compiled sampler serves every galaxy.
    """
    base = {"ess": ESS, "aies": AIES}[kind]

    def potential_from(model_args):
        data = model_args[0] if model_args else None
        return lambda params: -logp(params["y"], data)

    class _DataKernel(base):
        def _init_state(self, rng_key, model_args, model_kwargs, init_params):
            self._potential_fn = potential_from(model_args)
            return super()._init_state(rng_key, model_args, model_kwargs, init_params)

        def sample(self, state, model_args, model_kwargs):
            self._potential_fn = potential_from(model_args)
            return super().sample(state, model_args, model_kwargs)

    return _DataKernel(potential_fn=potential_from(()), **kw)


def _get_mcmc(target: Target, sampler: str, space: str, num_chains, num_warmup, num_samples,
              thinning, chain_method, kernel_kw: dict):
    def build():
        if sampler == "nuts":
            kernel = NUTS(numpyro_model(target, space=space), **kernel_kw)
        elif sampler in ("ess", "aies"):
            kernel = _ensemble_kernel(sampler, site_log_density(target, space), **kernel_kw)
        else:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        return MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples,
                    num_chains=num_chains, thinning=thinning, chain_method=chain_method,
                    progress_bar=False, jit_model_args=True)

    kw_key = tuple(sorted((k, repr(v)) for k, v in kernel_kw.items()))
    key = (sampler, space, num_chains, num_warmup, num_samples, thinning, chain_method,
           kw_key) + target_key(target)
    return _MCMC_CACHE.get(key, build)


# ---------------------------------------------------------------------------------------------
# run_sampler, step by step
# ---------------------------------------------------------------------------------------------
class _Settings(NamedTuple):
    sampler: str
    space: str
    num_chains: int
    num_warmup: int
    num_samples: int
    thinning: int
    chain_method: str

    @property
    def ensemble(self) -> bool:
        return self.sampler != "nuts"


def _settings(target: Target, sampler, num_chains, num_warmup, num_samples, thinning, space,
              chain_method) -> _Settings:
    """The run's settings with their defaults filled in, checked against each other."""
    sampler = sampler.lower()
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    ensemble = sampler != "nuts"
    num_chains = default_num_chains(sampler) if num_chains is None else num_chains
    if chain_method is None:
        chain_method = default_chain_method(sampler, num_chains)
    num_warmup = (2000 if ensemble else 1000) if num_warmup is None else num_warmup
    num_samples = (8000 if ensemble else 1000) if num_samples is None else num_samples
    space = space or "unconstrained"
    if space not in SPACES:
        raise ValueError(f"space must be 'unconstrained' or 'constrained', got {space!r}")
    if sampler == "nuts" and space != "unconstrained":
        raise ValueError("NUTS needs space='unconstrained'")
    if ensemble:
        if chain_method != "vectorized":
            raise ValueError("ensemble samplers need chain_method='vectorized'")
        if num_chains % 2 or num_chains < 2 * target.dim:
            raise ValueError(f"ensemble samplers need an even number of walkers >= 2 x dim = "
                             f"{2 * target.dim}; got {num_chains}")
    return _Settings(sampler, space, num_chains, num_warmup, num_samples, thinning, chain_method)


def _site_start(target: Target, x0, space: str) -> np.ndarray:
    """Starting points in the box -> the sampler's site coordinates."""
    if space == "constrained":
        c, a = box_affine(target)
        return (x0 - c) / a
    return target.unconstrain(x0)


def _site_to_box(target: Target, y, space: str) -> np.ndarray:
    """Draws of the sampler's site (chains, draws, d) -> points in the box (float64)."""
    if space == "unconstrained":
        return np.asarray(target.constrain(jnp.asarray(y))[0], np.float64)
    c, a = box_affine(target)
    return np.clip(c + a * y.astype(np.float64), target.low, target.high)


_JIT_WRAPPERS: dict = {}


@contextlib.contextmanager
def _reused_jit_wrappers():
    """Within the block, numpyro's ``maybe_jit(fn, ...)`` returns one ``jax.jit`` wrapper per
    (fn, options) instead of a new one per call.

    numpyro 0.22's ``fori_collect`` (``MCMC.run`` without a progress bar) passes its cached loop
    body, freshly wrapped in ``jax.jit``, as a static argument of the loop's ``jit``: the new
    wrapper never equals the previous one, so every ``run`` retraced and recompiled the whole
    sampler (seconds to a minute for the SED model) although the data are traced arguments
    (numpyro PR #2171 fixed the same for another path). The wrapped functions are numpyro's
    cached bodies, so reusing their wrapper changes nothing but the recompilation."""
    original = numpyro.util.maybe_jit

    def reuse(fn, *args, **kwargs):
        key = (fn, args, tuple(sorted(kwargs.items())))
        try:
            return _JIT_WRAPPERS[key]
        except TypeError:  # unhashable options: numpyro's own behaviour
            return original(fn, *args, **kwargs)
        except KeyError:
            if len(_JIT_WRAPPERS) > 64:
                _JIT_WRAPPERS.clear()
            return _JIT_WRAPPERS.setdefault(key, original(fn, *args, **kwargs))

    numpyro.util.maybe_jit = reuse
    try:
        yield
    finally:
        numpyro.util.maybe_jit = original


def _sample(mc, key, target: Target, start, num_chains: int, extra: tuple):
    """Run the compiled sampler from ``start``; -> site draws (chains, draws, d), seconds."""
    t0 = time.perf_counter()
    # the default float (float64 when jax_enable_x64 is on, e.g. after `import dsps`): a float32
    # start would clash with the float64 arithmetic of the kernel inside lax.cond
    y0 = jnp.asarray(start, float_dtype())
    with _reused_jit_wrappers():
        mc.run(key, target.data, init_params={"y": y0[0] if num_chains == 1 else y0},
               extra_fields=extra)
    y = np.asarray(jax.block_until_ready(mc.get_samples(group_by_chain=True)["y"]))
    return (y[None] if y.ndim == 2 else y), time.perf_counter() - t0


def _nuts_stats(mc, num_chains: int):
    """NUTS sampler statistics: (divergences, per-draw arrays, summary numbers)."""
    ex = mc.get_extra_fields(group_by_chain=True)
    div = np.asarray(ex["diverging"]).reshape(num_chains, -1)
    steps = np.asarray(ex["num_steps"])
    stats = dict(mean_num_steps=float(steps.mean()), max_num_steps=int(steps.max()),
                 mean_accept_prob=float(np.mean(ex["accept_prob"])),
                 step_size=np.asarray(ex["adapt_state.step_size"]).reshape(num_chains, -1)[:, -1])
    return int(div.sum()), {"diverging": div}, stats


def _result(target: Target, st: _Settings, x, stats: dict, n_div: int, log_density: bool,
            times: tuple) -> MCMCResult:
    """Diagnostics, physical parameters and log densities of the draws x (chains, draws, d)."""
    t_start, init_time, sample_time = times
    lp = evaluate_log_density(target, x) if log_density else None
    theta = np.asarray(target.to_params(x)) if target.to_params is not None else None
    diag = convergence(x, ensemble=st.ensemble)
    return MCMCResult(samples=x, theta=theta, log_density=lp, names=target.names,
                      param_names=target.param_names, rhat=diag["rhat"],
                      ess_bulk=diag["ess_bulk"], ess_tail=diag["ess_tail"],
                      num_divergences=n_div, wall_time=time.perf_counter() - t_start,
                      sample_time=sample_time, init_time=init_time, sampler=st.sampler,
                      info=stats)


def run_sampler(key, target: Target, sampler: str = "nuts", *, num_chains: Optional[int] = None,
                num_warmup: Optional[int] = None, num_samples: Optional[int] = None,
                thinning: int = 1, init="optimize", space: Optional[str] = None,
                chain_method: Optional[str] = None, log_density: bool = True,
                map_kw: Optional[dict] = None, **kernel_kw) -> MCMCResult:
    """Run ``sampler`` ('nuts' | 'ess' | 'aies') on a :class:`Target`; see :func:`run_nuts`.

    Defaults: NUTS 4 chains x (1000 warmup + 1000 draws); ESS / AIES 30 walkers x (2000 warmup
    + 8000 draws) (SEDflow's PROVABGS comparison ran 10,000 steps, 2,000 burn-in).
    ``space``: 'unconstrained' (default, required for NUTS) or 'constrained' (ensembles only,
    as zeus in PROVABGS). Remaining keywords go to the NumPyro kernel (e.g. ``dense_mass``,
    ``target_accept_prob``, ``max_tree_depth`` for NUTS; ``moves`` for ESS / AIES).
    """
    t_start = time.perf_counter()
    st = _settings(target, sampler, num_chains, num_warmup, num_samples, thinning, space,
                   chain_method)
    if st.sampler == "nuts":
        kernel_kw.setdefault("dense_mass", True)
        kernel_kw.setdefault("target_accept_prob", 0.8)
    k_init, k_run = jax.random.split(as_key(key))
    t0 = time.perf_counter()
    x0, info = initial_points(k_init, target, st.num_chains, init, map_kw=map_kw)
    init_time = time.perf_counter() - t0
    mc = _get_mcmc(target, st.sampler, st.space, st.num_chains, st.num_warmup, st.num_samples,
                   st.thinning, st.chain_method, kernel_kw)
    y, sample_time = _sample(mc, k_run, target, _site_start(target, x0, st.space),
                             st.num_chains, () if st.ensemble else _NUTS_FIELDS)
    stats = dict(st._asdict(), kernel={k: repr(v) for k, v in kernel_kw.items()}, x_init=x0)
    stats.update(info)
    n_div, arrays = 0, {}
    if not st.ensemble:
        n_div, arrays, nuts = _nuts_stats(mc, st.num_chains)
        stats.update(nuts)
    stats["_arrays"] = arrays
    return _result(target, st, _site_to_box(target, y, st.space), stats, n_div, log_density,
                   (t_start, init_time, sample_time))


def default_num_chains(sampler: str) -> int:
    """Chains (NUTS: 4) or walkers (ESS / AIES: 30, as PROVABGS) when none are given."""
    return 4 if sampler.lower() == "nuts" else 30


def default_chain_method(sampler: str, num_chains: int) -> str:
    """How :func:`run_sampler` runs the chains when ``chain_method`` is not given.

    Ensembles: 'vectorized' (all walkers move at once). NUTS: 'parallel', one chain per device,
    when JAX has at least ``num_chains`` devices (see :func:`set_cpu_devices`: 2.6x faster for
    4 chains on 2 CPU cores), else 'sequential' -- a vmapped NUTS waits at every draw for the
    chain with the deepest tree (measured 5.0 ms per lock-step leapfrog for 4 chains vs 1.1 ms
    per chain-step sequentially on 2 CPU cores).
    """
    if sampler.lower() != "nuts":
        return "vectorized"
    if num_chains > 1 and jax.local_device_count() >= num_chains:
        return "parallel"
    return "sequential"


def set_cpu_devices(n: int) -> int:
    """Split the host CPU into ``n`` XLA devices so that NUTS chains run side by side.

    With at least as many devices as chains, :func:`run_nuts` defaults to
    ``chain_method='parallel'`` (one chain per device, each with its own tree depth). Measured
    on a 2-core machine, 4 chains x (200 + 200) on a mock galaxy: 72 s sequential, 28 s on 4
    CPU devices (``benchmarks/bench_mcmc.py --cpu-devices``). The split costs work that runs
    on one device: the vectorized ensemble samplers ran ~30 % slower with 4 CPU devices than
    with 1 (30 walkers x 1000 steps: 24 s vs 18 s), so use it for NUTS. This is JAX's global
    ``jax_num_cpu_devices`` setting, so it must be called before JAX runs anything (right
    after the imports); later calls leave the devices as they are and warn. Returns the number
    of devices JAX now has. Setting ``XLA_FLAGS=--xla_force_host_platform_device_count=n`` in
    the environment does the same.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as exc:  # backends already initialised
        warnings.warn(f"set_cpu_devices({n}) came too late, keeping {jax.local_device_count()} "
                      f"device(s): {exc}", RuntimeWarning, stacklevel=2)
    return jax.local_device_count()


def run_nuts(key, model, flux=None, sigma=None, z=None, *, mask=None, cov=None, prior=None,
             gamma_density: str = "loguniform", fixed: Optional[dict] = None,
             num_chains: int = 4, num_warmup: int = 1000,
             num_samples: int = 1000, init="optimize", dense_mass: bool = True,
             target_accept_prob: float = 0.8, max_tree_depth: int = 10,
             chain_method: Optional[str] = None, thinning: int = 1, log_density: bool = True,
             map_kw: Optional[dict] = None, **kernel_kw) -> MCMCResult:
    """NUTS posterior of one galaxy (or of any :class:`Target`).

    key : int seed or PRNG key. model : an :class:`~sedflow_jax.sed.model.SEDModel` -- then give
    ``flux``, ``sigma`` (n_b,) nanomaggies (or ``cov``), ``z``, optional ``mask`` (n_b,) bool,
    ``prior`` and ``gamma_density`` ('loguniform' = SEDflow, 'flat' = PROVABGS) -- or a
    :class:`Target` (then leave those out). ``fixed``: {coordinate name: value} held fixed.
    Samples in the unconstrained space (logit of the box), dense mass matrix by default;
    ``chain_method``: default 'parallel' (one chain per device) when JAX has at least
    ``num_chains`` devices (on CPU see :func:`set_cpu_devices`), else 'sequential' (one chain
    after another; faster on CPU than 'vectorized' lock-step chains, which wait for the
    deepest tree at every draw).
    init : 'optimize' (MAP + 1e-3 ball, PROVABGS), 'prior', or an array of points/draws (m, d).
    Returns an :class:`MCMCResult` (samples (num_chains, num_samples, 11) for a galaxy).
    """
    target = resolve_target(model, flux, sigma, z, mask, cov, prior, gamma_density, fixed)
    return run_sampler(key, target, "nuts", num_chains=num_chains, num_warmup=num_warmup,
                       num_samples=num_samples, thinning=thinning, init=init,
                       chain_method=chain_method, log_density=log_density, map_kw=map_kw,
                       dense_mass=dense_mass, target_accept_prob=target_accept_prob,
                       max_tree_depth=max_tree_depth, **kernel_kw)


def run_ess(key, model, flux=None, sigma=None, z=None, *, mask=None, cov=None, prior=None,
            gamma_density: str = "loguniform", fixed: Optional[dict] = None,
            num_chains: int = 30, num_warmup: int = 2000,
            num_samples: int = 8000, init="optimize", space: str = "unconstrained",
            thinning: int = 1, log_density: bool = True, map_kw: Optional[dict] = None,
            **kernel_kw) -> MCMCResult:
    """Ensemble slice sampling (NumPyro ``ESS`` = the zeus algorithm PROVABGS uses).

    Same arguments as :func:`run_nuts`; ``num_chains`` = walkers (even, >= 2 x dim; 30 as
    PROVABGS); ``space`` 'unconstrained' (logit of the box) or 'constrained' (the box itself,
    as zeus); ``moves`` etc. go to ``numpyro.infer.ESS``.
    """
    target = resolve_target(model, flux, sigma, z, mask, cov, prior, gamma_density, fixed)
    return run_sampler(key, target, "ess", num_chains=num_chains, num_warmup=num_warmup,
                       num_samples=num_samples, thinning=thinning, init=init, space=space,
                       log_density=log_density, map_kw=map_kw, **kernel_kw)


def run_aies(key, model, flux=None, sigma=None, z=None, *, mask=None, cov=None, prior=None,
             gamma_density: str = "loguniform", fixed: Optional[dict] = None,
            num_chains: int = 30, num_warmup: int = 2000,
             num_samples: int = 8000, init="optimize", space: str = "unconstrained",
             thinning: int = 1, log_density: bool = True, map_kw: Optional[dict] = None,
             **kernel_kw) -> MCMCResult:
    """Affine-invariant ensemble sampler (NumPyro ``AIES``, emcee's moves); as :func:`run_ess`."""
    target = resolve_target(model, flux, sigma, z, mask, cov, prior, gamma_density, fixed)
    return run_sampler(key, target, "aies", num_chains=num_chains, num_warmup=num_warmup,
                       num_samples=num_samples, thinning=thinning, init=init, space=space,
                       log_density=log_density, map_kw=map_kw, **kernel_kw)



def clear_caches() -> None:
    """Forget the compiled samplers and log-density helpers kept for reuse (frees memory)."""
    _MCMC_CACHE.clear()
    COMPILED.clear()
    _JIT_WRAPPERS.clear()
