"""Tests of sedflow_jax.train: posterior accuracy on a linear-Gaussian problem, SBC, early
stopping, checkpoints (round trip, corruption, incompatibility), resume == uninterrupted."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from sedflow_jax.nn import flow as F
from sedflow_jax.nn import train as T
from sedflow_jax.nn import checkpoint as CK
from sedflow_jax.nn import data as TD

A = np.array([[1.0, 0.6], [-0.4, 0.9], [0.3, 0.2]], np.float32)  # x = A theta + noise
SIGMA = 0.5


def _linear_gaussian(n, seed):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(n, 2)).astype(np.float32)
    x = (theta @ A.T + SIGMA * rng.normal(size=(n, 3))).astype(np.float32)
    return theta, x


def _analytic_posterior(x):
    prec = np.eye(2) + A.T.astype(np.float64) @ A / SIGMA ** 2
    cov = np.linalg.inv(prec)
    mean = (cov @ A.T.astype(np.float64) @ np.asarray(x, np.float64).T / SIGMA ** 2).T
    return mean, cov


def _sbc_pvalues(samples, truth, n_bins=10):
    """samples (m, n, d), truth (m, d) -> chi-square p-value of the rank histogram per dim."""
    ranks = np.sum(samples < truth[:, None, :], axis=1)  # (m, d) in 0..n
    n = samples.shape[1]
    edges = np.linspace(0, n + 1, n_bins + 1)
    return np.array([sps.chisquare(np.histogram(ranks[:, j], edges)[0]).pvalue
                     for j in range(truth.shape[1])])


@pytest.fixture(scope="module")
def trained():
    theta, x = _linear_gaussian(12000, seed=0)
    fcfg = F.FlowConfig.small(2, 3, hidden=48, n_blocks=4)
    # 10,800 training rows = 45 batches of 240: every batch full, one compiled training step
    tcfg = T.TrainConfig(batch_size=240, learning_rate=2e-3, max_epochs=60, patience=8,
                         progress=False)
    return T.fit(0, tcfg, fcfg, (theta, x))


def test_posterior_matches_analytic_linear_gaussian(trained):
    res = trained
    assert res.n_val == 1200 and res.n_train == 10800
    assert res.history["val_loss"][res.best_epoch - 1] == res.best_val_loss
    xs = np.array([[0.0, 0.0, 0.0], [1.5, -0.5, 0.8], [-1.0, 1.2, -0.3]], np.float32)
    samples = np.asarray(F.sample_batched(res.flow, jax.random.PRNGKey(1), xs, 4000), np.float64)
    mean, cov = _analytic_posterior(xs)
    post_sd = np.sqrt(np.diag(cov))
    for j in range(len(xs)):
        m = samples[j].mean(0)
        c = np.cov(samples[j].T)
        np.testing.assert_array_less(np.abs(m - mean[j]), 0.12 * post_sd + 0.02)
        np.testing.assert_allclose(np.sqrt(np.diag(c)), post_sd, rtol=0.12)
        corr, corr_true = c[0, 1] / np.sqrt(c[0, 0] * c[1, 1]), cov[0, 1] / np.prod(post_sd)
        assert abs(corr - corr_true) < 0.1
    # the learned density at the analytic posterior mean is close to the analytic one
    lp = np.asarray(F.log_prob(res.flow, mean.astype(np.float32), xs))
    lp_true = -np.log(2 * np.pi) - 0.5 * np.linalg.slogdet(cov)[1]
    np.testing.assert_allclose(lp, lp_true, atol=0.15)


def test_sbc_ranks_uniform(trained):
    theta, x = _linear_gaussian(200, seed=123)
    samples = np.asarray(F.sample_batched(trained.flow, jax.random.PRNGKey(7), x, 100))
    p = _sbc_pvalues(samples, theta)
    assert np.all(p > 0.01), p
    # power check: an over-confident posterior (analytic, sd x 0.5) fails the same test
    mean, cov = _analytic_posterior(x)
    rng = np.random.default_rng(0)
    bad = mean[:, None, :] + 0.5 * rng.normal(size=(200, 100, 2)) @ np.linalg.cholesky(cov).T
    assert np.any(_sbc_pvalues(bad, theta) < 1e-3)
    good = mean[:, None, :] + rng.normal(size=(200, 100, 2)) @ np.linalg.cholesky(cov).T
    assert np.all(_sbc_pvalues(good, theta) > 0.01)


def test_early_stopping_restores_best(tmp_path):
    rng = np.random.default_rng(1)
    theta = rng.normal(size=(240, 2)).astype(np.float32)  # independent of x: pure overfitting
    x = rng.normal(size=(240, 2)).astype(np.float32)
    # 180 training rows = 5 batches of 36 (one compiled training step)
    tcfg = T.TrainConfig(batch_size=36, learning_rate=1e-2, patience=2, max_epochs=200,
                         val_fraction=0.25, progress=False)
    fcfg = F.FlowConfig.small(2, 2, hidden=64, n_blocks=3)
    res = T.fit(3, tcfg, fcfg, (theta, x))
    assert res.stopped_early
    assert res.epochs < 200
    assert res.best_epoch == res.epochs - 2
    val = np.asarray(res.history["val_loss"])
    assert val[-1] > res.best_val_loss and val.min() == res.best_val_loss
    # the returned weights are the best epoch's: recompute the validation loss
    is_val = T._split_mask(240, 0.25, 3)
    lp = F.log_prob(res.flow, theta[is_val], x[is_val])
    np.testing.assert_allclose(-float(jnp.mean(lp)), res.best_val_loss, rtol=1e-5)
    png = T.plot_loss(res.history, tmp_path / "loss.png", best_epoch=res.best_epoch)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


#: the small problems below all have 600 rows: 540 training rows = 9 batches of SMALL_BATCH and
#: 60 validation rows, so their fits share one compiled training step and one evaluation
SMALL_BATCH = 60


def _small_problem(n=600, seed=5):
    theta, x = _linear_gaussian(n, seed)
    return theta, x, F.FlowConfig.small(2, 3, hidden=16, n_blocks=2)


def test_checkpoint_roundtrip_identical_log_prob(tmp_path):
    theta, x, fcfg = _small_problem()
    for bn in (False, True):
        d = tmp_path / f"ck_bn{bn}"
        tcfg = T.TrainConfig(batch_size=SMALL_BATCH, max_epochs=2, progress=False,
                             checkpoint_dir=str(d))
        res = T.fit(0, tcfg, fcfg.replace(batch_norm=bn), (theta, x))
        loaded = CK.load_flow(d)
        assert loaded.config == res.flow.config and loaded.permutations == res.flow.permutations
        np.testing.assert_array_equal(np.asarray(F.log_prob(loaded, theta[:50], x[:50])),
                                      np.asarray(F.log_prob(res.flow, theta[:50], x[:50])))
        key = jax.random.PRNGKey(0)
        np.testing.assert_array_equal(np.asarray(F.sample(loaded, key, x[0], 7)),
                                      np.asarray(F.sample(res.flow, key, x[0], 7)))
        if bn:  # training updated the running averages, and they were saved
            mean = np.asarray(loaded.blocks[0].batch_norms[0].mean[...])
            assert np.abs(mean).max() > 1e-3
            ref = res.flow.blocks[0].batch_norms[0].mean[...]
            np.testing.assert_array_equal(mean, np.asarray(ref))
    meta = json.loads((d / "checkpoint.json").read_text())
    assert meta["flow_config"]["d_theta"] == 2 and "jax" in meta["versions"]
    assert len(meta["zscore"]["theta_mean"]) == 2 and meta["epoch"] == 2
    # a bare save (no optimizer state) loads too
    CK.save_checkpoint(tmp_path / "bare", res.flow)
    np.testing.assert_array_equal(np.asarray(F.log_prob(CK.load_flow(tmp_path / "bare"),
                                                         theta[:50], x[:50])),
                                  np.asarray(F.log_prob(res.flow, theta[:50], x[:50])))


def test_corrupt_or_incompatible_checkpoint_errors(tmp_path):
    theta, x, fcfg = _small_problem()
    d = tmp_path / "ck"
    T.fit(0, T.TrainConfig(batch_size=SMALL_BATCH, max_epochs=1, progress=False,
                           checkpoint_dir=str(d)), fcfg, (theta, x))
    with pytest.raises(ValueError, match="d_theta"):
        CK.load_flow(d, config=fcfg.replace(d_theta=3))
    with pytest.raises(ValueError, match="d_theta"):
        T.fit(0, T.TrainConfig(max_epochs=2, progress=False), fcfg.replace(d_theta=3),
              (np.zeros((50, 3), np.float32), x[:50]), resume_from=d)
    with pytest.raises(ValueError, match="no checkpoint"):
        CK.load_flow(tmp_path / "nowhere")
    meta = json.loads((d / "checkpoint.json").read_text())
    flow_file = d / meta["files"]["flow"]
    good = flow_file.read_bytes()

    # truncated weights file
    flow_file.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        CK.load_flow(d)
    # truncated file whose hash is "right" (e.g. a hand-edited json): msgpack itself fails
    meta2 = dict(meta, sha256=dict(meta["sha256"], flow=None))
    (d / "checkpoint.json").write_text(json.dumps(meta2))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        CK.load_flow(d)
    flow_file.write_bytes(good)
    # json edited to another architecture: the stored arrays no longer fit
    meta3 = dict(meta2, flow_config=dict(meta["flow_config"], hidden=32))
    (d / "checkpoint.json").write_text(json.dumps(meta3))
    with pytest.raises(ValueError, match="shape"):
        CK.load_flow(d)
    # truncated json
    (d / "checkpoint.json").write_text(json.dumps(meta)[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        CK.load_flow(d)
    (d / "checkpoint.json").write_text(json.dumps(meta))
    assert CK.load_flow(d).config == fcfg


def _write_shards(tmp_path, theta, x, sizes):
    paths, s = [], 0
    for i, m in enumerate(sizes):
        p = tmp_path / f"shard{i}.npz"
        np.savez(p, theta=theta[s:s + m], x=x[s:s + m])
        paths.append(p)
        s += m
    return paths


def test_npz_shards_stream_every_row_once_and_stats(tmp_path):
    theta, x = _linear_gaussian(1000, seed=9)
    src = TD.NpzShards(_write_shards(tmp_path, theta, x, [300, 450, 250]), buffer_shards=2)
    assert len(src) == 1000 and (src.d_theta, src.d_context) == (2, 3)
    rows = T._split_mask(1000, 0.1, 0) == False  # noqa: E712 (training rows)
    seen = []
    batches = list(src.iter_batches(np.random.default_rng(0), 128, rows))
    assert all(b[0].shape[0] == 128 for b in batches[:-1])
    for t, _ in batches:
        seen.append(t)
    seen = np.concatenate(seen)
    assert seen.shape[0] == rows.sum()
    key = lambda a: np.lexsort(a.T)  # noqa: E731
    np.testing.assert_array_equal(seen[key(seen)], theta[rows][key(theta[rows])])
    st = TD.streaming_stats(src, rows, chunk=97)
    ref = F.compute_stats(theta[rows], x[rows])
    for a, b in zip(st, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    with pytest.raises(ValueError, match="theta"):
        bad = tmp_path / "bad.npz"
        np.savez(bad, foo=np.zeros(3))
        TD.NpzShards([bad])


def test_resume_equals_uninterrupted(tmp_path):
    """6 epochs straight == 3 epochs, 'kill', resume for 3 more: identical losses and weights.
    Uses the streaming shard source."""
    theta, x, fcfg = _small_problem()
    src = TD.NpzShards(_write_shards(tmp_path, theta, x, [250, 200, 150]))
    base = T.TrainConfig(batch_size=SMALL_BATCH, patience=50, progress=False)
    full = T.fit(11, base.replace(max_epochs=6, checkpoint_dir=str(tmp_path / "a")), fcfg, src)
    ck_b = str(tmp_path / "b")
    part = T.fit(11, base.replace(max_epochs=3, checkpoint_dir=ck_b), fcfg, src)
    assert part.epochs == 3
    resumed = T.fit(11, base.replace(max_epochs=6, checkpoint_dir=ck_b), fcfg, src,
                    resume_from=ck_b)
    assert resumed.epochs == 6
    assert resumed.history["train_loss"] == full.history["train_loss"]
    assert resumed.history["val_loss"] == full.history["val_loss"]
    assert resumed.best_epoch == full.best_epoch
    la, lb = (jax.tree_util.tree_leaves(T.nnx.state(r.flow)) for r in (full, resumed))
    for a, b in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ca = CK.load_checkpoint(tmp_path / "a")
    cb = CK.load_checkpoint(ck_b)
    for a, b in zip(jax.tree_util.tree_leaves(T.nnx.state(ca["current_flow"])),
                    jax.tree_util.tree_leaves(T.nnx.state(cb["current_flow"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ca["opt_state_flat"].keys() == cb["opt_state_flat"].keys()
    for k in ca["opt_state_flat"]:
        np.testing.assert_array_equal(ca["opt_state_flat"][k], cb["opt_state_flat"][k])
    # a different seed cannot resume this run
    with pytest.raises(ValueError, match="seed"):
        T.fit(12, base.replace(max_epochs=7), fcfg, src, resume_from=ck_b)


def test_fit_accepts_key_and_validates_dims():
    theta, x, fcfg = _small_problem()
    res = T.fit(jax.random.PRNGKey(4), T.TrainConfig(batch_size=SMALL_BATCH, max_epochs=1,
                                                     progress=False),
                fcfg, {"theta": theta, "x": x})
    assert res.epochs == 1 and np.isfinite(res.best_val_loss)
    with pytest.raises(ValueError, match="do not match"):
        T.fit(0, T.TrainConfig(max_epochs=1, progress=False), fcfg.replace(d_context=4),
              (theta, x))
    with pytest.raises(ValueError, match="finite"):
        bad = theta.copy()
        bad[3, 0] = np.nan
        T.fit(0, T.TrainConfig(max_epochs=1, progress=False), fcfg, (bad, x))
