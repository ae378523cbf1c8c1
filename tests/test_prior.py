"""Tests of sedflow_jax.prior: moments, KS marginals, transforms, densities, support."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sedflow_jax.sim import prior as P

N = 200_000
#: the other sample sizes: P.sample compiles once per (prior, n), so the tests share these
N_MID = 5000
N_SMALL = 20


@pytest.fixture(scope="module")
def canon():
    return P.provabgs_prior()


@pytest.fixture(scope="module")
def canon_samples(canon):
    return np.asarray(P.sample(jax.random.PRNGKey(0), canon, N))


@pytest.fixture(scope="module")
def dirichlet_samples():
    return np.asarray(P.sample(jax.random.PRNGKey(1), P.provabgs_prior(beta="dirichlet"), N))


@pytest.fixture(scope="module")
def nmf_samples():
    return np.asarray(P.sample(jax.random.PRNGKey(2), P.default_nmf_prior(), N))


def _se(x):
    return x.std() / math.sqrt(len(x))


def test_names_and_shapes(canon, canon_samples):
    assert P.PARAM_NAMES == ("logmstar", "beta1", "beta2", "beta3", "beta4", "fburst", "tburst",
                             "gamma1", "gamma2", "tau_bc", "tau_ism", "n_dust")
    assert len(P.SAMPLING_NAMES) == 11
    assert canon_samples.shape == (N, 12)
    assert canon_samples.dtype == np.float32
    s = P.sample(jax.random.PRNGKey(0), canon, N_SMALL, sampling_space=True)
    assert s.shape == (N_SMALL, 11) and s.dtype == jnp.float32
    z = P.sample_redshift(jax.random.PRNGKey(3), canon, 5)
    assert z.shape == (5,) and z.dtype == jnp.float32


def test_sampling_bounds_match_sedflow_box(canon):
    low, high = P.sampling_bounds(canon)
    np.testing.assert_allclose(
        low, [7, 0, 0, 0, 0, 0.01, math.log10(4.5e-5), math.log10(4.5e-5), 0, 0, -2], rtol=1e-6)
    np.testing.assert_allclose(
        high, [12.5, 1, 1, 1, 1, 13.27, math.log10(1.5e-2), math.log10(1.5e-2), 3, 3, 1], rtol=1e-6)
    low, high = P.sampling_bounds(P.default_nmf_prior())
    assert float(high[6]) == pytest.approx(math.log10(4.5e-2), rel=1e-6)
    assert float(low[5]) == pytest.approx(0.01, rel=1e-6)


def test_canonical_moments(canon_samples):
    th = canon_samples.astype(np.float64)
    expect = {
        0: 9.75, 1: 0.5, 2: 0.25, 3: 0.125, 4: 0.125, 5: 0.5, 6: (0.01 + 13.27) / 2,
        9: 1.5, 10: 1.5, 11: -0.5,
    }
    for i, m in expect.items():
        assert abs(th[:, i].mean() - m) < 5 * _se(th[:, i]), (P.PARAM_NAMES[i], th[:, i].mean(), m)
    lg = np.log10(th[:, 7:9])
    m = 0.5 * (math.log10(4.5e-5) + math.log10(1.5e-2))
    assert np.all(np.abs(lg.mean(0) - m) < 5 * lg.std(0) / math.sqrt(N))
    # second moment of a uniform: var(logM) = 5.5^2 / 12
    assert th[:, 0].var() == pytest.approx(5.5 ** 2 / 12, rel=0.01)
    np.testing.assert_allclose(th[:, 1:5].sum(1), 1.0, atol=1e-6)
    assert th[:, 1:5].min() >= 0


def test_dirichlet_moments(dirichlet_samples):
    b = dirichlet_samples[:, 1:5].astype(np.float64)
    for i in range(4):
        assert abs(b[:, i].mean() - 0.25) < 5 * _se(b[:, i])
        # flat Dirichlet(1,1,1,1): Var(beta_i) = (1/4)(3/4)/5
        assert b[:, i].var() == pytest.approx(3 / 80, rel=0.02)
    np.testing.assert_allclose(b.sum(1), 1.0, atol=1e-6)


def test_default_nmf_moments(nmf_samples):
    t = nmf_samples[:, 6].astype(np.float64)
    lo, hi = 0.01, 13.27
    assert abs(t.mean() - (hi - lo) / math.log(hi / lo)) < 5 * _se(t)
    lg = np.log10(nmf_samples[:, 7].astype(np.float64))
    assert abs(lg.mean() - 0.5 * (math.log10(4.5e-5) + math.log10(4.5e-2))) < 5 * _se(lg)


def test_ks_marginals(canon_samples, dirichlet_samples, nmf_samples):
    sub = slice(0, 20_000)
    c = canon_samples[sub].astype(np.float64)
    d = dirichlet_samples[sub].astype(np.float64)
    n_ = nmf_samples[sub].astype(np.float64)
    lgl, lgh = math.log10(4.5e-5), math.log10(1.5e-2)
    cases = [
        (c[:, 0], stats.uniform(7, 5.5).cdf),
        (c[:, 1], stats.uniform(0, 1).cdf),  # beta1 = 1 - u1
        (c[:, 6], stats.uniform(0.01, 13.26).cdf),
        (np.log10(c[:, 7]), stats.uniform(lgl, lgh - lgl).cdf),
        (c[:, 11], stats.uniform(-2, 3).cdf),
        (d[:, 1], stats.beta(1, 3).cdf),  # flat Dirichlet marginal
        (d[:, 4], stats.beta(1, 3).cdf),
        (np.log(n_[:, 6]), stats.uniform(math.log(0.01), math.log(1327.0)).cdf),
    ]
    for x, cdf in cases:
        assert stats.kstest(x, cdf).pvalue > 1e-3
    # the canonical (uniform stick-breaking) beta4 is NOT Beta(1,3): the test can tell them apart
    assert stats.kstest(c[:, 4], stats.beta(1, 3).cdf).pvalue < 1e-6


def test_redshift(canon):
    z = np.asarray(P.sample_redshift(jax.random.PRNGKey(5), P.provabgs_prior(zmin=0.01, zmax=0.3), 50_000))
    assert z.min() >= 0.01 and z.max() <= 0.3
    assert stats.kstest(z, stats.uniform(0.01, 0.29).cdf).pvalue > 1e-3
    assert float(P.log_prob_redshift(canon, 0.1)) == pytest.approx(-math.log(0.2), rel=1e-6)
    assert float(P.log_prob_redshift(canon, 0.25)) == -np.inf


@pytest.mark.parametrize("make", [P.provabgs_prior, P.default_nmf_prior,
                                  lambda: P.provabgs_prior(beta="dirichlet")])
def test_round_trips(make):
    pr = make()
    s = P.sample(jax.random.PRNGKey(7), pr, N_MID, sampling_space=True)
    th = P.from_sampling(s)
    np.testing.assert_allclose(P.to_sampling(th), s, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(P.from_sampling(P.to_sampling(th)), th, atol=2e-5, rtol=1e-4)
    cube = jax.random.uniform(jax.random.PRNGKey(8), (N_MID, 11))
    s2 = P.unit_cube_to_sampling(pr, cube)
    np.testing.assert_allclose(P.sampling_to_unit_cube(pr, s2), cube, atol=2e-5)
    assert bool(jnp.all(P.in_support(pr, s2)))
    # batch shapes: leading axes are preserved
    assert P.from_sampling(s[:6].reshape(2, 3, 11)).shape == (2, 3, 12)


def test_dirichlet_inverse_cdf_values():
    pr = P.provabgs_prior(beta="dirichlet")
    cube = jnp.full((11,), 0.125)
    s = P.unit_cube_to_sampling(pr, cube)
    np.testing.assert_allclose(s[1:4], [0.5, math.sqrt(0.125), 0.125], rtol=1e-6)


def test_support_and_infinities(canon):
    th = P.sample(jax.random.PRNGKey(9), canon, N_MID)
    for gd in ("loguniform", "flat"):
        assert bool(jnp.all(jnp.isfinite(P.log_prob(canon, th, gd))))
        s = P.to_sampling(th)
        assert bool(jnp.all(jnp.isfinite(P.log_prob_sampling(canon, s, gd))))
    t0 = np.asarray(th[0])
    bad = []
    for idx, val in [(0, 6.9), (0, 12.6), (5, 1.1), (6, 0.005), (6, 13.3), (7, 2e-2), (8, 1e-5),
                     (9, -0.1), (10, 3.1), (11, -2.1), (11, 1.1)]:
        x = t0.copy(); x[idx] = val; bad.append(x)
    x = t0.copy(); x[1:5] = [0.5, 0.3, 0.2, 0.1]; bad.append(x)          # sum 1.1
    x = t0.copy(); x[1:5] = [0.6, 0.5, 0.0, -0.1]; bad.append(x)         # negative, sums to 1
    x = t0.copy(); x[1:5] = np.nan; bad.append(x)
    lp = P.log_prob(canon, jnp.asarray(np.stack(bad)))
    assert np.all(np.asarray(lp) == -np.inf), lp
    assert not bool(jnp.any(P.in_support_theta(canon, jnp.asarray(np.stack(bad)))))
    s0 = np.asarray(P.to_sampling(th[0]))
    sbad = []
    lo, hi = (np.asarray(b) for b in P.sampling_bounds(canon))
    for i in range(11):
        for v in (lo[i] - 0.01, hi[i] + 0.01):
            x = s0.copy(); x[i] = v; sbad.append(x)
    sbad = jnp.asarray(np.stack(sbad))
    assert not bool(jnp.any(P.in_support(canon, sbad)))
    for gd in ("loguniform", "flat"):
        assert np.all(np.asarray(P.log_prob_sampling(canon, sbad, gd)) == -np.inf)


def test_log_prob_values(canon):
    # interior point of the canonical prior with hand-computed density
    th = jnp.asarray([10.0, 0.4, 0.3, 0.2, 0.1, 0.5, 2.0, 1e-3, 2e-3, 1.0, 0.5, 0.0])
    lgr = math.log(1.5e-2 / 4.5e-5)
    want = (-math.log(5.5) - math.log(0.6) - math.log(0.3) - math.log(1.0) - math.log(13.26)
            - math.log(1e-3) - math.log(2e-3) - 2 * math.log(lgr) - 2 * math.log(3) - math.log(3))
    assert float(P.log_prob(canon, th)) == pytest.approx(want, abs=2e-4)
    # true Dirichlet: beta part is log(3!) = log 6 everywhere on the simplex
    pd = P.provabgs_prior(beta="dirichlet")
    want_d = want + math.log(0.6) + math.log(0.3) + math.log(6.0)
    assert float(P.log_prob(pd, th)) == pytest.approx(want_d, abs=2e-4)


@pytest.mark.parametrize("make", [P.provabgs_prior, P.default_nmf_prior,
                                  lambda: P.provabgs_prior(beta="dirichlet")])
def test_log_prob_change_of_variables(make):
    """log p(theta) = log p_s(to_sampling(theta)) + log|det d s/d theta_free| (jax.jacobian)."""
    pr = make()
    th = P.sample(jax.random.PRNGKey(11), pr, N_MID)[:N_SMALL]  # (the sample shape compiled once)

    def s_of_free(free):  # free: 11 = theta without beta4
        full = jnp.concatenate([free[:4], 1.0 - free[1:4].sum(keepdims=True), free[4:]])
        return P.to_sampling(full)

    free = jnp.concatenate([th[:, :4], th[:, 5:]], axis=1)
    jac = jax.vmap(jax.jacobian(s_of_free))(free)
    logdet = jnp.linalg.slogdet(jac)[1]
    for gd in ("loguniform", "flat"):
        lhs = P.log_prob(pr, th, gd)
        rhs = P.log_prob_sampling(pr, P.to_sampling(th), gd) + logdet
        np.testing.assert_allclose(lhs, rhs, atol=2e-3, rtol=1e-4)
    np.testing.assert_allclose(P.log_abs_det_jacobian_to_sampling(th), logdet, atol=2e-3, rtol=1e-4)


def test_flat_vs_loguniform_jacobian():
    for pr in (P.provabgs_prior(), P.default_nmf_prior()):
        s = P.sample(jax.random.PRNGKey(12), pr, N, sampling_space=True)
        lo, hi = pr.gamma
        g = 10.0 ** np.asarray(s[:, 6:8], dtype=np.float64)
        # gamma only (tburst density pinned): flat - loguniform = sum_k log(g_k ln10 (log10 hi - log10 lo) / (hi - lo))
        d = (P.log_prob_sampling(pr, s, "flat", tburst_density="flat")
             - P.log_prob_sampling(pr, s, "loguniform", tburst_density="flat"))
        want = np.log(g * math.log(10) * (math.log10(hi) - math.log10(lo)) / (hi - lo)).sum(1)
        np.testing.assert_allclose(d, want, atol=2e-4, rtol=1e-5)
        # importance weights of the flat density under the sampled one average to 1 (normalised)
        w = np.exp(np.asarray(P.log_prob_sampling(pr, s, "flat"), np.float64)
                   - np.asarray(P.log_prob_sampling(pr, s, "loguniform"), np.float64))
        assert w.mean() == pytest.approx(1.0, abs=6 * w.std() / math.sqrt(len(w)))
    # default_nmf: 'flat' also flattens tburst (PROVABGS MCMC) by default
    pr = P.default_nmf_prior()
    s = P.sample(jax.random.PRNGKey(13), pr, N_MID, sampling_space=True)[:10]
    d = (P.log_prob_sampling(pr, s, "flat") - P.log_prob_sampling(pr, s, "flat", tburst_density="loguniform"))
    t = np.asarray(s[:, 5], np.float64)
    np.testing.assert_allclose(d, np.log(t * math.log(13.27 / 0.01) / 13.26), atol=2e-4)


def test_jit_vmap_and_static_prior(canon):
    th = P.sample(jax.random.PRNGKey(14), canon, N_SMALL)
    f = jax.jit(P.log_prob, static_argnums=(2,))
    np.testing.assert_allclose(f(canon, th, "flat"), P.log_prob(canon, th, "flat"), rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.vmap(lambda t: P.log_prob(canon, t)))
    np.testing.assert_allclose(g(th), P.log_prob(canon, th), rtol=1e-5, atol=1e-5)
    js = jax.jit(P.sample, static_argnums=(2,))
    np.testing.assert_allclose(js(jax.random.PRNGKey(0), canon, N_SMALL),
                               P.sample(jax.random.PRNGKey(0), canon, N_SMALL), rtol=1e-5)
    # gradients of the log density are finite inside the support
    grad = jax.grad(lambda t: P.log_prob(canon, t))(th[0])
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert hash(canon) == hash(P.provabgs_prior())


def test_invalid_config():
    with pytest.raises(ValueError):
        P.Prior(beta="stick")
    with pytest.raises(ValueError):
        P.Prior(logmstar=(12.0, 7.0))
    with pytest.raises(ValueError):
        P.log_prob_sampling(P.provabgs_prior(), jnp.zeros(11), "logflat")
    with pytest.raises(ValueError):
        P.from_sampling(jnp.zeros(12))
