"""Sanity tests of the independent NumPy reference model (tests/reference_model.py)."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import reference_model as R  # noqa: E402

THETA = np.array([10, .25, .25, .25, .25, 0.1, 2.0, 1e-3, 1e-3, 0.5, 0.5, -0.3])


def test_cosmology_reference_values():
    t01, d01 = R.reference_cosmology(0.1)
    t02, d02 = R.reference_cosmology(0.2)
    assert t01 == pytest.approx(12.4530, abs=1e-4)
    assert t02 == pytest.approx(11.2874, abs=1e-4)
    assert d01 == pytest.approx(1.46613e27, rel=1e-5)
    assert d02 == pytest.approx(3.11971e27, rel=1e-5)


def test_nmf_bases_layout():
    nmf = R.nmf_basis_functions()
    t = nmf["t"]
    assert t[0] == pytest.approx(0.066989, abs=1e-6) and t[-1] == pytest.approx(13.627830, abs=1e-6)
    # README numbers: beta1 extrapolates to ~0.0653 at t=0; beta4 slightly negative at 13.796
    assert nmf["sfh"][0](0.0) == pytest.approx(0.0653, abs=2e-4)
    assert nmf["sfh"][3](13.796) == pytest.approx(-8.6e-4, abs=2e-5)
    # peaks (lookback Gyr) of beta1..4 and gamma2
    peaks = [t[np.argmax(nmf["sfh_nodes"][i])] for i in range(4)]
    assert np.allclose(peaks, [1.17, 5.60, 8.37, 11.14], atol=0.02)
    assert nmf["zh_nodes"][0][0] == pytest.approx(5.458, abs=1e-3)
    assert t[np.argmax(nmf["zh_nodes"][1])] == pytest.approx(6.99, abs=0.02)


def test_edges_and_centres():
    edges = R.reference_time_edges(R.reference_cosmology(0.1)[0])
    assert len(edges) == 43
    assert edges[0] == 0 and edges[1] == pytest.approx(10 ** 6.05 / 1e9)
    c = 0.5 * (edges[1:] + edges[:-1])
    assert c[0] == pytest.approx(5.61e-4, rel=1e-3)
    # the bin [10^6.95, 10^7.05] yr has centre log t = 7.0029
    k = np.argmin(np.abs(edges - 10 ** 6.95 / 1e9))
    assert np.log10(c[k] * 1e9) == pytest.approx(7.0029, abs=1e-4)
    # fewer bins at higher z
    assert len(R.reference_time_edges(R.reference_cosmology(0.3)[0])) < 43


@pytest.mark.parametrize("z", [0.01, 0.1, 0.5, 1.0])
def test_bin_masses_sum_to_one(z):
    rng = np.random.default_rng(1)
    for _ in range(3):
        th = THETA.copy()
        th[1:5] = rng.dirichlet(np.ones(4))
        edges, centres, w = R.reference_bin_masses(th, z)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        assert edges[-1] == pytest.approx(R.reference_cosmology(z)[0])
        assert np.all(np.diff(edges) > 0)


def test_bin_integrals_match_exact_spline_integral():
    """Fine-grid trapezoid vs exact integral of the 50-node extrapolating linear spline."""
    nmf = R.nmf_basis_functions()
    edges = R.reference_time_edges(R.reference_cosmology(0.05)[0])
    integ = R._nmf_bin_integrals(edges)
    for i in range(4):
        f = nmf["sfh"][i]
        for k in range(len(edges) - 1):
            a, b = edges[k], edges[k + 1]
            pts = np.concatenate([[a], nmf["t"][(nmf["t"] > a) & (nmf["t"] < b)], [b]])
            v = f(pts)
            exact = np.sum(0.5 * (v[1:] + v[:-1]) * np.diff(pts))
            assert integ[i, k] == pytest.approx(exact, rel=1e-4, abs=1e-9)


def test_metallicity_clip_and_weights():
    th = THETA.copy()
    th[7:9] = [1e-7, 1e-7]
    assert np.all(R.reference_metallicity(th, [0.01, 1.0, 5.0]) == R.Z_MIN)
    th[7:9] = [1.0, 1.0]
    assert np.all(R.reference_metallicity(th, [0.01, 1.0, 5.0]) == R.Z_MAX)
    # extrapolation below the lowest node: unclamped (negative) weight
    (j0, w0), (j1, w1) = R.metallicity_weights(R.Z_MIN)
    assert (j0, j1) == (0, 1) and w1 < 0 and w0 + w1 == pytest.approx(1.0)


def test_ssp_at_nodes_is_grid():
    g = R.load_ssp_grid()
    iz, ia = 4, 150
    Z = 0.019 * 10 ** g["logzsol"][iz]
    age = 10 ** g["log_age"][ia] / 1e9
    y, o, live = R.reference_ssp(age, Z)
    np.testing.assert_allclose(y + o, g["spec"][iz, ia], rtol=1e-10)
    assert live == pytest.approx(g["live_frac"][iz, ia], rel=1e-10)
    assert np.all(y == 0)  # old node
    y, o, _ = R.reference_ssp(10 ** 6.5 / 1e9, Z)
    assert np.all(o == 0) and np.any(y > 0)


def test_single_burst_equals_ssp():
    z = 0.1
    th = THETA.copy()
    th[5], th[6] = 1.0, 3.3
    th[9:12] = [0.0, 0.0, 0.0]
    wave, lum = R.reference_rest_sed(th, z)
    Zb = R.reference_metallicity(th, 3.3)
    y, o, _ = R.reference_ssp(3.3, Zb)
    np.testing.assert_allclose(lum, 10 ** th[0] * (y + o), rtol=1e-12)
    # with dust: only ISM, tau_BC irrelevant for the burst (even a young burst)
    th[6] = 0.003
    th[9:12] = [2.0, 0.7, -0.5]
    wave, lum = R.reference_rest_sed(th, z)
    y, o, _ = R.reference_ssp(0.003, R.reference_metallicity(th, 0.003))
    np.testing.assert_allclose(lum, 10 ** th[0] * (y + o) * R.reference_attenuation_ism(wave, 0.7, -0.5),
                               rtol=1e-12)


def test_burst_beyond_age_dropped_and_compat_bug():
    z = 0.1
    t_age = R.reference_cosmology(z)[0]
    th = THETA.copy()
    th[5] = 0.4
    _, centres, _ = R.reference_bin_masses(th, z)
    th0 = th.copy(); th0[5] = 0.0
    _, l_noburst = R.reference_rest_sed(th0, z)
    # burst older than the universe: dropped, NMF part still scaled by (1 - fburst)
    th[6] = t_age + 0.1
    _, l = R.reference_rest_sed(th, z)
    np.testing.assert_allclose(l, 0.6 * l_noburst, rtol=1e-12)
    # between last centre and t_age: kept by default, dropped with compat_bug
    th[6] = 0.5 * (centres[-1] + t_age)
    _, l_def = R.reference_rest_sed(th, z)
    _, l_bug = R.reference_rest_sed(th, z, compat_bug=True)
    np.testing.assert_allclose(l_bug, 0.6 * l_noburst, rtol=1e-12)
    assert np.all(l_def >= l_bug) and np.any(l_def > l_bug)


def test_dust_curve():
    assert R.calzetti_kprime([5500.0])[0] == pytest.approx(0.998, abs=2e-3)
    assert R.calzetti_kprime([40000.0])[0] == 0.0
    w = np.array([2175.0])
    assert R.drude_bump(w, 0.0)[0] == pytest.approx(0.85)
    np.testing.assert_allclose(R.reference_attenuation_ism(np.linspace(1000, 9000, 5), 0.0, -1.0), 1.0)
    assert R.reference_attenuation_bc([5500.0], 1.0)[0] == pytest.approx(np.exp(-1.0))


def test_tau_bc_only_affects_young_nmf_light():
    z = 0.1
    th = THETA.copy()
    th[9] = 0.0
    _, l0 = R.reference_rest_sed(th, z)
    th[9] = 1.5
    _, l1 = R.reference_rest_sed(th, z)
    assert np.all(l1 <= l0) and np.any(l1 < l0)
    # a longer birth-cloud time makes more nodes young -> more attenuation
    _, l2 = R.reference_rest_sed(th, z, t_bc_yr=1e8)
    assert np.all(l2 <= l1 * (1 + 1e-12)) and np.any(l2 < l1 * (1 - 1e-6))
    # the exponent option changes the result
    _, l3 = R.reference_rest_sed(th, z, t_bc_yr=1e8, bc_index=-0.7)
    assert not np.allclose(l3, l2)


def test_ab_zero_point_units():
    """A flat f_nu = 3631 Jy spectrum must give 1 maggie in every band."""
    import astropy.units as u
    wave = np.linspace(500.0, 30000.0, 20000)
    fnu = 3631e-23  # erg/s/cm^2/Hz
    flam = fnu * 2.99792458e18 / wave ** 2
    for band in R.ALL_BANDS:
        m = R.load_filter(band).get_ab_maggies(flam * u.erg / (u.s * u.cm ** 2 * u.Angstrom),
                                               wave * u.Angstrom)
        assert float(m) == pytest.approx(1.0, rel=1e-4)


def test_photometry_scaling_and_values():
    f1 = R.reference_photometry(THETA, 0.1)
    th = THETA.copy(); th[0] += 1
    f2 = R.reference_photometry(th, 0.1)
    np.testing.assert_allclose(f2, 10 * f1, rtol=1e-12)
    mags = R.nmgy_to_mag(f1)
    assert np.all(np.isfinite(mags))
    assert 18.0 < mags[2] < 20.5
    assert np.all(np.diff(mags) < 0)  # red galaxy-ish: u fainter than z


def test_random_draws_finite():
    rng = np.random.default_rng(0)
    for _ in range(10):
        u1, u2, u3 = rng.uniform(size=3)
        beta = [1 - u1, u1 * (1 - u2), u1 * u2 * (1 - u3), u1 * u2 * u3]
        th = np.array([rng.uniform(7, 12.5), *beta, rng.uniform(), rng.uniform(0.01, 13.27),
                       10 ** rng.uniform(np.log10(4.5e-5), np.log10(1.5e-2)),
                       10 ** rng.uniform(np.log10(4.5e-5), np.log10(1.5e-2)),
                       rng.uniform(0, 3), rng.uniform(0, 3), rng.uniform(-2, 1)])
        z = rng.uniform(0.01, 0.2)
        f = R.reference_photometry(th, z, bands=R.ALL_BANDS)
        assert np.all(np.isfinite(f)) and np.all(f > 0)
        d = R.reference_derived(th, z)
        assert np.all(np.isfinite([d[k] for k in ("sfr_100myr", "sfr_1gyr", "z_mw", "t_mw",
                                                   "logmstar_surviving")]))


def test_derived():
    z = 0.1
    d = R.reference_derived(THETA, z)
    assert d["bin_masses"].sum() == pytest.approx(10 ** THETA[0], rel=1e-12)
    assert 0 < d["t_mw"] < d["t_age"]
    assert R.Z_MIN <= d["z_mw"] <= R.Z_MAX
    assert d["logmstar_surviving"] < THETA[0]
    # pure burst younger than 100 Myr: SFR_100Myr = M / 1e8 yr
    th = THETA.copy(); th[5], th[6] = 1.0, 0.05
    d = R.reference_derived(th, z)
    assert d["sfr_100myr"] == pytest.approx(10 ** th[0] / 1e8, rel=1e-12)
    assert d["sfr_1gyr"] == pytest.approx(10 ** th[0] / 1e9, rel=1e-12)
    edges = R.reference_time_edges(d["t_age"])
    kb = np.searchsorted(edges, 0.05, side="right") - 1      # edges[kb] <= 0.05 < edges[kb+1]
    assert d["t_mw"] == pytest.approx(0.5 * (edges[kb] + edges[kb + 1]), rel=1e-12)
    # SFR over a window longer than t_age = M / (1e9 * delta)
    edges, _, w = R.reference_bin_masses(THETA, z)
    assert R._nmf_mass_fraction_younger_than(20.0, edges, w) == pytest.approx(1.0)
