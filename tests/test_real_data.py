"""Real SDSS catalog: band masks and bad rows in the reader, training-support coverage, and the
examples/real_sdss.py run on a small subset (masses against Taylor et al. 2011)."""
import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from sedflow_jax.io import catalog as C
from sedflow_jax.io import mocks
from sedflow_jax.sim import layout
from sedflow_jax.nn import flow as F
from sedflow_jax.sbi import masks as M
from sedflow_jax.sbi import inference as INF
from sedflow_jax.sbi.posterior import AmortizedPosterior

ROOT = Path(__file__).resolve().parents[1]
CATALOG = ROOT / "examples" / "data" / "sdss_main_10k.fits"
SDSS = ("sdss_u", "sdss_g", "sdss_r", "sdss_i", "sdss_z")
KW = dict(vector_flux="MODELFLUX", vector_ivar="MODELFLUX_IVAR", z_col="Z")
#: draws per galaxy, in the example run and in the tests that reuse its model: the 60- and the
#: 40-row catalogs then sample in the same padded group shape (one compiled sampler, also the
#: one of test_theta_space's CLI model: same flow size, 100 draws in groups of 64)
N_SAMPLES = 100

pytestmark = pytest.mark.skipif(not CATALOG.exists(), reason="real SDSS catalog not present")


def _example():
    spec = importlib.util.spec_from_file_location("real_sdss", ROOT / "examples" / "real_sdss.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bad_catalog():
    """40 real rows with 0.01 < z < 0.2 and injected problems, one per row:
    0: NaN g flux; 1: negative r ivar; 2: sentinel -9999 in i flux; 3: u, g, r, i not observed
    (flux = ivar = 0: only z left); 4: u flux <= 0 with ivar > 0; and the z band all zero in
    rows 30-39 only (a partial "band missing") -- and separately a whole band all zero."""
    t = Table.read(CATALOG)
    z = np.asarray(t["Z"], float)
    t = t[np.flatnonzero((z > 0.01) & (z < 0.2))[:40]]
    f = np.array(t["MODELFLUX"], float)
    iv = np.array(t["MODELFLUX_IVAR"], float)
    assert (f > 0).all() and (iv > 0).all()  # the rows chosen are clean before injection
    f[0, 1] = np.nan
    iv[1, 2] = -1.0
    f[2, 3] = -9999.0
    f[3, :4] = 0.0
    iv[3, :4] = 0.0
    f[4, 0] = -0.5
    f[30:, 4] = 0.0
    iv[30:, 4] = 0.0
    t["MODELFLUX"] = f
    t["MODELFLUX_IVAR"] = iv
    return t


def test_reader_masks_bad_bands_and_counts(bad_catalog):
    ph = C.read_photometry(bad_catalog, SDSS, mask_bands=True, min_bands=2, **KW)
    bf = ph.band_flag
    assert bf[0, 1] & C.BAND_NONFINITE and bf[1, 2] & C.BAND_BAD_IVAR
    assert bf[2, 3] & C.BAND_SENTINEL and bf[4, 0] & C.BAND_NONPOSITIVE_FLUX
    assert np.all(bf[3, :4] & C.BAND_NOT_OBSERVED) and np.all(bf[30:, 4] & C.BAND_NOT_OBSERVED)
    expect = np.ones((40, 5), bool)
    for r, b in ((0, 1), (1, 2), (2, 3), (4, 0)):
        expect[r, b] = False
    expect[3, :4] = False
    expect[30:, 4] = False
    np.testing.assert_array_equal(ph.mask, expect)
    # mask-aware reading: only row 3 (one band left) is flagged
    assert np.flatnonzero(ph.flag).tolist() == [3] and ph.flag[3] == C.FLAG_TOO_FEW_BANDS
    assert ph.counts["rows_with_masked_bands"] == 15 and ph.counts["masked_sdss_z"] == 10
    assert ph.counts["usable"] == 39
    assert ph.band_counts["sdss_i"]["sentinel"] == 1 and ph.band_counts["sdss_u"]["flux <= 0"] == 1
    # plain reading: every bad band flags its row with the documented bit
    pp = C.read_photometry(bad_catalog, SDSS, **KW)
    assert pp.flag[0] & C.FLAG_NONFINITE and pp.flag[1] & C.FLAG_BAD_IVAR
    assert pp.flag[2] & C.FLAG_SENTINEL and pp.flag[4] & C.FLAG_NONPOSITIVE_FLUX
    assert np.all(pp.flag[30:] & C.FLAG_NONPOSITIVE_FLUX) and np.all(pp.flag[30:] & C.FLAG_BAD_IVAR)
    assert pp.counts["usable"] == 40 - 15 and np.all(pp.flag[~expect.all(1)] != 0)
    # a S/N floor masks the low-S/N bands (u is the noisiest band in SDSS)
    snr = np.array(bad_catalog["MODELFLUX"]) * np.sqrt(np.abs(bad_catalog["MODELFLUX_IVAR"]))
    ps = C.read_photometry(bad_catalog, SDSS, mask_bands=True, snr_floor=20.0, **KW)
    low = (snr < 20) & expect
    assert np.all(ps.band_flag[low] & C.BAND_LOW_SNR) and ps.counts["masked_sdss_u"] >= low[:, 0].sum()


def test_band_all_zero_is_masked_and_warned(bad_catalog):
    t = bad_catalog.copy()
    f, iv = np.array(t["MODELFLUX"]), np.array(t["MODELFLUX_IVAR"])
    f[:, 0], iv[:, 0] = 0.0, 0.0
    t["MODELFLUX"], t["MODELFLUX_IVAR"] = f, iv
    with pytest.warns(UserWarning, match="no usable value"):
        ph = C.read_photometry(t, SDSS, mask_bands=True, **KW)
    assert np.all(ph.band_flag[:, 0] & C.BAND_EMPTY) and ph.counts["masked_sdss_u"] == 40
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pp = C.read_photometry(t, SDSS, **KW)
    assert pp.counts["usable"] == 0  # a plain posterior cannot fit any row


def test_extinction_correction_in_reader():
    t = Table.read(CATALOG)[:50]
    a = C.read_photometry(t, SDSS, **KW)
    b = C.read_photometry(t, SDSS, extinction="EXTINCTION", **KW)
    ext = np.asarray(t["EXTINCTION"], float)
    ok = a.mask
    np.testing.assert_allclose(b.flux[ok] / a.flux[ok], 10 ** (0.4 * ext[ok]), rtol=1e-10)
    # magnitudes brighten by exactly A_b; sigma_mag is unchanged
    xa, xb = layout.to_conditioning(a.flux, a.sigma, a.z), layout.to_conditioning(b.flux, b.sigma, b.z)
    good = ok.all(1)
    np.testing.assert_allclose(xa[good, :5] - xb[good, :5], ext[good], atol=1e-9)
    np.testing.assert_allclose(xa[good, 5:10], xb[good, 5:10], rtol=1e-9)


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("real_sdss")
    table, rep = _example().main(["--n-galaxies", "60", "--n-samples", str(N_SAMPLES),
                                  "--n-derived", "40",
                                  "--train-rows", "30000", "--max-epochs", "8", "--blocks", "2",
                                  "--hidden", "48", "--out", str(out)])
    return out, table, rep


def test_example_real_sdss_subset(example_run):
    out, table, rep = example_run
    for name in ("posteriors.fits", "report.json", "support.png", "mass_sfr.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "report.json").read_text())["n_rows"] == 60
    assert rep["n_rows_fit"] + rep["n_rows_not_fit"] == 60 and rep["n_rows_fit"] >= 50
    assert np.all(np.isfinite(table["logmstar_p50"][table["fit"]]))
    assert np.all(np.isnan(table["logmstar_p50"][~table["fit"]]))
    assert 0.05 < rep["acceptance_mean"] <= 1
    # SEDflow masses track the colour-based mass-to-light masses of Taylor et al. (2011)
    lm, lt = np.asarray(table["logmstar_surviving_p50"]), np.asarray(table["logmstar_taylor11"])
    ok = np.isfinite(lm) & np.isfinite(lt)
    assert np.corrcoef(lm[ok], lt[ok])[0, 1] > 0.8
    assert abs(rep["mass_vs_taylor11"]["median_offset_dex"]) < 0.5
    assert 8.5 < np.median(lm[ok]) < 11.8  # SDSS Main-sample galaxies
    # the training set's (mag, sigma) support covers most real rows in every band
    for b in SDSS:
        assert rep["support_fraction"][b] > 0.8, (b, rep["support_fraction"])


def test_infer_catalog_never_fits_bad_rows(example_run, bad_catalog):
    out, _, _ = example_run
    post = AmortizedPosterior.load(out / "work" / "model")
    assert post.mask_aware and post.support is not None
    res = INF.infer_catalog(post, bad_catalog, n_samples=N_SAMPLES, derived=False, **KW)
    t, rep = res.table, res.report
    assert not t["fit"][3] and t["flag"][3] & C.FLAG_TOO_FEW_BANDS
    assert np.isnan(t["logmstar_p50"][3])
    fit = np.asarray(t["fit"])
    assert np.all(np.asarray(t["n_bands_used"])[fit] >= 2)
    masked_fit = fit & (np.asarray(t["n_bands_used"]) < 5)
    assert masked_fit[[0, 1, 2, 4]].sum() + masked_fit[30:].sum() >= 10  # masked, still fit
    assert rep["n_rows_fit"] == fit.sum() and rep["n_rows_not_fit"] == (~fit).sum()
    assert rep["n_rows_fit_with_masked_bands"] == masked_fit.sum()
    # a plain posterior cannot use masks: every row with a masked band is flagged, not fit
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 11)).astype(np.float32)
    fc = F.FlowConfig.small(11, 11).replace(n_blocks=1, hidden=8)
    plain = AmortizedPosterior(F.init_flow(0, fc, rng.normal(size=(50, 11)), x), post.prior,
                               post.bands, post.x_lo, post.x_hi,
                               meta={"support": post.meta["support"]})
    with pytest.raises(ValueError, match="mask-aware"):
        INF.infer_catalog(plain, bad_catalog, n_samples=N_SAMPLES, derived=False,
                          noise_policy="mask", **KW)
    rp = INF.infer_catalog(plain, bad_catalog, n_samples=N_SAMPLES, derived=False, **KW)
    bad_rows = ~C.read_photometry(bad_catalog, SDSS, **KW).mask.all(1)
    assert not np.any(np.asarray(rp.table["fit"])[bad_rows])
    assert rp.report["n_rows_not_fit"] >= bad_rows.sum()


def test_noise_outside_training_support_is_masked_or_flagged(example_run, bad_catalog):
    out, _, _ = example_run
    post = AmortizedPosterior.load(out / "work" / "model")
    t = bad_catalog.copy()
    iv = np.array(t["MODELFLUX_IVAR"])
    iv[10, 2] *= 1e-8  # r-band sigma 10^4 x larger than the catalog's: no training row like it
    iv[11, :] *= 1e-8  # every band: nothing left to fit from
    t["MODELFLUX_IVAR"] = iv
    res = INF.infer_catalog(post, t, n_samples=N_SAMPLES, derived=False, noise_policy="mask", **KW)
    bf = np.asarray(res.table["band_flag_sdss_r"])
    assert bf[10] & C.BAND_NOISE_OOS and res.table["fit"][10]
    assert res.table["n_bands_used"][10] == 4
    assert not res.table["fit"][11] and res.table["flag"][11] & C.FLAG_TOO_FEW_BANDS
    rf = INF.infer_catalog(post, t, n_samples=N_SAMPLES, derived=False, noise_policy="flag", **KW)
    assert not rf.table["fit"][10] and rf.table["flag"][10] & C.FLAG_NOISE_OOS
    assert rf.report["row_flag_counts"]["outside training support"] >= 2
    ro = INF.infer_catalog(post, t, n_samples=N_SAMPLES, derived=False, noise_policy="ood", **KW)
    assert ro.table["fit"][10] and ro.table["ood"][10] and ro.table["n_bands_used"][10] == 5
    assert INF.noise_ood_rows(ro.photometry)[10] and not ro.table["flag"][10]
