"""Catalogs as users have them (sedflow_jax.io.catalog): per-band columns with short SDSS /
GALEX names in any case, NSA NMGY vectors (FUV NUV u g r i z) with Z, SDSS MODELFLUX with
EXTINCTION; the values read are checked against the internal layout, element by element; an
ambiguous catalog is refused in one line. Numpy only (no flow, no JAX compile)."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

import sedflow_jax as sj
from sedflow_jax.io import catalog as C
from sedflow_jax.io.tables import CatalogReader

N = 6
SHORT = ("FUV", "NUV", "u", "g", "r", "i", "z")  # NSA order = C.NSA_BANDS
UGRIZ = C.SDSS_BANDS


def fluxes(seed=0):
    """(flux, ivar, z): (N, 7) distinct values per band in NSA order."""
    rng = np.random.default_rng(seed)
    f = 10 ** rng.uniform(0.5, 2.5, (N, 7)) * (1 + np.arange(7) / 10)
    return f, 1.0 / (0.05 * f) ** 2, rng.uniform(0.02, 0.18, N)


def internal_table(f, iv, z):
    t = Table()
    for j, b in enumerate(C.NSA_BANDS):
        t[f"flux_{b}"], t[f"flux_ivar_{b}"] = f[:, j], iv[:, j]
    t["z"] = z
    return t


def short_table(f, iv, z, case=str):
    """Per-band columns named with the short names, the band part spelled by ``case``."""
    t = Table()
    for j, s in enumerate(SHORT):
        t[f"flux_{case(s)}"], t[f"flux_ivar_{case(s)}"] = f[:, j], iv[:, j]
    t["z"] = z
    return t


def nsa_table(f, iv, z, extinction=None):
    t = Table({"NMGY": f, "NMGY_IVAR": iv, "Z": z})
    if extinction is not None:
        t["EXTINCTION"] = extinction
    return t


@pytest.mark.parametrize("case", [str, str.lower, str.upper, str.swapcase],
                         ids=["as-is", "lower", "upper", "swapped"])
def test_short_band_names_read_the_same_numbers(case):
    f, iv, z = fluxes()
    ref = C.read_photometry(internal_table(f, iv, z), C.NSA_BANDS)
    t = short_table(f, iv, z, case)
    got = C.read_photometry(t, C.NSA_BANDS)
    np.testing.assert_array_equal(got.flux, ref.flux)
    np.testing.assert_array_equal(got.sigma, ref.sigma)
    np.testing.assert_array_equal(got.z, ref.z)
    assert np.all(got.flag == 0) and got.mask.all()
    # the report names the columns it used
    assert f"flux_{case('u')}/flux_ivar_{case('u')}" in got.layout
    assert f"flux_{case('FUV')}" in got.layout
    assert C.catalog_bands(t) == C.NSA_BANDS
    # a model with only some bands takes those, in its order
    sub = C.read_photometry(t, ("sdss_r", "galex_nuv"))
    np.testing.assert_array_equal(sub.flux, f[:, [4, 1]])


def test_internal_names_win_and_keep_their_layout():
    f, iv, z = fluxes()
    t = internal_table(f, iv, z)
    t["NMGY"], t["NMGY_IVAR"] = f * 2, iv  # other fluxes beside the declared layout
    spec = C.ColumnSpec()
    assert spec.resolve(t, UGRIZ) == spec  # unchanged: the declared layout
    np.testing.assert_array_equal(C.read_photometry(t, UGRIZ).flux, f[:, 2:])
    assert C.catalog_bands(t) == C.NSA_BANDS


def test_nsa_nmgy_by_name_for_5_and_7_band_models():
    f, iv, z = fluxes(1)
    ext = np.tile(np.linspace(0.1, 0.7, 7), (N, 1))
    t = nsa_table(f, iv, z, ext)
    assert C.catalog_bands(t) == C.NSA_BANDS
    five = C.read_photometry(t, UGRIZ)  # 5 of 7: elements 2..6, in order
    np.testing.assert_array_equal(five.flux, f[:, 2:])
    np.testing.assert_allclose(five.sigma, 1 / np.sqrt(iv[:, 2:]))
    np.testing.assert_array_equal(five.z, z)  # redshift from Z
    seven = C.read_photometry(t, C.NSA_BANDS)
    np.testing.assert_array_equal(seven.flux, f)
    # NSA's NMGY is already dereddened: EXTINCTION is not applied, and the report says so
    assert "NMGY" in five.layout and "not applied" in five.layout and "Z" in five.layout
    # ... unless asked for: then each band gets its own element
    der = C.read_photometry(t, ("sdss_r", "galex_fuv"), extinction="EXTINCTION")
    np.testing.assert_allclose(der.flux, f[:, [4, 0]] * 10 ** (0.4 * ext[:, [4, 0]]))
    # the resolved spec names only existing columns (what a streaming chunk reads)
    spec = C.ColumnSpec().resolve(t, UGRIZ)
    assert spec.vector_bands == C.NSA_BANDS and set(spec.columns(UGRIZ)) <= set(t.colnames)
    assert spec.resolve(t, UGRIZ) == spec  # idempotent


def test_explicit_vector_bands(tmp_path):
    f, iv, z = fluxes(2)
    order = [6, 5, 4, 3, 2]  # z i r g u
    t = Table({"FLUXES": f[:, order], "FLUXES_IVAR": iv[:, order], "zspec": z})
    kw = dict(vector_flux="FLUXES", vector_ivar="FLUXES_IVAR", z_col="zspec")
    spec = C.ColumnSpec(vector_bands="z,i,r,g,u", **kw)
    assert spec.vector_bands == ("sdss_z", "sdss_i", "sdss_r", "sdss_g", "sdss_u")
    got = C.read_photometry(t, UGRIZ, spec)
    np.testing.assert_array_equal(got.flux, f[:, 2:])
    assert C.catalog_bands(t, spec) == UGRIZ
    with pytest.raises(C.CatalogError, match="galex_fuv"):
        C.read_photometry(t, ("galex_fuv", "sdss_r"), spec)
    # from a FITS file through the chunk reader (streaming): widths seen, NSA order found
    nsa = nsa_table(f, iv, z)
    nsa.write(tmp_path / "nsa.fits")
    cat = CatalogReader(tmp_path / "nsa.fits")
    try:
        assert cat.widths["NMGY"] == 7 and cat.widths["Z"] == 1
        assert C.catalog_bands(cat) == C.NSA_BANDS
        spec = C.ColumnSpec().resolve(cat, UGRIZ)
        chunk = cat.read(1, 4, spec.columns(UGRIZ))
    finally:
        cat.close()
    np.testing.assert_array_equal(C.read_photometry(chunk, UGRIZ, spec).flux, f[1:4, 2:])


def test_sdss_modelflux_with_extinction_applied():
    f, iv, z = fluxes(3)
    a = np.tile([0.5, 0.35, 0.25, 0.2, 0.15], (N, 1)) * np.linspace(1, 2, N)[:, None]
    t = Table({"MODELFLUX": f[:, 2:], "MODELFLUX_IVAR": iv[:, 2:], "Z": z, "EXTINCTION": a})
    assert C.catalog_bands(t) == UGRIZ
    got = C.read_photometry(t, UGRIZ)
    k = 10 ** (0.4 * a)
    np.testing.assert_allclose(got.flux, f[:, 2:] * k, rtol=1e-12)
    np.testing.assert_allclose(got.sigma, k / np.sqrt(iv[:, 2:]), rtol=1e-12)
    assert "EXTINCTION applied" in got.layout and "corrected with EXTINCTION" in got.layout
    two = C.read_photometry(t, ("sdss_i", "sdss_g"))
    np.testing.assert_allclose(two.flux, f[:, [5, 3]] * k[:, [3, 1]], rtol=1e-12)
    # extinction='none' switches it off; the same numbers as an explicit spec without it
    off = C.read_photometry(t, UGRIZ, extinction="none")
    np.testing.assert_array_equal(off.flux, f[:, 2:])
    assert "not corrected" in off.layout
    # the top-level API reads the same
    np.testing.assert_allclose(sj.read_photometry(t, UGRIZ).flux, got.flux)
    assert sj.catalog_bands(t) == UGRIZ


@pytest.mark.parametrize("make,names", [
    (lambda f, iv, z: Table({**short_table(f, iv, z), "flux_U": f[:, 2]}),
     ["flux_u", "flux_U"]),
    (lambda f, iv, z: Table({**nsa_table(f, iv, z), "MODELFLUX": f[:, 2:],
                             "MODELFLUX_IVAR": iv[:, 2:]}), ["NMGY", "MODELFLUX"]),
    (lambda f, iv, z: Table({**short_table(f, iv, z), "NMGY": f, "NMGY_IVAR": iv}),
     ["flux_u", "NMGY"]),
], ids=["two-spellings", "nmgy-and-modelflux", "short-names-and-nmgy"])
def test_ambiguous_catalog_refused(make, names):
    f, iv, z = fluxes()
    t = make(f, iv, z)
    for call in (lambda: C.read_photometry(t, UGRIZ), lambda: C.catalog_bands(t),
                 lambda: C.ColumnSpec().check(t.colnames, UGRIZ)):
        with pytest.raises(C.CatalogError) as exc:
            call()
        msg = str(exc.value)
        assert "\n" not in msg and "ambiguous" in msg
        assert all(n in msg for n in names), msg
    # an explicit choice reads it
    got = C.read_photometry(t, UGRIZ, vector_flux="NMGY", vector_ivar="NMGY_IVAR") \
        if "NMGY" in t.colnames else None
    if got is not None:
        np.testing.assert_array_equal(got.flux, f[:, 2:])


def test_missing_bands_name_the_columns():
    f, iv, z = fluxes()
    t = short_table(f, iv, z)
    t.remove_columns(["flux_g", "flux_ivar_g"])
    assert C.catalog_bands(t) == ("galex_fuv", "galex_nuv", "sdss_u", "sdss_r", "sdss_i",
                                  "sdss_z")
    with pytest.raises(C.CatalogError, match="flux_sdss_g"):
        C.read_photometry(t, UGRIZ)
    assert C.canonical_band("FUV") == "galex_fuv" and C.canonical_band("SDSS_R") == "sdss_r"


def test_calibration_error_added_in_quadrature():
    """calibration_error='auto' adds SDSS's calibration (Padmanabhan et al. 2008: 2 % in u,
    1 % in griz) and GALEX's (0.05 / 0.03 mag) to sigma in quadrature; a galaxy with a
    negligible statistical error ends with sigma / flux at those fractions; none = as given."""
    f, iv, z = fluxes()
    iv = iv.copy()
    iv[0] = 1e12 / f[0] ** 2  # row 0: statistical S/N 10^6
    t = internal_table(f, iv, z)
    raw = C.read_photometry(t, C.NSA_BANDS)
    np.testing.assert_array_equal(raw.sigma, 1.0 / np.sqrt(iv))
    got = C.read_photometry(t, C.NSA_BANDS, calibration_error="auto")
    frac = np.array([0.05, 0.03, 0.05, 0.01, 0.01, 0.01, 0.01]) * np.array(
        [np.log(10) / 2.5, np.log(10) / 2.5, 1, 1, 1, 1, 1])  # GALEX in mag, SDSS in %
    frac[2] = 0.02
    np.testing.assert_allclose(got.sigma[0] / f[0], frac, rtol=2e-3)
    np.testing.assert_allclose(got.sigma, np.sqrt(1.0 / iv + (frac * f) ** 2), rtol=2e-3)
    np.testing.assert_array_equal(got.mask, raw.mask)  # masks use the catalog's own ivar
    assert "calibration error added in quadrature" in got.layout
    # one number: every band; band=mag: those bands only; none: as given
    one = C.read_photometry(t, C.NSA_BANDS, calibration_error=0.02)
    np.testing.assert_allclose(one.sigma, np.hypot(1.0 / np.sqrt(iv), 0.02 * f * np.log(10)
                                                   / 2.5))
    part = C.read_photometry(t, C.NSA_BANDS, calibration_error="u=0.03")
    np.testing.assert_array_equal(np.delete(part.sigma, 2, 1), np.delete(raw.sigma, 2, 1))
    assert np.all(part.sigma[:, 2] > raw.sigma[:, 2])
    none = C.read_photometry(t, C.NSA_BANDS, calibration_error="none")
    np.testing.assert_array_equal(none.sigma, raw.sigma)
    for bad, msg in [(-0.01, "finite and >= 0"), ("q=0.1", "not among"), ("x", "'auto'")]:
        with pytest.raises(C.CatalogError, match=msg):
            C.read_photometry(t, C.NSA_BANDS, calibration_error=bad)


def test_mcmc_catalog_arrays_get_the_calibration_error_too():
    """The MCMC catalog runner adds the calibration error to array catalogs as to tables."""
    from sedflow_jax.mcmc import catalog as MC

    f, iv, z = fluxes()
    f, iv = f[:, 2:], iv[:, 2:]
    frac = np.array([0.02, 0.01, 0.01, 0.01, 0.01])
    want = np.sqrt(1.0 / iv + (frac * f) ** 2)
    for cat in ((f, 1.0 / np.sqrt(iv), z), {"flux": f, "ivar": iv, "z": z}):
        got = MC._catalog_arrays(cat, UGRIZ, "flux_{band}", "flux_ivar_{band}", "z", None,
                                 calibration_error="auto")[1]
        np.testing.assert_allclose(got, want, rtol=1e-12)
        raw = MC._catalog_arrays(cat, UGRIZ, "flux_{band}", "flux_ivar_{band}", "z", None)[1]
        np.testing.assert_allclose(raw, 1.0 / np.sqrt(iv), rtol=1e-12)
