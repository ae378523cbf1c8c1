"""Band masks: dropout statistics, the masked context, and a mask-aware posterior trained with band
dropout (masking widens the posterior on average; SBC with random masks is not rejected)."""
import jax
import numpy as np
import pytest
from scipy import stats

import sedflow_jax as sj
from sedflow_jax.io import catalog as C
from sedflow_jax.io import mocks
from sedflow_jax.sim import layout
from sedflow_jax.eval import diagnostics as D
from sedflow_jax.nn import flow as F
from sedflow_jax.sbi import masks as M
from sedflow_jax.sbi import inference as INF
from sedflow_jax.sim import prior as P
from sedflow_jax.nn import train as T
from sedflow_jax.nn import checkpoint as CK
from sedflow_jax.nn import data as TD
from sedflow_jax.sbi.posterior import AmortizedPosterior
from sedflow_jax.sbi.training import train_posterior

NB = 5
#: mock galaxies of the masked posterior's tests
N_MOCK = 160
#: draws per mock galaxy; sampling calls run groups of 32 galaxies (max_rows = 32 draws x
#: N_DRAWS): every call of the masked tests, and each rejection round, uses one compiled shape
N_DRAWS = 200
MAX_ROWS = 32 * N_DRAWS


def test_random_band_mask_statistics():
    rng = np.random.default_rng(0)
    m = M.random_band_mask(rng, 60_000, NB, p_drop=0.4, min_bands=2)
    dropped = NB - m.sum(1)
    assert dropped.max() == 3 and dropped.min() == 0  # never fewer than min_bands left
    frac = np.mean(dropped > 0)
    assert abs(frac - 0.4) < 4 * np.sqrt(0.24 / 60_000)
    # k ~ U{1, 2, 3} among dropped rows; every band equally likely to go
    k_counts = np.bincount(dropped[dropped > 0], minlength=4)[1:]
    assert stats.chisquare(k_counts).pvalue > 1e-3
    assert stats.chisquare((~m).sum(0)).pvalue > 1e-3
    assert M.random_band_mask(rng, 10, NB, p_drop=0.0).all()


def test_apply_mask_layout_and_errors():
    x = np.arange(22, dtype=np.float32).reshape(2, 11)
    x[1, 1] = np.nan  # a masked band's value may be NaN
    mask = np.array([[1, 1, 1, 1, 1], [1, 0, 1, 1, 1]], bool)
    fill = -np.arange(10, dtype=np.float32)
    xm = M.apply_mask(x, mask, fill)
    assert xm.shape == (2, 16) and np.isfinite(xm).all()
    np.testing.assert_array_equal(xm[0, :11], x[0])
    assert xm[1, 1] == fill[1] and xm[1, 6] == fill[6]  # mag and sigma of band 1 filled
    np.testing.assert_array_equal(xm[:, 11:], mask.astype(np.float32))
    back, m2 = M.split_context(xm)
    np.testing.assert_array_equal(m2, mask)
    assert np.isnan(back[1, 1]) and np.isnan(back[1, 6]) and back[1, 0] == x[1, 0]
    with pytest.raises(ValueError):
        M.apply_mask(x, mask[:, :4], fill)
    with pytest.raises(ValueError):
        M.apply_mask(x, mask, fill[:9])


def test_plain_posterior_refuses_masked_bands():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 11)).astype(np.float32)
    th = rng.normal(size=(200, 11)).astype(np.float32)
    fc = F.FlowConfig.small(11, 11).replace(n_blocks=1, hidden=8)
    post = AmortizedPosterior(F.init_flow(0, fc, th, x), sj.provabgs_prior(),
                              ("sdss_u", "sdss_g", "sdss_r", "sdss_i", "sdss_z"), x.min(0),
                              x.max(0))
    assert not post.mask_aware
    with pytest.raises(ValueError, match="band dropout"):
        post.sample_batched(jax.random.key(0), x[:2], 4, mask=np.array([[1, 0, 1, 1, 1]] * 2,
                                                                         bool))


@pytest.fixture(scope="module")
def masked():
    """A small mask-aware posterior: 60k simulated rows, band dropout 0.5, 4 x 96 MAF."""
    model = sj.load_model(z_max=0.2)  # simulate's default model; one compiled block kernel
    r = sj.simulate(5, 60_000, model, progress=False)
    d = r.training_data()
    fc = F.FlowConfig.small(11, 16, seed=0).replace(n_blocks=4, hidden=96)
    tc = T.TrainConfig(seed=0, batch_size=256, learning_rate=1e-3, patience=4, max_epochs=40,
                       progress=False)
    post, res = train_posterior(d, None, flow_config=fc, train_config=tc,
                                prior=sj.provabgs_prior(), bands=tuple(r.manifest["bands"]),
                                band_dropout=0.5)
    cat = sj.mock_catalog(77, N_MOCK, model=model)
    ph = C.read_photometry(cat, post.bands)
    x = layout.to_conditioning(ph.flux, ph.sigma, ph.z)
    truth = np.asarray(P.to_sampling(np.column_stack(
        [np.asarray(cat[n], float) for n in P.PARAM_NAMES]).astype(np.float32)))
    return post, res, x, truth


def _width68(s):
    lo, hi = np.nanpercentile(s, [16, 84], axis=1)
    return hi - lo


def test_masked_posterior_trains_and_records_its_layout(masked):
    post, res, x, _ = masked
    assert post.mask_aware and post.flow.config.d_context == 16
    info = post.meta["band_mask"]
    assert info["min_bands"] == 2 and len(info["fill"]) == 10
    assert res.history["val_loss"][res.best_epoch - 1] < res.history["val_loss"][0] - 2.0
    with pytest.raises(ValueError, match="fewer than"):
        post.sample_batched(jax.random.key(0), x[:1], 8, mask=np.array([[1, 0, 0, 0, 0]], bool))


def test_masking_a_band_widens_log_mass_on_average(masked):
    """E[Var(theta | fewer bands)] >= E[Var(theta | all bands)]: averaged over mocks, masking can
    only widen an exact posterior. The reddest band (z) carries the most mass information, u the
    dust-slope information."""
    post, _, x, truth = masked
    m = len(x)
    # every mock under five masks, drawn in one call (one rejection loop, one compiled shape):
    # all bands; without u, r, z; only g and i. Rows of the call are distinct, so every
    # (mock, mask) gets its own draws
    masks, xs = [np.ones((m, NB), bool)], [x]
    for b in (0, 2, 4):  # u, r, z
        mask = np.ones((m, NB), bool)
        mask[:, b] = False
        xn = x.copy()
        xn[:, [b, NB + b]] = np.nan  # the masked band's values are never read
        masks.append(mask)
        xs.append(xn)
    mask = np.zeros((m, NB), bool)
    mask[:, [1, 3]] = True
    masks.append(mask)
    xs.append(x)
    s_all = post.sample_batched(jax.random.key(1), np.concatenate(xs), N_DRAWS,
                                mask=np.concatenate(masks), max_rows=MAX_ROWS).s
    s_full, s_u, s_r, s_z, s_gi = np.split(s_all, 5)
    w_full = np.nanmean(_width68(s_full), axis=0)  # (11,) mean 68 % widths
    widen = {}
    for b, s in ((0, s_u), (2, s_r), (4, s_z)):
        widen[b] = np.nanmean(_width68(s), axis=0) / w_full
        # the masked posterior still covers the truth about as often (68 % interval)
        lo, hi = np.nanpercentile(s[..., 0], [16, 84], axis=1)
        assert 0.5 < np.mean((truth[:, 0] > lo) & (truth[:, 0] < hi)) < 0.9
        # never clearly narrower on average over the 11 parameters
        assert np.mean(widen[b]) > 0.98, (b, widen[b])
    assert widen[4][0] > 1.05, widen[4]  # log M* without z
    assert widen[2][0] > 0.99, widen[2]  # log M* without r (g and i bracket it)
    assert widen[0][10] > 1.05, widen[0]  # dust slope n_dust without u
    # keeping only g and i widens log M* more than dropping any single band
    w_gi = np.nanmean(_width68(s_gi[..., 0])) / w_full[0]
    assert w_gi > max(widen[b][0] for b in widen) and w_gi > 1.1, (w_gi, widen)


def test_log_mass_coverage_with_random_masks(masked):
    """Coverage of log M* on mocks with the training mix of random masks. The small CI flow is
    somewhat overconfident even without masks (68 % intervals cover ~63 %); a broken mask path
    (mask ignored, fill read as data) sends coverage far lower. Exact calibration of the mask
    machinery is tested on the analytic model below."""
    post, _, x, truth = masked
    rng = np.random.default_rng(7)
    mask = M.random_band_mask(rng, len(x), NB, p_drop=0.5, min_bands=2)
    n = N_DRAWS
    s = post.sample_batched(jax.random.key(4), x, n, mask=mask, max_rows=MAX_ROWS)
    full = s.n_accepted == n
    assert full.mean() > 0.95 and (~mask).any(1).mean() > 0.35
    for level, lo_ok, hi_ok in ((0.68, 0.53, 0.83), (0.95, 0.80, 0.99)):
        lo, hi = np.nanpercentile(s.s[full, :, 0], [50 - 50 * level, 50 + 50 * level], axis=1)
        cov = np.mean((truth[full, 0] > lo) & (truth[full, 0] < hi))
        assert lo_ok < cov < hi_ok, (level, cov)


# ------------------------------------------------------------------ exact reference: a linear
# Gaussian "photometry" model in SEDflow's context layout, whose masked posteriors are analytic
_A = np.stack([np.cos(np.arange(NB) * np.pi / NB), np.sin(np.arange(NB) * np.pi / NB)], 1)


def _toy(rng, n):
    """theta ~ N(0, I_2); 'band' b measures a_b . theta with noise sigma_b ~ U(0.2, 1);
    x = [values (5), sigmas (5), dummy z]."""
    th = rng.normal(size=(n, 2))
    sig = rng.uniform(0.2, 1.0, (n, NB))
    v = th @ _A.T + sig * rng.normal(size=(n, NB))
    return th.astype(np.float32), np.column_stack([v, sig, rng.uniform(0, 1, n)]).astype(np.float32)


def _exact(x, mask):
    """Analytic posterior mean (n, 2) and covariance (n, 2, 2) using the unmasked bands."""
    w = mask / x[:, NB:2 * NB] ** 2
    cov = np.linalg.inv(np.eye(2) + np.einsum("nb,bi,bj->nij", w, _A, _A))
    mean = np.einsum("nij,nj->ni", cov, np.einsum("nb,bi->ni", w * x[:, :NB], _A))
    return mean, cov


@pytest.fixture(scope="module")
def toy_flow():
    th, x = _toy(np.random.default_rng(0), 40_000)
    fill = x.mean(0)[:2 * NB]
    src = M.BandDropout(TD.ArrayData(th, x), fill, p_drop=0.7, min_bands=1, seed=0)
    assert src.d_context == 3 * NB + 1
    tc = T.TrainConfig(batch_size=256, learning_rate=2e-3, patience=5, max_epochs=40,
                       progress=False)
    res = T.fit(0, tc, F.FlowConfig.small(2, 16).replace(n_blocks=3, hidden=48), src)
    return res.flow, fill


def test_toy_masked_flow_matches_exact_posteriors_and_sbc(toy_flow):
    flow, fill = toy_flow
    rng = np.random.default_rng(1)
    tt, xt = _toy(rng, 300)
    mask = M.random_band_mask(rng, 300, NB, 1.0, min_bands=1)
    xn = xt.copy()
    xn[:, :2 * NB][~np.concatenate([mask, mask], 1)] = np.nan  # masked values are never read
    s = np.asarray(F.sample_batched(flow, jax.random.key(0), M.apply_mask(xn, mask, fill), 199))
    mean, cov = _exact(xt, mask)
    sd = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    ratio = np.mean(s.std(1) / sd, 0)
    assert np.all((ratio > 0.85) & (ratio < 1.2)), ratio
    assert np.all(np.mean(np.abs(s.mean(1) - mean) / sd, 0) < 0.35)
    # SBC on the masked mocks is not rejected (1 % level, both parameters)
    res = D.sbc_uniformity(D.sbc_ranks(tt, s), 199, n_bins=10)
    assert np.all(res["chi2_pvalue"] > 0.01) and np.all(res["ks_pvalue"] > 0.01), res
    # and masking widens the flow's posterior as it widens the exact one
    full = np.asarray(F.sample_batched(flow, jax.random.key(1),
                                       M.apply_mask(xt, np.ones_like(mask), fill), 199))
    drop = np.ones_like(mask)
    drop[:, :3] = False
    few = np.asarray(F.sample_batched(flow, jax.random.key(2), M.apply_mask(xt, drop, fill), 199))
    exact_ratio = np.mean(np.sqrt(np.diagonal(_exact(xt, drop)[1], axis1=1, axis2=2)), 0) / \
        np.mean(np.sqrt(np.diagonal(_exact(xt, np.ones_like(mask))[1], axis1=1, axis2=2)), 0)
    flow_ratio = few.std(1).mean(0) / full.std(1).mean(0)
    assert np.all(exact_ratio > 1.1)
    np.testing.assert_allclose(flow_ratio, exact_ratio, rtol=0.12)
