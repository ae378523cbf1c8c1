"""Cross-check against dsps, run in a SUBPROCESS: `import dsps` turns on float64 globally.

Prints a JSON dict:
  dust_max_rel : max relative difference of the ISM attenuation (ours vs dsps noll09 with the
                 Kriek & Conroy bump 0.85 - 1.9 n), 0.15-2.2 micron, several (tau, n)
  sed_dmag     : per-band (ugriz) magnitude difference of the same SFH table through dsps's
                 calc_rest_sed_sfh_table_met_table and through our model, on the same grid
"""
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import sedflow_jax as sj
from sedflow_jax.sed import cosmology, dust, photometry, sfh, ssp

import dsps  # noqa: E402  (after our imports on purpose; flips x64)
from dsps.dust.att_curves import noll09_k_att_curve
from dsps.sed.stellar_sed import calc_rest_sed_sfh_table_met_table

out = {}

# ---------------- dust ----------------
wave = np.geomspace(1520, 22000, 400)  # dsps switches to Leitherer at <= 0.15 um
tabs = dust.dust_tables(wave, dtype=jnp.float64)
# FSPS's Calzetti constant is 1.78/0.44 = 4.04545 where dsps uses R_V = 4.05: apart from that
# known offset (removed here, -0.004545 (lambda/5500)^n in k) the curves must be the same
rel = []
for tau, n in [(0.3, -1.5), (1.0, 0.0), (2.0, 0.7), (0.7, -0.4)]:
    ours_k = 4.05 * np.asarray(dust.ism_attenuation_curve(n, tabs))
    ours_k += (4.05 - 1.78 / 0.44) * (wave / 5500.0) ** n
    av = 2.5 / np.log(10) * tau
    theirs_k = 4.05 / av * np.asarray(noll09_k_att_curve(wave / 1e4, av, 0.85 - 1.9 * n, n))
    rel.append(np.max(np.abs(ours_k / theirs_k - 1)))
out["dust_max_rel"] = float(max(rel))

# ---------------- SED from an SFH table ----------------
g0 = ssp.load_ssp_grid()
# shift the metallicity axis so the 0.05 node sits exactly at the clip value Z_MAX, and give the
# galaxy a metallicity history that is clipped there at all times: one metallicity node for both
shift = np.log10(sfh.Z_MAX / 0.019) - g0.logzsol[5]
z = 0.05
# dsps needs every SSP age to be younger than the universe at z (it takes log10(t_obs - age))
keep = 10 ** (g0.log_age_yr - 9) < 0.95 * float(cosmology.age_gyr(z))  # incl. its age-bin edges
grid = dataclasses.replace(g0, logzsol=g0.logzsol + shift, log_age_yr=g0.log_age_yr[keep],
                           spec=g0.spec[:, keep], surviving_frac=g0.surviving_frac[:, keep])
model = sj.load_model(grid=grid, dtype="float64")
results = {}
for label, beta in (("old", [0.0, 0.2, 0.4, 0.4]), ("mixed", [0.4, 0.3, 0.2, 0.1])):
    theta = np.array([10.0, *beta, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    ours = np.asarray(model.sed(theta, z).lum_lambda)
    t_age = float(cosmology.age_gyr(z))
    lay = sfh.bin_layout(jnp.float64(t_age))
    w = np.asarray(sfh.nmf_mass_fractions(jnp.asarray(beta, jnp.float64), lay, sfh.load_nmf_bases()))
    lo, hi = np.asarray(lay.edges_lo), np.asarray(lay.edges_hi)
    # piecewise-constant SFR [Msun/yr] on a fine cosmic-time table
    t_tab = np.linspace(1e-3, t_age, 20000)
    lb = t_age - t_tab
    k = np.clip(np.searchsorted(hi, lb, side="right"), 0, len(w) - 1)
    width = np.where(hi - lo > 0, hi - lo, 1.0)
    sfr = 1e10 * w[k] / (1e9 * width[k])
    lgmet = np.full_like(t_tab, np.log10(grid.zsol) + grid.logzsol[5])
    ssp_lnu = np.asarray(grid.spec, float) * (grid.wave**2 / 2.99792458e18)[None, None, :]
    res = calc_rest_sed_sfh_table_met_table(
        t_tab, sfr, lgmet, 0.01, np.log10(grid.zsol) + grid.logzsol,
        grid.log_age_yr - 9.0, ssp_lnu, t_age)
    theirs = np.asarray(res.rest_sed) * 2.99792458e18 / grid.wave**2  # -> L_lambda
    filt = photometry.load_filters(None)
    wobs = grid.wave * (1 + z)
    m_o = -2.5 * np.log10(photometry.ab_nanomaggies(wobs, ours, filt))
    m_t = -2.5 * np.log10(photometry.ab_nanomaggies(wobs, theirs, filt))
    results[label] = (m_o - m_t).tolist()
out["sed_dmag"] = results
print(json.dumps(out))
