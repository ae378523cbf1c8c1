"""Tests of the optional calibration floor of the noise model (sedflow_jax.sim.noise).

Floors off must reproduce today's numbers exactly; floors on must only ever raise sigma_mag, reach
the floor range real catalogs have (NSA: sigma_mag >= 0.02 in i), draw the flux noise with the
inflated sigma, and survive to_dict / JSON / npz and a training set's manifest.
"""
import hashlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sedflow_jax.sed.units import MAG_PER_LN
from sedflow_jax.sim import noise as N
from sedflow_jax.sim import simulate as S

N_ROWS = 100_000
I_BAND = 3
#: sha256 of add_noise's outputs (below) before the floor existed, on CPU
GOLDEN_ADD_NOISE = "be9b66d2c6280063d8ae9dca3b4336c5e80af6df39257ab549ef35b8bbc63746"
#: sha256 of the shipped SDSS table's to_dict() (json, sorted keys) before the floor existed
GOLDEN_TO_DICT = "cefcd7cde6ce30a0dacf1e567cd732c11599148dd628f5ec36a54a618b49b0ce"


def _sha(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a)).view(np.uint8))
    return h.hexdigest()


@pytest.fixture(scope="module")
def flux():
    """(N_ROWS, 5) noiseless fluxes, log-uniform over 10..3000 nanomaggies (mag 22.5..13.8)."""
    lf = jax.random.uniform(jax.random.PRNGKey(5), (N_ROWS, 5), minval=1.0, maxval=3.5)
    return 10 ** lf


@pytest.fixture(scope="module")
def draws(flux):
    """The same key through the floor-free and the recommended-floor model."""
    off, on = N.default_noise_model(), N.default_noise_model(calibration_floor=True)
    key = jax.random.PRNGKey(9)
    return off, on, N.add_noise(key, off, flux), N.add_noise(key, on, flux)


# ---------------------------------------------------------------------------------------------
# floors off == today
# ---------------------------------------------------------------------------------------------
def test_floor_off_is_todays_model_bit_for_bit():
    noise = N.default_noise_model()
    assert not noise.has_floor and noise.floor_mag_max is None
    d = noise.to_dict()
    assert "calibration_floor" not in d and d["version"] == 1
    assert hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest() == GOLDEN_TO_DICT
    assert len(jax.tree_util.tree_leaves(noise)) == 6  # no extra leaf without a floor
    f = 10 ** jax.random.uniform(jax.random.PRNGKey(3), (1000, 5), minval=-0.5, maxval=4.0)
    out = N.add_noise(jax.random.PRNGKey(4), noise, f)
    # today's algorithm written out (jitted, as add_noise is: same fusion, same bits): split,
    # sigma_mag ~ N(mu(f), s(f)), sigma_f = sigma_mag f ln10 / 2.5, flux noise ~ N(0, sigma_f)
    @jax.jit
    def today(key, f):
        k_sig, k_eps = jax.random.split(key)
        mu, s = N.sigma_mag_params(noise, f)
        smag = mu + s * jax.random.normal(k_sig, mu.shape)
        sig = smag * f / MAG_PER_LN
        return smag, sig, f + sig * jax.random.normal(k_eps, f.shape)

    for a, b in zip((out.sigma_mag, out.sigma, out.flux), today(jax.random.PRNGKey(4), f)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if jax.default_backend() == "cpu":
        assert _sha(*out) == GOLDEN_ADD_NOISE


def test_zero_floor_rows_equal_floor_free_rows(draws):
    off, on, a, b = draws
    same = np.all(np.asarray(a.sigma_mag) == np.asarray(b.sigma_mag), axis=1)
    # the floor-free rows of the floor model (probability p_zero) are the floor-free draws
    p0 = on.floor_p_zero
    assert abs(same.mean() - p0) < 5 * math.sqrt(p0 * (1 - p0) / same.size)
    np.testing.assert_array_equal(np.asarray(a.flux)[same], np.asarray(b.flux)[same])


# ---------------------------------------------------------------------------------------------
# floors on
# ---------------------------------------------------------------------------------------------
def test_floor_only_raises_sigma_and_reaches_floor_range(draws):
    off, on, a, b = draws
    sa, sb = np.asarray(a.sigma_mag, np.float64), np.asarray(b.sigma_mag, np.float64)
    pos = sa > 0
    assert np.all(sb[pos] >= sa[pos]) and np.all(sb[~pos] == sa[~pos])
    # the implied floor c = sqrt(sb^2 - sa^2) lies in [0, max_b] and is uniform on floor rows
    fmax = np.asarray(on.floor_mag_max, np.float64)
    c = np.sqrt(np.maximum(sb ** 2 - sa ** 2, 0.0))
    assert np.all(c[pos] <= fmax[np.nonzero(pos)[1]] * (1 + 1e-3) + 1e-6)
    rows = np.all(c > 1e-4, axis=1) & np.all(pos, axis=1)  # floor-on rows
    for j in range(5):
        u = c[rows & (sa[:, j] < 0.05), j] / fmax[j]  # (small sa: no float32 cancellation)
        assert u.size > 10_000, j
        assert stats.kstest(u, "uniform").pvalue > 1e-4, j
    # NSA-like sigma_mag >= 0.02 in i: essentially absent from the fit, common with the floor
    frac_off = float(np.mean(sa[:, I_BAND] >= 0.02))
    frac_on = float(np.mean(sb[:, I_BAND] >= 0.02))
    assert frac_off < 0.005 and 0.25 < frac_on < 0.40, (frac_off, frac_on)


def test_noise_drawn_with_the_inflated_sigma(flux, draws):
    off, on, a, b = draws
    f = np.asarray(flux, np.float64)
    ok = np.asarray(b.keep)
    r = (np.asarray(b.flux, np.float64) - f)[ok] / np.asarray(b.sigma, np.float64)[ok]
    r_fit = (np.asarray(b.flux, np.float64) - f)[ok] / np.asarray(a.sigma, np.float64)[ok]
    n = r.shape[0]
    for j in range(5):
        # unit variance: sd of the sample variance is sqrt(2/n) ~ 0.0045; 5 sigma
        assert abs(r[:, j].var() - 1) < 5 * math.sqrt(2 / n), j
        assert abs(r[:, j].mean()) < 5 / math.sqrt(n), j
        assert stats.kstest(r[:, j], "norm").pvalue > 1e-4, j
        # the same residuals in units of the *fitted* sigma are far from unit variance: a noise
        # drawn with the un-inflated sigma would fail the check above
        assert r_fit[:, j].var() > 1.5, j
    np.testing.assert_allclose(np.asarray(b.sigma), np.asarray(b.sigma_mag) * np.asarray(flux)
                               / MAG_PER_LN, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# construction, persistence, manifests
# ---------------------------------------------------------------------------------------------
def test_constructor_values_and_validation():
    on = N.default_noise_model(calibration_floor=True)
    np.testing.assert_allclose(np.asarray(on.floor_mag_max), [0.08, 0.05, 0.05, 0.05, 0.05])
    assert on.floor_p_zero == N.RECOMMENDED_FLOOR_P_ZERO == 0.5
    base = N.default_noise_model()
    m = N.with_calibration_floor(base, 0.03, p_zero=0.0)
    np.testing.assert_allclose(np.asarray(m.floor_mag_max), [0.03] * 5)
    m = N.with_calibration_floor(base, [0.1, 0.02, 0.02, 0.02, 0.03])
    assert float(m.floor_mag_max[0]) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        N.with_calibration_floor(base, -0.01)
    with pytest.raises(ValueError):
        N.with_calibration_floor(base, 0.05, p_zero=1.0)
    with pytest.raises(KeyError, match="sdss_z"):
        N.with_calibration_floor(base, {"sdss_u": 0.1})
    assert "calibration floor" in on.summary()


def test_round_trip_dict_json_npz(tmp_path, flux):
    m = N.with_calibration_floor(N.default_noise_model(), {"sdss_u": 0.07, "sdss_g": 0.03,
                                 "sdss_r": 0.02, "sdss_i": 0.025, "sdss_z": 0.04}, p_zero=0.3)
    d = m.to_dict()
    assert d["version"] == 2 and d["calibration_floor"]["p_zero"] == 0.3
    assert d["calibration_floor"]["floor_mag_max"]["sdss_i"] == pytest.approx(0.025)
    copies = [N.NoiseModel.from_dict(json.loads(json.dumps(d)))]
    for name in ("nm.json", "nm.npz"):
        m.save(tmp_path / name)
        copies.append(N.NoiseModel.load(tmp_path / name))
    ref = N.add_noise(jax.random.PRNGKey(1), m, flux[:2000])
    for m2 in copies:
        assert m2.floor_p_zero == 0.3 and m2.bands == m.bands
        np.testing.assert_array_equal(np.asarray(m2.floor_mag_max), np.asarray(m.floor_mag_max))
        assert m2.to_dict() == json.loads(json.dumps(d))
        out = N.add_noise(jax.random.PRNGKey(1), m2, flux[:2000])
        np.testing.assert_array_equal(np.asarray(out.flux), np.asarray(ref.flux))
    # an older reader must refuse (not ignore) a floor: the version says so
    with pytest.raises(ValueError, match="newer"):
        N.NoiseModel.from_dict({**d, "version": 3})


def test_select_concatenate_pytree():
    m = N.default_noise_model(("sdss_g", "sdss_u", "galex_nuv"), calibration_floor=True)
    np.testing.assert_allclose(np.asarray(m.floor_mag_max), [0.05, 0.08, 0.05])
    s = m.select(("sdss_u", "sdss_g"))
    np.testing.assert_allclose(np.asarray(s.floor_mag_max), [0.08, 0.05])
    assert s.floor_p_zero == m.floor_p_zero
    leaves, tree = jax.tree_util.tree_flatten(m)
    back = jax.tree_util.tree_unflatten(tree, leaves)
    assert back.has_floor and back.floor_p_zero == m.floor_p_zero
    with pytest.raises(ValueError, match="same calibration floor"):
        N.NoiseModel.concatenate([N.default_noise_model(("sdss_g",)),
                                  N.default_noise_model(("galex_nuv",), calibration_floor=True)])
    out = jax.vmap(lambda k: N.add_noise(k, m, jnp.full((4, 3), 300.0)))(
        jax.random.split(jax.random.PRNGKey(0), 2))
    assert out.sigma_mag.shape == (2, 4, 3)


@pytest.fixture(scope="module")
def model():
    from sedflow_jax.sed.model import load_model

    return load_model(z_max=0.2)


def test_simulate_records_floor_in_manifest(model, tmp_path):
    on = N.default_noise_model(calibration_floor=True)
    # the default block size: the same compiled kernels as the other SDSS simulations of a test
    # session (with and without the floor), read back from the compilation cache
    r = S.simulate(3, 512, model, noise=on, block=S.DEFAULT_BLOCK, out=tmp_path / "on",
                   progress=False)
    cfg = r.manifest["config"]["noise_model"]
    assert cfg["calibration_floor"] == on.floor_dict()
    assert N.NoiseModel.from_dict(cfg).floor_p_zero == on.floor_p_zero
    r0 = S.simulate(3, 512, model, block=S.DEFAULT_BLOCK, progress=False, out=tmp_path / "off")
    assert "calibration_floor" not in r0.manifest["config"]["noise_model"]
    assert r.manifest["config_sha256"] != r0.manifest["config_sha256"]
