"""Regenerate the shipped noise tables from the real SDSS catalog.

    python sedflow_jax/data/make_noise_table.py [--catalog PATH] [--out-dir DIR] [--plot DIR]

Input: ``examples/data/sdss_main_10k.fits`` -- 10,000 SDSS Main-sample galaxies matched to 2MASS
and GALEX from the NYU-VAGC, as shipped in the ``kcorrect==5.1.9`` wheel
(``kcorrect/data/test/gst_tests_small.fits``, BSD-3-Clause; see examples/data/README.md).

Outputs (in ``--out-dir``, default this directory):

* ``noise_sdss_ugriz.json`` -- bands sdss_u..sdss_z from MODELFLUX / MODELFLUX_IVAR
  (nanomaggies), corrected for Galactic extinction with the catalog's EXTINCTION
  (f x 10**(0.4 A), errors likewise), rows with 0.01 < Z < 0.2.

Spread: the robust 1.4826 x MAD of sigma_mag per flux bin, not the plain standard deviation
SEDflow's paper describes. The catalog's sigma_mag has outliers (a few galaxies with sigma ~17
mag in faint u bins) that inflate the standard deviation so much that 42 % of simulated rows drew
sigma <= 0 and were dropped; with the MAD 95 % of draws are positive and the medians are
unchanged.
* ``noise_galex_fuv_nuv.json`` -- bands galex_fuv, galex_nuv from FUV/NUV_FLUX_AUTO and
  *_FLUXERR_AUTO, same redshift cut, only the ~500 / ~750 GALEX-detected rows (zeros and -99
  sentinels are skipped). The FITS header carries no units; these are GALEX MCAT FLUX_AUTO in
  counts/s (kcorrect's galex_to_maggies uses mag = -2.5 log10(flux) + ZP, ZP = 18.82 FUV and
  20.08 NUV; the resulting NUV - r colours, median ~4.0 mag, confirm it), converted to
  nanomaggies by 10**(0.4 (22.5 - ZP)). Galactic extinction: E(B-V) = A_r / 2.751 (the SFD
  coefficient behind SDSS's EXTINCTION), A_FUV = 8.24 E(B-V), A_NUV = 8.20 E(B-V)
  (Wyder et al. 2007). The SExtractor errors are used as given (no calibration floor), so these
  sigmas are lower limits for bright sources; the table describes a small, UV-detected (bluer)
  subsample.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:  # allow running from a checkout without installing
    sys.path.insert(0, str(REPO))

from sedflow_jax.sed.units import (GALEX_A_OVER_EBV, GALEX_BANDS, GALEX_ZP,  # noqa: E402
                                   SDSS_BANDS, SFD_AR_OVER_EBV)
from sedflow_jax.sim.noise_fit import fit_noise_model, plot_noise_model  # noqa: E402
from sedflow_jax.util import sha256_file  # noqa: E402

ZRANGE = (0.01, 0.2)


def make_tables(catalog, out_dir=HERE, plot_dir=None, verbose=True):
    from astropy.table import Table
    import numpy as np

    catalog = Path(catalog)
    t = Table.read(catalog)
    prov = {
        "catalog": "SDSS Main-sample galaxies x 2MASS x GALEX, NYU-VAGC, from the kcorrect==5.1.9 "
                   "wheel (kcorrect/data/test/gst_tests_small.fits), BSD-3-Clause",
        "catalog_file": catalog.name,
        "catalog_sha256": sha256_file(catalog),
        "generator": "sedflow_jax/data/make_noise_table.py",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip counts are recorded in the metadata
        sdss = fit_noise_model(
            t, "MODELFLUX", "MODELFLUX_IVAR", SDSS_BANDS, extinction_col="EXTINCTION",
            zcol="Z", zrange=ZRANGE, n_bins=20, min_per_bin=25, spread="mad",
            metadata={**prov, "flux_type": "SDSS MODELFLUX (nanomaggies), ivar MODELFLUX_IVAR",
                      "cuts": f"{ZRANGE[0]} < Z < {ZRANGE[1]}; per band flux > 0 and ivar > 0"})
        ebv = np.asarray(t["EXTINCTION"], np.float64)[:, 2] / SFD_AR_OVER_EBV
        ext = np.stack([ebv * a for a in GALEX_A_OVER_EBV], axis=1)
        galex = fit_noise_model(
            t, ["FUV_FLUX_AUTO", "NUV_FLUX_AUTO"], err_cols=["FUV_FLUXERR_AUTO", "NUV_FLUXERR_AUTO"],
            bands=GALEX_BANDS, flux_scale=[10 ** (0.4 * (22.5 - zp)) for zp in GALEX_ZP],
            extinction_col=ext, zcol="Z", zrange=ZRANGE, n_bins=10, min_per_bin=25, spread="mad",
            metadata={**prov,
                      "flux_type": "GALEX MCAT FLUX_AUTO / FLUXERR_AUTO in counts/s, x 10**(0.4 (22.5 - ZP)) "
                                   "with ZP FUV 18.82, NUV 20.08 -> nanomaggies",
                      "extinction": "E(B-V) = EXTINCTION_r / 2.751; A_FUV = 8.24 E(B-V), "
                                    "A_NUV = 8.20 E(B-V) (Wyder et al. 2007)",
                      "cuts": f"{ZRANGE[0]} < Z < {ZRANGE[1]}; GALEX-detected rows only (flux > 0, err > 0)",
                      "caveat": "small UV-detected subsample; SExtractor errors without a calibration floor"})
    out_dir = Path(out_dir)
    sdss.save(out_dir / "noise_sdss_ugriz.json")
    galex.save(out_dir / "noise_galex_fuv_nuv.json")
    if plot_dir is not None:
        os.makedirs(plot_dir, exist_ok=True)
        plot_noise_model(sdss, t, Path(plot_dir) / "noise_sdss_ugriz.png", flux_cols="MODELFLUX",
                         ivar_cols="MODELFLUX_IVAR", extinction_col="EXTINCTION", zcol="Z", zrange=ZRANGE)
        plot_noise_model(galex, t, Path(plot_dir) / "noise_galex_fuv_nuv.png",
                         flux_cols=["FUV_FLUX_AUTO", "NUV_FLUX_AUTO"],
                         err_cols=["FUV_FLUXERR_AUTO", "NUV_FLUXERR_AUTO"],
                         flux_scale=[10 ** (0.4 * (22.5 - zp)) for zp in GALEX_ZP],
                         extinction_col=ext, zcol="Z", zrange=ZRANGE)
    if verbose:
        print(sdss.summary())
        print(galex.summary(fluxes=(3.0, 10.0, 30.0, 100.0)))
    return sdss, galex


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", default=str(REPO / "examples" / "data" / "sdss_main_10k.fits"))
    ap.add_argument("--out-dir", default=str(HERE))
    ap.add_argument("--plot", default=None, help="directory for diagnostic PNGs")
    a = ap.parse_args(argv)
    make_tables(a.catalog, a.out_dir, a.plot)


if __name__ == "__main__":
    main()
