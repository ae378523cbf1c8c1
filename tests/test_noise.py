"""Tests of sedflow_jax.noise: fit on the real SDSS catalog, sampling statistics, cuts, I/O."""
import json
import math
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from astropy.table import Table
from scipy import stats

from sedflow_jax.sim import noise as N
from sedflow_jax.sim import noise_fit as NF

CATALOG = Path(__file__).resolve().parents[1] / "examples" / "data" / "sdss_main_10k.fits"
SDSS = ("sdss_u", "sdss_g", "sdss_r", "sdss_i", "sdss_z")
LN = 2.5 / math.log(10.0)

needs_catalog = pytest.mark.skipif(not CATALOG.exists(), reason="real SDSS catalog not present")


@pytest.fixture(scope="module")
def catalog():
    return Table.read(CATALOG)


@pytest.fixture(scope="module")
def fitted(catalog):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NF.fit_noise_model(catalog, "MODELFLUX", "MODELFLUX_IVAR", SDSS,
                                 extinction_col="EXTINCTION", zcol="Z", zrange=(0.01, 0.2))


def _catalog_numpy(catalog):
    """Plain-NumPy extraction, independent of the module: dereddened flux and sigma_mag."""
    z = np.asarray(catalog["Z"], float)
    rows = (z > 0.01) & (z < 0.2)
    f = np.asarray(catalog["MODELFLUX"], float)[rows]
    iv = np.asarray(catalog["MODELFLUX_IVAR"], float)[rows]
    a = np.asarray(catalog["EXTINCTION"], float)[rows]
    out = {}
    for i, b in enumerate(SDSS):
        ok = (f[:, i] > 0) & (iv[:, i] > 0)
        sm = LN / np.sqrt(iv[ok, i]) / f[ok, i]
        out[b] = (f[ok, i] * 10 ** (0.4 * a[ok, i]), sm)
    return out


def _toy_model(median=0.1, spread=0.01, bands=("b1", "b2"), flux_range=(1.0, 1000.0)):
    per = {b: {"log10_flux_center": [0.0, 1.0, 2.0, 3.0], "median_sigma_mag": [median] * 4,
               "spread_sigma_mag": [spread] * 4, "n_per_bin": [10] * 4, "flux_range": list(flux_range)}
           for b in bands}
    return N.NoiseModel.from_per_band(per, {"source": "toy"})


@needs_catalog
def test_fit_reproduces_catalog_binned_medians(catalog, fitted):
    data = _catalog_numpy(catalog)
    for i, b in enumerate(SDSS):
        f, sm = data[b]
        order = np.argsort(f)
        f, sm = f[order], sm[order]
        lo, hi = np.searchsorted(f, np.percentile(f, [2, 98]))
        # independent bins: consecutive groups of 400 galaxies inside the 2-98th percentiles
        for start in range(lo, hi - 400, 400):
            fb, sb = f[start:start + 400], sm[start:start + 400]
            fmed, smed = np.median(fb), np.median(sb)
            flux = np.zeros((1, 5), np.float32)
            flux[0, i] = fmed
            mu, s = (float(np.asarray(x)[0, i]) for x in N.sigma_mag_params(fitted, jnp.asarray(flux)))
            assert abs(mu - smed) < 0.5 * s, (b, fmed, mu, smed, s)
            assert abs(mu - smed) < 0.12 * smed, (b, fmed, mu, smed)
            # the spread is the robust 1.4826 MAD of sigma_mag: same order as in the
            # independent bin
            mad = 1.4826 * np.median(np.abs(sb - smed))
            assert 0.5 < s / mad < 2.0, (b, fmed, s, mad)
    # bin bookkeeping: every bin holds >= min_per_bin and counts add up
    md = fitted.metadata
    assert md["n_after_zcut"] == 9264
    for i, b in enumerate(SDSS):
        k = int(fitted.n_bins[i])
        npb = np.asarray(fitted.n_per_bin[i, :k])
        assert npb.min() >= 25 and npb.sum() == md["bands"][b]["n_used"]
        np.testing.assert_allclose(np.asarray(fitted.flux_range[i]),
                                   [data[b][0].min(), data[b][0].max()], rtol=1e-6)
    assert md["bands"]["sdss_u"]["n_skipped_invalid"] == 9  # u-band rows with flux <= 0


@needs_catalog
def test_shipped_table_matches_refit(fitted):
    shipped = N.default_noise_model()
    assert shipped.bands == SDSS
    for name in ("log10_flux", "median", "spread", "flux_range"):
        np.testing.assert_allclose(getattr(shipped, name), getattr(fitted, name), rtol=1e-5)
    np.testing.assert_array_equal(shipped.n_per_bin, fitted.n_per_bin)
    md = shipped.metadata
    assert md["catalog_sha256"].startswith("d7e87e8a") and md["extinction_corrected"]
    assert "0.01 < Z < 0.2" in md["cuts"]


def test_sampled_sigma_statistics():
    noise = N.default_noise_model()
    i = 2  # r band, a well-populated bin
    k = 4
    f0 = 10 ** float(noise.log10_flux[i, k])
    mu, s = float(noise.median[i, k]), float(noise.spread[i, k])
    flux = jnp.full((40_000, 5), f0, jnp.float32)
    smag = np.asarray(N.sample_sigma_mag(jax.random.PRNGKey(0), noise, flux))[:, i]
    n = smag.size
    assert abs(np.median(smag) - mu) < 4 * 1.2533 * s / math.sqrt(n)
    assert abs(smag.std(ddof=1) / s - 1) < 4 / math.sqrt(2 * n)
    assert stats.kstest((smag - mu) / s, "norm").pvalue > 1e-3
    sig = np.asarray(N.sample_sigma(jax.random.PRNGKey(0), noise, flux))
    np.testing.assert_allclose(sig[:, i], smag * f0 / LN, rtol=1e-5)
    # between two bin centres the parameters are interpolated linearly in log10 flux
    x = 0.5 * (float(noise.log10_flux[i, k]) + float(noise.log10_flux[i, k + 1]))
    fl = np.ones((1, 5), np.float32) * 100
    fl[0, i] = 10 ** x
    m2, _ = N.sigma_mag_params(noise, jnp.asarray(fl))
    assert float(m2[0, i]) == pytest.approx(0.5 * (float(noise.median[i, k]) + float(noise.median[i, k + 1])),
                                            rel=1e-4)
    # clamped beyond the outermost centres
    fl[0, i] = 1e-3
    m3, s3 = N.sigma_mag_params(noise, jnp.asarray(fl))
    assert float(m3[0, i]) == pytest.approx(float(noise.median[i, 0]), rel=1e-6)
    fl[0, i] = 1e9
    m4, _ = N.sigma_mag_params(noise, jnp.asarray(fl))
    kk = int(noise.n_bins[i]) - 1
    assert float(m4[0, i]) == pytest.approx(float(noise.median[i, kk]), rel=1e-6)


def test_noisy_residuals_standard_normal():
    noise = N.default_noise_model()
    key = jax.random.PRNGKey(1)
    lf = jax.random.uniform(key, (20_000, 5), minval=2.0, maxval=3.5)
    flux = 10 ** lf
    out = N.add_noise(jax.random.PRNGKey(2), noise, flux)
    assert out.flux.shape == (20_000, 5) and out.flux.dtype == jnp.float32
    ok = np.asarray(out.keep)
    r = (np.asarray(out.flux) - np.asarray(flux))[ok] / np.asarray(out.sigma)[ok]
    for j in range(5):
        assert abs(r[:, j].mean()) < 4 / math.sqrt(len(r))
        assert abs(r[:, j].std() - 1) < 0.03
        assert stats.kstest(r[:, j], "norm").pvalue > 1e-3
    np.testing.assert_allclose(np.asarray(out.sigma), np.asarray(out.sigma_mag) * np.asarray(flux) / LN,
                               rtol=1e-5)


def test_nonpositive_sigma_and_range_dropped_and_counted():
    noise = _toy_model(median=0.0, spread=0.05)  # half of all sigma draws are negative
    flux = jnp.full((4000, 2), 10.0)
    flux = flux.at[:100, 0].set(0.5).at[100:150, 1].set(5000.0)  # out of [1, 1000]
    out = N.add_noise(jax.random.PRNGKey(3), noise, flux)
    sig = np.asarray(out.sigma)
    want_sig = np.all(sig > 0, axis=1)
    np.testing.assert_array_equal(np.asarray(out.sigma_ok), want_sig)
    want_rng = np.ones(4000, bool)
    want_rng[:150] = False
    np.testing.assert_array_equal(np.asarray(out.in_range), want_rng)
    theta = np.arange(4000)
    kept, (theta_k,), rep = N.apply_cuts(out, theta)
    assert rep["n_total"] == 4000
    assert rep["n_kept"] == int((want_sig & want_rng).sum()) == len(theta_k) == len(kept.flux)
    assert rep["n_dropped"] == 4000 - rep["n_kept"]
    assert rep["n_sigma_nonpositive"] == int((~want_sig).sum())
    assert rep["n_out_of_range"] == 150
    assert 0.70 < rep["n_sigma_nonpositive"] / 4000 < 0.80  # 1 - 0.5**2
    assert np.all(kept.sigma > 0) and np.all(theta_k >= 150)
    # without the range cut only sigma decides
    out2 = N.add_noise(jax.random.PRNGKey(3), noise, flux, range_cut=False)
    np.testing.assert_array_equal(np.asarray(out2.keep), want_sig)


def test_missing_band_clear_error():
    with pytest.raises(KeyError, match="wise_w1"):
        N.default_noise_model(("sdss_r", "wise_w1"))
    with pytest.raises(KeyError, match="sdss_u"):
        _toy_model().select(["sdss_u"])
    with pytest.raises(ValueError, match=r"\(\.\.\., 5\)"):
        N.add_noise(jax.random.PRNGKey(0), N.default_noise_model(), jnp.ones((3, 4)))


def test_default_band_selection_and_galex():
    m = N.default_noise_model(("galex_nuv", "sdss_r", "galex_fuv"))
    assert m.bands == ("galex_nuv", "sdss_r", "galex_fuv")
    r = N.default_noise_model(("sdss_r",))
    np.testing.assert_allclose(m.median[1, : int(m.n_bins[1])], r.median[0, : int(r.n_bins[0])])
    g = N.default_noise_model(("galex_nuv",))
    assert 500 <= g.metadata["bands"]["galex_nuv"]["n_used"] <= 800
    mu, _ = N.sigma_mag_params(g, jnp.asarray([[10.0]]))
    assert 0.03 < float(mu[0, 0]) < 0.5  # GALEX AIS-like depth at 20 mag


def _toy_table(rng, n=3000):
    f = 10 ** rng.uniform(0.5, 3.0, size=(n, 2))
    smag = 0.3 * (f / 3.0) ** -0.5 * rng.lognormal(0, 0.1, size=f.shape)
    ivar = (LN / (smag * f)) ** 2
    return Table({"flux_g": f[:, 0], "flux_r": f[:, 1], "flux_ivar_g": ivar[:, 0], "flux_ivar_r": ivar[:, 1],
                  "FLUX": f, "FLUX_IVAR": ivar, "Z": rng.uniform(0, 0.3, n)})


def test_bad_rows_skipped_with_count_and_column_styles(tmp_path):
    rng = np.random.default_rng(0)
    t = _toy_table(rng)
    t["flux_g"][:5] = np.nan
    t["flux_ivar_g"][5:12] = -1.0
    t["flux_g"][12:15] = -3.0
    t["flux_ivar_r"][20:22] = 0.0
    with pytest.warns(UserWarning) as rec:
        m = NF.fit_noise_model(t, ["flux_g", "flux_r"], ["flux_ivar_g", "flux_ivar_r"], ("g", "r"))
    msgs = sorted(str(w.message) for w in rec)
    assert len(msgs) == 2 and "band g: skipped 15 of 3000" in msgs[0] and "band r: skipped 2" in msgs[1]
    assert m.metadata["bands"]["g"]["n_skipped_invalid"] == 15
    assert m.metadata["bands"]["r"]["n_skipped_invalid"] == 2
    assert m.metadata["bands"]["g"]["n_used"] == 3000 - 15
    # vector columns, file paths (FITS / ECSV / CSV) and the z cut give consistent fits
    t2 = _toy_table(np.random.default_rng(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no bad rows -> no warning
        a = NF.fit_noise_model(t2, "FLUX", "FLUX_IVAR", ("g", "r"), zcol="Z", zrange=(0.05, 0.2))
        b = NF.fit_noise_model(t2, ["flux_g", "flux_r"], ["flux_ivar_g", "flux_ivar_r"], ("g", "r"),
                              zcol="Z", zrange=(0.05, 0.2))
    np.testing.assert_allclose(a.median, b.median)
    assert a.metadata["n_after_zcut"] == int(((t2["Z"] > 0.05) & (t2["Z"] < 0.2)).sum())
    t2.write(tmp_path / "t.fits")
    scalar = t2["flux_g", "flux_r", "flux_ivar_g", "flux_ivar_r"]
    scalar.write(tmp_path / "t.ecsv")
    scalar.write(tmp_path / "t.csv", format="ascii.csv")
    c = NF.fit_noise_model(tmp_path / "t.fits", "FLUX", "FLUX_IVAR", ("g", "r"), zcol="Z", zrange=(0.05, 0.2))
    np.testing.assert_allclose(c.median, a.median, rtol=1e-6)
    for fn in ("t.ecsv", "t.csv"):
        d = NF.fit_noise_model(str(tmp_path / fn), ["flux_g", "flux_r"], ["flux_ivar_g", "flux_ivar_r"], ("g", "r"))
        e = NF.fit_noise_model(scalar, ["flux_g", "flux_r"], ["flux_ivar_g", "flux_ivar_r"], ("g", "r"))
        np.testing.assert_allclose(d.median, e.median, rtol=1e-6)
    # the synthetic truth sigma_mag = 0.3 (f/3)^-1/2 is recovered
    mu, _ = N.sigma_mag_params(e, jnp.asarray([[30.0, 300.0]]))
    np.testing.assert_allclose(np.asarray(mu)[0], 0.3 * np.array([10.0, 100.0]) ** -0.5, rtol=0.05)
    with pytest.raises(ValueError):
        NF.fit_noise_model(t2, "FLUX", "FLUX_IVAR", ("g", "r", "i"))
    with pytest.raises(KeyError):
        NF.fit_noise_model(t2, "NOPE", "FLUX_IVAR", ("g", "r"))


def test_extinction_correction():
    t = _toy_table(np.random.default_rng(2))
    t["A"] = np.tile([0.5, 0.25], (len(t), 1))
    a = NF.fit_noise_model(t, "FLUX", "FLUX_IVAR", ("g", "r"))
    b = NF.fit_noise_model(t, "FLUX", "FLUX_IVAR", ("g", "r"), extinction_col="A")
    np.testing.assert_allclose(b.flux_range, a.flux_range * np.array([[10 ** 0.2], [10 ** 0.1]]), rtol=1e-5)
    np.testing.assert_allclose(b.log10_flux[:, :3] - a.log10_flux[:, :3], [[0.2] * 3, [0.1] * 3], atol=1e-5)
    np.testing.assert_allclose(b.median, a.median, rtol=1e-6)  # sigma_mag is extinction-invariant


def test_save_load_round_trip(tmp_path):
    m = N.default_noise_model(("sdss_g", "galex_fuv"))  # different bin counts -> padding
    assert int(m.n_bins[0]) != int(m.n_bins[1])
    for name in ("nm.json", "nm.npz"):
        m.save(tmp_path / name)
        m2 = N.NoiseModel.load(tmp_path / name)
        assert m2.bands == m.bands
        for f in ("log10_flux", "median", "spread", "n_per_bin", "n_bins", "flux_range"):
            np.testing.assert_array_equal(np.asarray(getattr(m2, f)), np.asarray(getattr(m, f)))
        assert m2.metadata == json.loads(json.dumps(m.metadata))
    with open(tmp_path / "bad.json", "w") as fh:
        json.dump({"format": "something"}, fh)
    with pytest.raises(ValueError):
        N.NoiseModel.load(tmp_path / "bad.json")


def test_jit_vmap_pytree():
    noise = N.default_noise_model()
    flux = jnp.full((8, 5), 300.0)
    f = jax.jit(lambda k, nm, x: N.add_noise(k, nm, x).flux)
    a = f(jax.random.PRNGKey(0), noise, flux)
    b = N.add_noise(jax.random.PRNGKey(0), noise, flux).flux
    np.testing.assert_allclose(a, b, rtol=1e-6)
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    out = jax.vmap(lambda k: N.add_noise(k, noise, flux))(keys)
    assert out.flux.shape == (3, 8, 5) and out.keep.shape == (3, 8)
    leaves, tree = jax.tree_util.tree_flatten(noise)
    assert jax.tree_util.tree_unflatten(tree, leaves).bands == noise.bands


def test_plot(tmp_path, catalog):
    import matplotlib
    matplotlib.use("Agg")
    noise = N.default_noise_model()
    fig = NF.plot_noise_model(noise, catalog, tmp_path / "noise.png", flux_cols="MODELFLUX",
                             ivar_cols="MODELFLUX_IVAR", extinction_col="EXTINCTION", zcol="Z",
                             zrange=(0.01, 0.2))
    assert (tmp_path / "noise.png").stat().st_size > 10_000
    import matplotlib.pyplot as plt
    plt.close(fig)
