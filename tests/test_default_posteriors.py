"""The shipped default posteriors (sedflow_jax/data/posteriors/<name>/): they load, their files
match the hashes recorded by the build script, and on fresh mocks drawn like their training sets
(floor noise model, random band masks for some rows) log M* is calibrated and informative.
Also band-group dropout (BandDropout(group_drop=...)) and its bit-identical default."""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from sedflow_jax.nn import data as TD
from sedflow_jax.sbi import masks as M
from sedflow_jax.sbi.posterior import AmortizedPosterior
from sedflow_jax.sed.model import load_model
from sedflow_jax.sim.layout import to_conditioning
from sedflow_jax.sim.noise import default_noise_model
from sedflow_jax.sim.simulate import simulate
from sedflow_jax.util import sha256_file

ROOT = Path(__file__).resolve().parents[1] / "sedflow_jax" / "data" / "posteriors"
SDSS = ["sdss_u", "sdss_g", "sdss_r", "sdss_i", "sdss_z"]
SHIPPED = {"sdss_ugriz": SDSS, "galex_sdss": ["galex_fuv", "galex_nuv"] + SDSS}
N_MOCK, N_DRAWS = 300, 200


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def shipped(request):
    name = request.param
    folder = ROOT / name
    t_load = []
    for _ in range(2):
        t0 = time.perf_counter()
        post = AmortizedPosterior.load(folder)
        t_load.append(time.perf_counter() - t0)
    return name, folder, post, min(t_load)


def test_loads_quickly_with_recorded_hashes(shipped):
    name, folder, post, t_load = shipped
    assert t_load < 2.0, f"{name} loads in {t_load:.2f} s"
    assert list(post.bands) == SHIPPED[name]
    assert post.mask_aware and post.theta_space == "logit"
    build = json.loads((folder / "build.json").read_text())
    ck = json.loads((folder / "checkpoint.json").read_text())
    weights = set(ck["files"].values())
    assert weights and weights <= set(build["files"]), "weight files not recorded in build.json"
    for f in ("posterior.json", "checkpoint.json", *weights):
        assert sha256_file(folder / f) == build["files"][f]["sha256"], f"{name}/{f} changed"
    assert sum((folder / f).stat().st_size for f in build["files"]) < 25e6
    assert not list(folder.glob("*.pkl")) and not list(folder.glob("*.pickle"))
    assert len(build["training_set"]["config_sha256"]) == 64
    assert build["training"]["history"]["val_loss"], "no training curve recorded"
    for f in ("card.md", "card.json", "loss.png"):
        assert (folder / f).stat().st_size > 0, f


def test_galex_model_records_group_dropout(shipped):
    name, _, post, _ = shipped
    groups = post.meta["band_mask"].get("group_drop")
    if name == "galex_sdss":
        assert groups["galex"]["bands"] == ["galex_fuv", "galex_nuv"]
        assert 0 < groups["galex"]["p"] < 1
    else:
        assert groups is None


def _masks(post, n, rng):
    """Random masks for half the rows, as in training (with the band groups, if any)."""
    info = post.meta["band_mask"]
    nb = len(post.bands)
    if info.get("group_drop"):
        groups = {k: (tuple(v["indices"]), v["p"]) for k, v in info["group_drop"].items()}
        m = M.group_band_mask(rng, n, nb, info["p_drop"], info["min_bands"], groups)
    else:
        m = M.random_band_mask(rng, n, nb, 1.0, info["min_bands"])
    keep_all = rng.random(n) < 0.5
    m[keep_all] = True
    return m


def test_logmstar_calibrated_on_training_like_mocks(shipped):
    name, _, post, _ = shipped
    bands = list(post.bands)
    model = load_model(filters=bands, z_max=post.prior.zmax)
    # fresh mocks exactly as the training set was drawn (simulate = what mock_catalog wraps, in
    # one compiled block: galex_sdss keeps only ~17 % of the draws)
    r = simulate(11, 4096, model, post.prior, default_noise_model(bands, calibration_floor=True),
                 include_flux=True, progress=False)
    k = np.flatnonzero(np.asarray(r.keep))[:N_MOCK]
    assert k.size == N_MOCK
    x = to_conditioning(np.asarray(r.flux)[k], np.asarray(r.sigma)[k], np.asarray(r.z)[k])
    truth = np.asarray(r.theta_s)[k]
    mask = _masks(post, N_MOCK, np.random.default_rng(3))
    assert (~mask).any() and mask.all(1).any()
    s = post.sample_batched(jax.random.key(4), x, N_DRAWS, mask=mask)
    lm = s.s[:, :, 0]
    lo, med, hi = np.nanpercentile(lm, [16, 50, 84], axis=1)
    ok = np.isfinite(med)
    assert ok.mean() > 0.98
    cov = np.mean((truth[ok, 0] > lo[ok]) & (truth[ok, 0] < hi[ok]))
    corr = np.corrcoef(med[ok], truth[ok, 0])[0, 1]
    assert 0.58 <= cov <= 0.78, f"{name}: log M* 68 % coverage {cov:.3f}"
    assert corr > 0.9, f"{name}: corr(median, truth) {corr:.3f}"


# --------------------------------------------------------------------------------------------
# band-group dropout
# --------------------------------------------------------------------------------------------
def _source(n=500, nb=7, seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(20, 1, (n, nb)), rng.uniform(0.01, 0.1, (n, nb)),
                        rng.uniform(0, 0.2, (n, 1))], 1).astype(np.float32)
    return TD.ArrayData(rng.normal(size=(n, 11)).astype(np.float32), x), x


def test_band_dropout_default_bit_identical():
    src, x = _source()
    fill = np.zeros(14, np.float32)
    a = M.BandDropout(src, fill, p_drop=0.5, min_bands=2, seed=3)
    b = M.BandDropout(src, fill, p_drop=0.5, min_bands=2, seed=3, group_drop=None)
    rows = np.ones(len(x), bool)
    for rng_seed in (None, 5):
        ra = None if rng_seed is None else np.random.default_rng(rng_seed)
        rb = None if rng_seed is None else np.random.default_rng(rng_seed)
        for (ta, xa), (tb, xb) in zip(a.iter_batches(ra, 128, rows), b.iter_batches(rb, 128, rows)):
            np.testing.assert_array_equal(ta, tb)
            np.testing.assert_array_equal(xa, xb)
    # and the masks are random_band_mask's, batch after batch from the fixed-seed generator
    r = np.random.default_rng([3, 0xD50])
    for _, xm in a.iter_batches(None, 128, rows):
        want = M.random_band_mask(r, xm.shape[0], 7, 0.5, 2)
        np.testing.assert_array_equal(M.split_context(xm)[1], want)


def test_group_band_mask_statistics():
    rng = np.random.default_rng(0)
    groups = M.normalize_group_drop({"galex": (("galex_fuv", "galex_nuv"), 0.6)},
                                    ["galex_fuv", "galex_nuv"] + SDSS)
    assert groups == {"galex": ((0, 1), 0.6)}
    m = M.group_band_mask(rng, 40_000, 7, 0.5, 2, groups)
    both_gone = ~m[:, 0] & ~m[:, 1]
    assert m.sum(1).min() >= 2
    # the group goes together in ~60 % of rows (plus rows where random dropout hits both)
    assert 0.6 <= both_gone.mean() <= 0.68
    # the other bands: about half the rows lose some of them
    sdss_lost = ~m[:, 2:].all(1)
    assert 0.35 < sdss_lost[both_gone].mean() < 0.55
    assert 0.3 < (~m[:, 2:]).sum(1)[sdss_lost].mean() / 3 < 0.8
    with pytest.raises(ValueError):
        M.normalize_group_drop({"g": ((0, 9), 0.5)}, range(7))
    with pytest.raises(ValueError):
        M.normalize_group_drop({"g": ((0, 1), 1.5)}, range(7))
    src, _ = _source()
    with pytest.raises(ValueError):
        M.BandDropout(src, np.zeros(14), p_drop=0.5, min_bands=6, group_drop=groups)
