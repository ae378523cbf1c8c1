"""Build a PROVABGS-like FSPS SSP grid in sedflow-jax's .npz format with python-fsps.

Needs python-fsps (`pip install fsps`) and an FSPS data directory in $SPS_HOME (MIST isochrones,
MILES spectra; not downloadable from every machine). PROVABGS's settings (spec §5.1): Chabrier IMF
(imf_type=1), SSPs (sfh=0), all native ages and metallicities (zcontinuous=0), no dust, no
nebular emission, no IGM:

    SPS_HOME=/path/to/fsps python ssp_templates/build_fsps_grid.py --out ssp_fsps_mist_miles_chabrier.npz

Then: sedflow_jax.load_model(grid="ssp_fsps_mist_miles_chabrier.npz").
Output arrays: spec [n_met, n_age, n_wave] L_sun/A per M_sun formed (get_spectrum(peraa=True)),
wave [A], log_age_yr, logzsol = log10(Z / zsol) with zsol = 0.0142 (MIST), surviving_frac
(FSPS stellar_mass: stars + remnants per M_sun formed), lsun_cgs = 3.839e33 (FSPS's L_sun).
"""
import argparse
import datetime
import os

import numpy as np

FSPS_LSUN_CGS = 3.839e33
MIST_ZSOL = 0.0142


def stellar_population(**overrides):
    """A python-fsps StellarPopulation configured as PROVABGS's SSPs (no dust, no nebular)."""
    import fsps

    kw = dict(zcontinuous=0, sfh=0, imf_type=1, dust_type=0, dust1=0.0, dust2=0.0,
              add_neb_emission=False, add_neb_continuum=False, add_igm_absorption=False,
              add_dust_emission=False)
    kw.update(overrides)
    return fsps.StellarPopulation(**kw)


def build_grid(sp, zsol=MIST_ZSOL):
    """Arrays of our .npz format from a configured StellarPopulation-like object ``sp``.

    ``sp`` needs ``zlegend`` (absolute Z of each zmet), ``wavelengths`` [A], ``log_age``
    (log10 yr), ``params`` (dict-like, 'zmet' settable), ``get_spectrum(tage=0, peraa=True)``
    returning (ages, spectra [n_age, n_wave] L_sun/A per M_sun) and ``stellar_mass`` per age.
    """
    zleg = np.asarray(sp.zlegend, float)
    spec, surv = [], []
    for k in range(len(zleg)):
        sp.params["zmet"] = k + 1  # FSPS zmet is 1-based
        _, s = sp.get_spectrum(tage=0, peraa=True)
        spec.append(np.asarray(s, np.float32))
        surv.append(np.asarray(sp.stellar_mass, float))
    return dict(
        spec=np.stack(spec), wave=np.asarray(sp.wavelengths, float),
        log_age_yr=np.asarray(sp.log_age, float), logzsol=np.log10(zleg / zsol),
        zsol=np.float64(zsol), surviving_frac=np.stack(surv), lsun_cgs=np.float64(FSPS_LSUN_CGS),
        units=np.str_("Lsun/Angstrom/Msun"),
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="ssp_fsps_mist_miles_chabrier.npz")
    a = ap.parse_args()
    if not os.environ.get("SPS_HOME"):
        raise SystemExit("SPS_HOME is not set: python-fsps needs the FSPS data directory")
    import fsps

    sp = stellar_population()
    arrays = build_grid(sp)
    arrays["source"] = np.str_(
        f"python-fsps {getattr(fsps, '__version__', '?')} (libraries {sp.libraries}), "
        f"imf_type=1 zcontinuous=0 sfh=0, no dust/nebular/IGM; built "
        f"{datetime.date.today().isoformat()} by ssp_templates/build_fsps_grid.py")
    np.savez_compressed(a.out, **arrays)
    from sedflow_jax.ssp import load_ssp_grid

    print(load_ssp_grid(a.out))


if __name__ == "__main__":
    main()
