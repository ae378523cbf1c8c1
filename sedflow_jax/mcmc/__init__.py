"""Exact posteriors by MCMC in NumPyro: the galaxy target (prior x Gaussian likelihood), starts,
NUTS / ensemble slice / AIES runners, convergence diagnostics, results and a catalog runner.

* :mod:`.target` -- :class:`Target` (a log density on a box), :func:`make_target`,
  :func:`condition`, :func:`numpyro_model`;
* :mod:`.galaxy` -- :func:`galaxy_data`, :func:`galaxy_target`: one galaxy's posterior in the
  11-dim sampling space (PROVABGS prior, Gaussian likelihood on nanomaggies);
* :mod:`.starts` -- :func:`find_map`, :func:`initial_points` (MAP ball, prior, given draws);
* :mod:`.runners` -- :func:`run_nuts`, :func:`run_ess`, :func:`run_aies`, :func:`run_sampler`,
  device / chain defaults, :func:`clear_caches`;
* :mod:`.convergence` -- rank-normalised split R-hat, bulk / tail ESS, ensemble versions;
* :mod:`.results` -- :class:`MCMCResult` (ArviZ export, ``.npz``), :func:`load_result`;
* :mod:`.catalog` -- :func:`run_mcmc_catalog`: a catalog fit galaxy by galaxy, resumable.
"""
from .catalog import run_mcmc_catalog
from .compiled import evaluate_log_density
from .convergence import convergence, ensemble_convergence, ess_bulk, ess_tail, split_rhat
from .galaxy import galaxy_data, galaxy_target
from .results import MCMCResult, load_result
from .runners import (SAMPLERS, clear_caches, default_chain_method, default_num_chains, run_aies,
                      run_ess, run_nuts, run_sampler, set_cpu_devices)
from .starts import find_map, initial_points
from .target import Target, condition, make_target, numpyro_model

__all__ = [
    "Target",
    "make_target",
    "condition",
    "galaxy_target",
    "galaxy_data",
    "numpyro_model",
    "MCMCResult",
    "find_map",
    "initial_points",
    "run_nuts",
    "run_ess",
    "run_aies",
    "run_sampler",
    "convergence",
    "ensemble_convergence",
    "split_rhat",
    "ess_bulk",
    "ess_tail",
    "run_mcmc_catalog",
    "load_result",
    "SAMPLERS",
    "set_cpu_devices",
    "default_num_chains",
    "default_chain_method",
    "clear_caches",
    "evaluate_log_density",
]
