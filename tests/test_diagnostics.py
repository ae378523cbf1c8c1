"""Calibration diagnostics on a Gaussian-Gaussian conjugate problem with an exact posterior.

mu ~ N(0, 1), x | mu ~ N(mu, 1)  =>  mu | x ~ N(x / 2, 1 / 2).
An exact sampler draws from that posterior; an over-confident one shrinks its width by 2.
"""
import numpy as np
import pytest

from sedflow_jax.eval import diagnostics as D

N_SIM, M_DRAWS, DIM = 400, 100, 3


def _conjugate(seed, width=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(N_SIM, DIM))
    x = mu + rng.normal(size=(N_SIM, DIM))
    post = x[:, None, :] / 2 + shift + width * np.sqrt(0.5) * rng.normal(size=(N_SIM, M_DRAWS, DIM))
    return mu, post


def test_sbc_ranks_counts_draws_below():
    true = np.array([[0.5, 10.0]])
    samples = np.array([[[0.0, 0.0], [1.0, 1.0], [0.2, 20.0]]])
    np.testing.assert_array_equal(D.sbc_ranks(true, samples), [[2, 2]])
    # ties are spread uniformly over the tied positions
    r = D.sbc_ranks(np.zeros((2000, 1)), np.zeros((2000, 3, 1)), seed=1)
    assert set(np.unique(r)) == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        D.sbc_ranks(np.zeros((3, 2)), np.zeros((4, 5, 2)))


def test_sbc_calibrated_vs_overconfident():
    mu, exact = _conjugate(0)
    u = D.sbc_uniformity(D.sbc_ranks(mu, exact), M_DRAWS)
    assert np.all(u["chi2_pvalue"] > 1e-3), u
    assert np.all(u["ks_pvalue"] > 1e-3), u
    mu, over = _conjugate(0, width=0.5)
    u = D.sbc_uniformity(D.sbc_ranks(mu, over), M_DRAWS)
    assert np.all(u["chi2_pvalue"] < 1e-8), u
    assert np.all(u["ks_pvalue"] < 1e-5), u
    # a biased posterior fails too
    mu, biased = _conjugate(0, shift=0.5)
    assert np.all(D.sbc_uniformity(D.sbc_ranks(mu, biased), M_DRAWS)["ks_pvalue"] < 1e-5)


def test_sbc_uniformity_exact_expectations():
    # ranks that are exactly uniform over {0..m} give chi2 = 0
    m = 9
    ranks = np.tile(np.arange(m + 1), 10)[:, None]
    u = D.sbc_uniformity(ranks, m, n_bins=5)
    assert u["chi2"][0] == pytest.approx(0.0)
    assert u["chi2_pvalue"][0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        D.sbc_uniformity(np.array([[11]]), 10)


def test_coverage_nominal_and_undercovering():
    levels = np.array([0.5, 0.68, 0.9, 0.95])
    mu, exact = _conjugate(1)
    lv, cov = D.coverage(mu, exact, levels)
    assert cov.shape == (4, DIM)
    # binomial sd at n=400 is <= 0.025: allow ~3 sigma
    np.testing.assert_allclose(cov, np.repeat(levels[:, None], DIM, 1), atol=0.075)
    mu, over = _conjugate(1, width=0.5)
    _, cov_o = D.coverage(mu, over, levels)
    assert np.all(cov_o < levels[:, None] - 0.15)
    # under-dispersed -> over-covers
    mu, wide = _conjugate(1, width=2.0)
    _, cov_w = D.coverage(mu, wide, levels)
    assert np.all(cov_w > levels[:, None] + 0.04)


def test_tarp_joint_coverage():
    mu, exact = _conjugate(2)
    t = D.tarp(mu, exact)
    assert t["max_deviation"] < 0.1 and t["ks_pvalue"] > 1e-3
    mu, over = _conjugate(2, width=0.5)
    t = D.tarp(mu, over)
    assert t["max_deviation"] > 0.15 and t["ks_pvalue"] < 1e-4


@pytest.mark.parametrize("classifier", ["quadratic", "mlp"])
def test_c2st(classifier):
    rng = np.random.default_rng(3)
    n, d = 2000, 4
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(n, d))
    shifted = rng.normal(size=(n, d))
    shifted[:, 0] += 1.0  # optimal accuracy Phi(1/2) = 0.69
    same = D.c2st(a, b, 0, classifier=classifier)
    diff = D.c2st(a, shifted, 0, classifier=classifier)
    assert abs(same - 0.5) < 0.05, same
    assert diff > 0.6, diff
    acc, folds = D.c2st(a, shifted, 1, classifier=classifier, n_folds=4, return_folds=True)
    assert folds.shape == (4,) and acc == pytest.approx(folds.mean())


def test_c2st_rejects_bad_input():
    with pytest.raises(ValueError):
        D.c2st(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError):
        D.c2st(np.zeros((10, 2)), np.zeros((10, 2)), classifier="svm")


def test_plots_write_files(tmp_path):
    mu, exact = _conjugate(4)
    ranks = D.sbc_ranks(mu, exact)
    names = ["a", "b", "c"]
    D.plot_sbc(ranks, names, tmp_path / "sbc.png", m=M_DRAWS)
    lv, cov = D.coverage(mu, exact)
    D.plot_coverage(lv, cov, names, tmp_path / "cov.png", n=N_SIM)
    D.plot_coverage(lv, {"exact": cov, "overconfident": D.coverage(*_conjugate(4, 0.5))[1]},
                    path=tmp_path / "cov2.png", n=N_SIM)
    rng = np.random.default_rng(0)
    D.plot_corner({"A": rng.normal(size=(3000, 3)), "B": rng.normal(0.5, 1, size=(2000, 3))},
                  names, truths=[0, 0, 0], path=tmp_path / "corner.png")
    for f in ("sbc.png", "cov.png", "cov2.png", "corner.png"):
        assert (tmp_path / f).stat().st_size > 5000
    import matplotlib.pyplot as plt

    plt.close("all")
