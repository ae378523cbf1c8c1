"""Short MCMC from importance-sampling draws: the refinement of galaxies whose importance
weights cannot be trusted (``sedflow-jax infer --exact --refine``).

A :class:`Refiner` is a callable that the catalog inference of :mod:`sedflow_jax.sbi` receives
(it knows nothing of MCMC): for one galaxy it builds the same target as every other exact method
(:func:`~sedflow_jax.mcmc.galaxy.galaxy_target`: the PROVABGS prior x the Gaussian photometric
likelihood of the used bands), starts the walkers / chains at distinct importance draws (a tiny
jitter separates repeated ones: ensemble moves need distinct walkers), runs the sampler
(ensemble slice sampling by default) and returns ``n_out`` draws with the convergence numbers.
Galaxies share one compiled sampler (the data are traced arguments).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..util import as_key, key_parts
from .galaxy import galaxy_target
from .runners import run_sampler

__all__ = ["Refined", "Refiner", "distinct_starts"]


class Refined(NamedTuple):
    """One galaxy's refinement: ``s`` (n_out, 11) draws (evenly thinned from all chains),
    ``rhat`` the largest split R-hat, ``ess`` the smallest bulk ESS over the coordinates,
    ``converged`` = rhat < rhat_max and ess >= ess_min."""

    s: np.ndarray
    rhat: float
    ess: float
    converged: bool


def distinct_starts(rng, draws, n: int, low, high, jitter: float = 1e-3) -> np.ndarray:
    """``n`` distinct starting points (n, d) from posterior ``draws`` (m, d): the distinct
    finite draws in turn, each repeat moved by a Gaussian of ``jitter`` x the box width and
    kept strictly inside the box (low, high)."""
    d = np.asarray(draws, np.float64)
    d = np.unique(d[np.isfinite(d).all(1)], axis=0)
    if d.shape[0] == 0:
        raise ValueError("no finite draw to start from")
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    pick = d[rng.permutation(max(n, d.shape[0]))[:n] % d.shape[0]]
    repeat = np.zeros(n, bool)
    _, first = np.unique(pick, axis=0, return_index=True)
    repeat[np.setdiff1d(np.arange(n), first)] = True
    pick[repeat] += rng.normal(0.0, jitter, (int(repeat.sum()), d.shape[1])) * (high - low)
    eps = 1e-6 * (high - low)
    return np.clip(pick, low + eps, high - eps)


class Refiner(NamedTuple):
    """Settings of the short MCMC (defaults: 30 ensemble-slice walkers, 300 warm-up + 700
    steps; converged when every coordinate has split R-hat < 1.05 and bulk ESS >= 200).

    model : SEDModel with the posterior's bands; sampler : 'ess' | 'aies' | 'nuts' (NUTS:
    num_chains chains). Call: ``refiner(key, flux, sigma, z, mask, draws, prior, n_out)`` ->
    :class:`Refined`.
    """

    model: object
    sampler: str = "ess"
    num_chains: int = 30
    num_warmup: int = 300
    num_samples: int = 700
    rhat_max: float = 1.05
    ess_min: float = 200.0
    gamma_density: str = "loguniform"

    def config(self) -> dict:
        """JSON-ready settings (what the refined draws depend on, besides the data)."""
        return {"sampler": self.sampler, "num_chains": int(self.num_chains),
                "num_warmup": int(self.num_warmup), "num_samples": int(self.num_samples),
                "rhat_max": float(self.rhat_max), "ess_min": float(self.ess_min),
                "gamma_density": self.gamma_density}

    def __call__(self, key, flux, sigma, z, mask, draws, prior, n_out: int) -> Refined:
        target = galaxy_target(self.model, np.asarray(flux, np.float64),
                               np.asarray(sigma, np.float64), float(z), mask=mask, prior=prior,
                               gamma_density=self.gamma_density)
        _, kdata, _, key = key_parts(as_key(key))
        starts = distinct_starts(np.random.default_rng(kdata.ravel().tolist()), draws,
                                 int(self.num_chains), target.low, target.high)
        res = run_sampler(key, target, self.sampler, num_chains=int(self.num_chains),
                          num_warmup=int(self.num_warmup), num_samples=int(self.num_samples),
                          init=starts, log_density=False)
        flat = res.flat_samples
        s = flat[np.linspace(0, flat.shape[0] - 1, int(n_out)).round().astype(np.int64)]
        rhat = float(np.nanmax(res.rhat))
        ess = float(np.nanmin(res.ess_bulk))
        ok = bool(np.isfinite(rhat) and rhat < self.rhat_max and ess >= self.ess_min)
        return Refined(s.astype(np.float32), rhat, ess, ok)
