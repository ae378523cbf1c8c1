"""Charlot & Fall two-component dust as in FSPS dust_type=4 (spec §6), pure JAX.

Diffuse ISM (all stars): transmission exp(-tau_ISM A(lambda)),
    A(lambda) = [k'(lambda) + D(lambda)/4.05] (lambda / 5500 A)^n_dust,
with k' the Calzetti (2000) curve divided by R_V = 4.05 (k'(5500 A) ~ 0.998) and D the Kriek &
Conroy (2013) Drude UV bump tied to the slope, E_b = 0.85 - 1.9 n_dust.
Birth clouds (young stars only): exp(-tau_BC (lambda / 5500 A)^bc_index), bc_index = -1 (FSPS default;
the papers' -0.7 is an option of the model).
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

LAMBDA_V = 5500.0
BUMP_CENTRE, BUMP_WIDTH = 2175.0, 350.0


def calzetti_kprime(wave):
    """Calzetti (2000) k(lambda)/4.05 as in FSPS attn_curve (numpy, wave in Angstrom)."""
    x = 1e4 / np.asarray(wave, float)
    blue = (1.17 * (-2.156 + 1.509 * x - 0.198 * x**2 + 0.011 * x**3) + 1.78) / (0.44 * 4.05)
    red = (1.17 * (-1.857 + 1.04 * x) + 1.78) / (0.44 * 4.05)
    return np.where(np.asarray(wave) <= 6300.0, blue, np.maximum(red, 0.0))


def drude_shape(wave):
    """Drude profile of the 2175 A bump per unit E_b (numpy, wave in Angstrom)."""
    w = np.asarray(wave, float)
    lw2 = (w * BUMP_WIDTH) ** 2
    return lw2 / ((w**2 - BUMP_CENTRE**2) ** 2 + lw2)


class DustTables(NamedTuple):
    """Per-wavelength constants of the attenuation curves (float arrays of shape (n_wave,))."""

    kprime: jnp.ndarray  # Calzetti / 4.05
    bump: jnp.ndarray  # Drude shape / 4.05 (per unit E_b)
    log_ratio: jnp.ndarray  # ln(lambda / 5500 A)
    bc_power: jnp.ndarray  # (lambda / 5500 A)^bc_index


def dust_tables(wave, bc_index=-1.0, dtype=jnp.float32) -> DustTables:
    """Precompute the galaxy-independent parts of the curves on ``wave`` [Angstrom]."""
    w = np.asarray(wave, float)
    return DustTables(
        kprime=jnp.asarray(calzetti_kprime(w), dtype),
        bump=jnp.asarray(drude_shape(w) / 4.05, dtype),
        log_ratio=jnp.asarray(np.log(w / LAMBDA_V), dtype),
        bc_power=jnp.asarray((w / LAMBDA_V) ** bc_index, dtype),
    )


def ism_attenuation_curve(n_dust, tables: DustTables):
    """A(lambda) of the diffuse ISM for slope offset ``n_dust`` (scalar). Returns (n_wave,)."""
    e_b = 0.85 - 1.9 * n_dust
    return (tables.kprime + e_b * tables.bump) * jnp.exp(n_dust * tables.log_ratio)


def transmissions(tau_bc, tau_ism, n_dust, tables: DustTables):
    """(T_young_extra, T_ism): birth-cloud factor (young light only) and ISM factor, (n_wave,) each."""
    t_ism = jnp.exp(-tau_ism * ism_attenuation_curve(n_dust, tables))
    t_bc = jnp.exp(-tau_bc * tables.bc_power)
    return t_bc, t_ism
