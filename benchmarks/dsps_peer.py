"""The dsps peer for benchmarks: per-galaxy SED from an SFH table + magnitudes, on OUR grid.

Run as a separate process (``import dsps`` turns on float64 for the whole process):
    python benchmarks/dsps_peer.py --n 1000 [--filters sdss_u ...]
Prints one JSON line: {"galaxies_per_s": ..., "n": ..., "n_t": ..., "x64": true}.
dsps's path: calc_rest_sed_sfh_table_met_table (100-point SFH and metallicity tables) then
calc_obs_mag per filter, jit + vmap over galaxies (how dsps is meant to be batched).
"""
import argparse
import json
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-t", type=int, default=100)
    ap.add_argument("--filters", nargs="*", default=["sdss_u", "sdss_g", "sdss_r", "sdss_i", "sdss_z"])
    a = ap.parse_args()

    from sedflow_jax.sed import photometry, ssp

    grid = ssp.load_ssp_grid()
    filters = photometry.load_filters(a.filters)

    import jax
    import jax.numpy as jnp
    from dsps import calc_obs_mag, calc_rest_sed_sfh_table_met_table
    from dsps.cosmology import DEFAULT_COSMOLOGY

    # dsps requires SSP ages younger than the universe at the observed epoch
    keep = grid.log_age_yr < 10.05
    lnu = jnp.asarray(grid.spec[:, keep] * (grid.wave**2 / 2.99792458e18)[None, None, :])
    lgmet = jnp.asarray(np.log10(grid.zsol) + grid.logzsol)
    lg_age = jnp.asarray(grid.log_age_yr[keep] - 9.0)
    wave = jnp.asarray(grid.wave)
    fw = [jnp.asarray(f.wave) for f in filters]
    fr = [jnp.asarray(f.response) for f in filters]
    t_obs = 12.0
    t_table = jnp.linspace(0.05, t_obs, a.n_t)
    c = DEFAULT_COSMOLOGY

    def one(sfr, lgz, z):
        sed = calc_rest_sed_sfh_table_met_table(t_table, sfr, lgz, 0.1, lgmet, lg_age, lnu, t_obs)
        return jnp.stack([calc_obs_mag(wave, sed.rest_sed, w, r, z, c.Om0, c.w0, c.wa, c.h)
                          for w, r in zip(fw, fr)])

    f = jax.jit(jax.vmap(one))
    rng = np.random.default_rng(0)
    sfr = jnp.asarray(10 ** rng.uniform(-1, 1, (a.n, a.n_t)))
    lgz = jnp.asarray(np.full((a.n, a.n_t), np.log10(0.01)))
    zz = jnp.asarray(rng.uniform(0.02, 0.2, a.n))
    f(sfr, lgz, zz).block_until_ready()
    t0 = time.perf_counter()
    out = f(sfr, lgz, zz).block_until_ready()
    dt = time.perf_counter() - t0
    assert np.all(np.isfinite(np.asarray(out)))
    print(json.dumps({"galaxies_per_s": a.n / dt, "n": a.n, "n_t": a.n_t,
                      "x64": bool(jax.config.jax_enable_x64)}))


if __name__ == "__main__":
    main()
