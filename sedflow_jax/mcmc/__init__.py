"""Exact posteriors by MCMC in NumPyro: the galaxy target (prior x Gaussian likelihood), starts,
NUTS / ensemble slice / AIES runners, convergence diagnostics, results and a catalog runner."""
from .sampling_all import *  # noqa: F401,F403
from .sampling_all import __all__  # noqa: F401
