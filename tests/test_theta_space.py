"""Posteriors in logit coordinates (train_posterior(..., theta_space='logit')).

The flow models y = logit((s - low) / (high - low)); draws map back inside the prior box
(acceptance 1, nothing rejected) and log_prob includes the change of variables. Checked against
independent references: a finite-difference Jacobian, and a flat posterior (theta independent of
x) whose marginals must be uniform on the box.
"""
import jax
import numpy as np
import pytest

import sedflow_jax as sj
from sedflow_jax.nn import flow as F
from sedflow_jax.sim import prior as P
from sedflow_jax.nn import train as T
from sedflow_jax.nn import checkpoint as CK
from sedflow_jax.nn import data as TD
from sedflow_jax.sbi.posterior import (AmortizedPosterior, box_to_logit, logit_to_box)
from sedflow_jax.sbi.training import train_posterior

BANDS = ("sdss_u", "sdss_g", "sdss_r", "sdss_i", "sdss_z")


@pytest.fixture(scope="module")
def flat_logit(tmp_path_factory):
    """theta ~ the prior box, independent of x: the exact posterior is the flat prior."""
    prior = P.provabgs_prior()
    n = 8000
    theta = np.asarray(P.sample_sampling(jax.random.key(0), prior, n))
    rng = np.random.default_rng(1)
    x = np.column_stack([rng.normal(18, 1, (n, 5)), rng.uniform(0.01, 0.1, (n, 5)),
                         rng.uniform(0.01, 0.2, n)]).astype(np.float32)
    fc = F.FlowConfig.small(11, 11, seed=0).replace(n_blocks=3, hidden=32)
    # 7,200 training rows = 30 batches of 240: every batch full, one compiled training step
    tc = T.TrainConfig(seed=0, batch_size=240, learning_rate=2e-3, patience=5, max_epochs=25,
                       progress=False)
    out = tmp_path_factory.mktemp("logit") / "model"
    post, _ = train_posterior(dict(theta=theta, x=x), out, flow_config=fc, train_config=tc,
                              prior=prior, bands=BANDS, theta_space="logit")
    return post, out, x


def test_logit_box_maps_invert_each_other():
    lo, hi = (np.asarray(a, np.float64) for a in P.sampling_bounds(P.provabgs_prior()))
    s = np.asarray(P.sample_sampling(jax.random.key(3), P.provabgs_prior(), 500), np.float64)
    back = logit_to_box(box_to_logit(s, lo, hi), lo, hi)
    assert np.max(np.abs(back - s) / (hi - lo)) < 2e-6
    y = np.array([[-1e4] * 11, [0.0] * 11, [1e4] * 11])
    b = logit_to_box(y, lo, hi)  # extreme y land on the (closed) box, never outside
    np.testing.assert_allclose(b[0], lo.astype(np.float32))
    np.testing.assert_allclose(b[1], (0.5 * (lo + hi)).astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(b[2], hi.astype(np.float32))


def test_logit_posterior_has_full_acceptance_and_uniform_marginals(flat_logit):
    post, _, x = flat_logit
    assert post.theta_space == "logit"
    s = post.sample(jax.random.key(4), x[0], 4000)
    assert s.acceptance == 1.0 and s.n_accepted == 4000 and not s.low_acceptance
    assert np.all(np.asarray(P.in_support(post.prior, s.s)))
    lo, hi = (np.asarray(a, np.float64) for a in P.sampling_bounds(post.prior))
    u = (s.s - lo) / (hi - lo)  # uniform on [0, 1]^11 for the flat posterior
    grid = np.linspace(0, 1, 201)
    for i in range(11):
        ecdf = np.searchsorted(np.sort(u[:, i]), grid, side="right") / len(u)
        assert np.max(np.abs(ecdf - grid)) < 0.07, (P.SAMPLING_NAMES[i],
                                                    np.max(np.abs(ecdf - grid)))
    # the posterior density of the flat posterior is ~ 1 / box volume everywhere inside
    lp = np.asarray(post.log_prob(s.s[:500], x[0]))
    assert abs(np.median(lp) + np.sum(np.log(hi - lo))) < 0.5


def test_logit_log_prob_is_the_change_of_variables(flat_logit):
    post, _, x = flat_logit
    lo, hi = (np.asarray(a, np.float64) for a in P.sampling_bounds(post.prior))
    s = np.asarray(P.sample_sampling(jax.random.key(5), post.prior, 6), np.float64)
    s = lo + (hi - lo) * np.clip((s - lo) / (hi - lo), 0.02, 0.98)
    y = box_to_logit(s, lo, hi).astype(np.float64)
    lq = np.asarray(F.log_prob(post.flow, y.astype(np.float32), x[0]), np.float64)
    # log|det ds/dy| by central differences of the inverse map (float64, diagonal map)
    h = 1e-5
    ds = (lo + (hi - lo) / (1 + np.exp(-(y + h))) - (lo + (hi - lo) / (1 + np.exp(-(y - h))))) / (2 * h)
    expect = lq - np.sum(np.log(ds), axis=1)
    np.testing.assert_allclose(np.asarray(post.log_prob(s, x[0]), np.float64), expect,
                               rtol=1e-4, atol=1e-3)
    out = s[:1].copy()
    out[0, 4] = 1.5  # fburst outside [0, 1]
    assert np.asarray(post.log_prob(out, x[0]))[0] == -np.inf


def test_logit_posterior_saves_and_loads(flat_logit):
    post, out, x = flat_logit
    back = AmortizedPosterior.load(out)
    assert back.theta_space == "logit"
    s = np.asarray(P.sample_sampling(jax.random.key(6), post.prior, 6))  # shapes as above
    np.testing.assert_array_equal(np.asarray(back.log_prob(s, x[0])),
                                  np.asarray(post.log_prob(s, x[0])))
    with pytest.raises(ValueError, match="theta_space"):
        train_posterior(dict(theta=s, x=x[:5]), prior=post.prior, bands=BANDS,
                        theta_space="tanh")


def test_cli_train_logit_with_band_dropout_then_infer(tmp_path):
    from astropy.table import Table

    from sedflow_jax import cli
    from sedflow_jax.sim.noise import default_noise_model

    d, m = tmp_path / "data", tmp_path / "model"
    assert cli.main(["simulate", "--n", "8000", "--seed", "7", "--out", str(d), "--quiet"]) == 0
    # the flow, optimizer and sampling shapes of test_real_data's example model (2 x 48, batch
    # 512, lr 1e-3; 100 draws in groups of 64): the session's compilation cache serves both
    assert cli.main(["train", "--data", str(d), "--out", str(m), "--blocks", "2", "--hidden",
                     "48", "--lr", "1e-3", "--max-epochs", "3", "--theta-space", "logit",
                     "--band-dropout", "0.5", "--quiet"]) == 0
    post = AmortizedPosterior.load(m)
    assert post.theta_space == "logit" and post.mask_aware
    # mocks drawn like the training set (`sedflow-jax simulate` adds the calibration floor by
    # default): one compiled simulation kernel for both
    cat = sj.mock_catalog(5, 10, noise=default_noise_model(calibration_floor=True))
    cat["flux_sdss_u"][0] = np.nan  # masked band: fit from g r i z
    cat.write(tmp_path / "cat.fits")
    out = tmp_path / "post.fits"
    assert cli.main(["infer", "--model", str(m), "--catalog", str(tmp_path / "cat.fits"),
                     "--out", str(out), "--n-samples", "100", "--n-derived", "10"]) == 0
    t = Table.read(out)
    assert np.all(np.asarray(t["acceptance"]) == 1.0) and np.all(np.asarray(t["flag"]) == 0)
    assert int(t["n_bands_used"][0]) == 4
