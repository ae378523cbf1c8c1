"""Names of the PROVABGS model parameters (each defined once).

* the **physical** 12-vector ``theta`` (:data:`PARAM_NAMES`): log10 M* [Msun], the 4 NMF SFH
  coefficients beta1..4 (a simplex), burst fraction and age [Gyr], the 2 NMF metallicity
  coefficients gamma1, gamma2, and the Charlot & Fall dust tau_bc, tau_ism, n_dust;
* the **sampling** 11-vector ``s`` (:data:`SAMPLING_NAMES`, SEDflow's ``thetas_unt``): the
  simplex as 3 stick-breaking coordinates u1..u3 and the gammas in log10.
"""
from __future__ import annotations

PARAM_NAMES = (
    "logmstar", "beta1", "beta2", "beta3", "beta4", "fburst", "tburst",
    "gamma1", "gamma2", "tau_bc", "tau_ism", "n_dust",
)
SAMPLING_NAMES = (
    "logmstar", "u1", "u2", "u3", "fburst", "tburst",
    "log10_gamma1", "log10_gamma2", "tau_bc", "tau_ism", "n_dust",
)
N_PARAMS = len(PARAM_NAMES)  # 12
N_SAMPLING = len(SAMPLING_NAMES)  # 11
