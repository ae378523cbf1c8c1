"""`infer` and `infer --stream` are one inference path: every catalog option (extinction, S/N
floor, noise policy, vector columns, band masks of a mask-aware model) gives the same table
either way; chunks are sized by memory; unreadable catalogs, failing outputs and impossible
sizes are refused in one line (exit 2) and leave nothing behind.

Tiny: 40 catalog rows, 2 bands, an untrained 1-block flow whose draws depend on the photometry
(tests/test_parallel_cli.tiny_posterior), 24 draws, no derived properties except where tested.
"""
from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from sedflow_jax import cli
from sedflow_jax.io import catalog as C
from sedflow_jax.sbi import streaming as ST
from test_parallel_cli import filled, save_tiny_posterior

BANDS = ("sdss_g", "sdss_r")
N = 40
BASE = ["--n-samples", 24, "--n-derived", 0, "--max-rounds", 2, "--seed", 3,
        "--keep-columns", "objid"]


def _main(argv):
    return cli.main([str(v) for v in argv])


def mock_catalog(n=N, seed=1):
    """Per-band and vector (n, 2) flux columns, 0.3 mag extinction per band, an id; row 3 has
    S/N 2 in sdss_r, row 5 a magnitude beyond the model's training range."""
    rng = np.random.default_rng(seed)
    t = Table()
    t["objid"] = np.arange(700, 700 + n, dtype=np.int64)
    f = 10 ** rng.uniform(0.8, 2.5, (n, 2))
    sig = 0.05 * f
    sig[3, 1] = 0.5 * f[3, 1]
    f[5, 0] = 1.0  # mag 22.5 > 22
    for i, b in enumerate(BANDS):
        t[f"flux_{b}"] = f[:, i]
        t[f"flux_ivar_{b}"] = 1.0 / sig[:, i] ** 2
        t[f"A_{b}"] = np.full(n, 0.3)
    t["NMGY"] = f * 1.5  # other fluxes: reading them must change the answer
    t["NMGY_IVAR"] = 1.0 / (1.5 * sig) ** 2
    t["z"] = rng.uniform(0.02, 0.18, n)
    return t


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("infer_cli")
    cat = d / "cat.fits"
    mock_catalog().write(cat)
    return {"dir": d, "cat": cat,
            "plain": save_tiny_posterior(d / "plain", bands=BANDS),
            "masked": save_tiny_posterior(d / "masked", bands=BANDS, mask_aware=True),
            "one": save_tiny_posterior(d / "one")}


def _plain(setup, model, opts, name):
    out = setup["dir"] / f"{name}.fits"
    assert _main(["infer", "--model", setup[model], "--catalog", setup["cat"], *BASE, *opts,
                  "--out", out]) == 0
    return Table.read(out)


def _stream(setup, model, opts, name, chunk_rows=16):
    h5 = setup["dir"] / f"{name}.h5"
    assert _main(["infer", "--model", setup[model], "--catalog", setup["cat"], *BASE, *opts,
                  "--stream", "--chunk-rows", chunk_rows, "--quiet", "--out", h5]) == 0
    return ST.read_inference(h5)[0]


def _assert_same(a, b):
    cols = [c for c in a.colnames if c in b.colnames]
    assert "logmstar_p50" in cols and "flag" in cols and "objid" in cols
    assert set(a.colnames) - {"row"} == set(b.colnames) - {"row"}
    for c in cols:
        x, y = filled(a[c]), filled(b[c])
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6, err_msg=c)
        else:
            assert np.array_equal(x, y), c


@pytest.fixture(scope="module")
def baseline(setup):
    return _plain(setup, "plain", [], "base")


@pytest.mark.parametrize("model,opts,differs", [
    ("plain", ["--extinction", "A_{band}"], "values"),
    ("plain", ["--snr-floor", 5], "flags"),
    ("plain", ["--noise-policy", "flag"], "flags"),
    ("plain", ["--vector-flux", "NMGY", "--vector-ivar", "NMGY_IVAR"], "values"),
    ("masked", ["--snr-floor", 5, "--extinction", "A_{band}"], "values"),
])
def test_stream_equals_plain_for_every_option(setup, baseline, model, opts, differs):
    name = f"{model}_{'_'.join(str(o).strip('-').replace('{band}', 'b') for o in opts)}"
    plain = _plain(setup, model, opts, name)
    _assert_same(plain, _stream(setup, model, opts, name))
    # the option is seen: the answer is not the one without it
    fit = (np.asarray(plain["flag"]) == 0) & (np.asarray(baseline["flag"]) == 0)
    if differs == "values":
        lm, lb = filled(plain["logmstar_p50"]), filled(baseline["logmstar_p50"])
        with np.errstate(invalid="ignore"):
            assert np.sum(np.abs(lm - lb)[fit] > 1e-4) >= 30
    else:
        assert not np.array_equal(np.asarray(plain["flag"]), np.asarray(baseline["flag"]))
    if model == "masked":  # row 3's low-S/N band is masked, the row still fit with one band
        assert plain["fit"][3] and plain["n_bands_used"][3] == 1
        assert plain["band_flag_sdss_r"][3] & C.BAND_LOW_SNR


def test_option_effects_in_the_table(baseline, setup):
    """Without options: row 5 (beyond the training range) is fit and marked ood; with
    --noise-policy flag it is flagged and not fit; --snr-floor flags row 3 (plain model)."""
    assert baseline["fit"][5] and baseline["ood"][5]
    flagged = _plain(setup, "plain", ["--noise-policy", "flag"], "flag_again")
    assert not flagged["fit"][5] and flagged["flag"][5] & C.FLAG_NOISE_OOS
    snr = _plain(setup, "plain", ["--snr-floor", 5], "snr_again")
    assert not snr["fit"][3] and snr["flag"][3] & C.FLAG_LOW_SNR


# ---------------------------------------------------------------------------------------------
# memory: chunks and derived-property groups sized by rows x draws
# ---------------------------------------------------------------------------------------------
def test_chunk_plan_is_sized_by_memory():
    assert ST.plan_chunk_rows(16384, 10_000, 40) == 40  # a small catalog: one chunk, no padding
    big = ST.plan_chunk_rows(16384, 10_000, 10 ** 6)
    assert big * 10_000 <= ST.MAX_CHUNK_DRAWS and big >= 100
    assert ST.plan_chunk_rows(12, 24, 32) == 12
    assert ST.plan_chunk_rows(16384, 10 ** 9, 5) == 1


def test_stream_default_chunk_rows_small_catalog(setup, monkeypatch, capsys):
    """The default --chunk-rows (16384) on a 40-row catalog: one chunk of 40 rows, and the
    derived properties evaluated on at most 64 galaxies at a time (not padded to 16384)."""
    from sedflow_jax.sed.model import SEDModel

    seen = []
    real = SEDModel.derived_draws

    def spy(self, theta, z):
        seen.append(np.shape(theta))
        return real(self, theta, z)

    monkeypatch.setattr(SEDModel, "derived_draws", spy)
    t = mock_catalog()
    t.rename_columns(["flux_sdss_r", "flux_ivar_sdss_r"], ["F_r", "IV_r"])
    cat = setup["dir"] / "one_band.fits"
    t.write(cat)
    h5 = setup["dir"] / "default_chunks.h5"
    assert _main(["infer", "--model", setup["one"], "--catalog", cat, "--out", h5, "--stream",
                  "--quiet", "--n-samples", 24, "--n-derived", 3, "--max-rounds", 1,
                  "--flux-fmt", "F_r", "--ivar-fmt", "IV_r"]) == 0
    assert "1 chunk(s) of 40 rows" in capsys.readouterr().out
    assert seen and max(s[0] for s in seen) <= 64 and all(s[1] == 3 for s in seen)
    res = ST.read_inference(h5)[0]
    ok = (np.asarray(res["flag"]) == 0) & (np.asarray(res["n_accepted"]) > 0)
    assert ok.sum() >= 35 and np.isfinite(filled(res["logmstar_surviving_p50"])[ok]).all()


# ---------------------------------------------------------------------------------------------
# refusals: one line, exit 2, nothing left behind
# ---------------------------------------------------------------------------------------------
def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("sedflow-jax infer: error"), err
    for s in needles:
        assert s in err, err
    return err


@pytest.mark.parametrize("name,data", [("garbage.fits", b"\x00junk" * 100),
                                        ("garbage.h5", b"not an hdf5 file" * 10),
                                        ("catalog.xyz", b"a,b\n1,2\n")])
@pytest.mark.parametrize("stream", [False, True])
def test_unreadable_catalog_one_line(setup, tmp_path, capsys, name, data, stream):
    cat = tmp_path / name
    cat.write_bytes(data)
    out = tmp_path / ("o.h5" if stream else "o.fits")
    rc = _main(["infer", "--model", setup["one"], "--catalog", cat, "--out", out, *BASE[:8],
                *(["--stream", "--quiet"] if stream else [])])
    assert rc == 2
    _one_line_error(capsys, name)
    assert not out.exists() and not (tmp_path / "o.h5.parts").exists()


def test_failing_samples_path_leaves_nothing(setup, tmp_path, capsys, monkeypatch):
    from sedflow_jax.cli import infer as cli_infer

    out = tmp_path / "o.fits"
    argv = ["infer", "--model", setup["one"], "--catalog", setup["cat"], *BASE[:8],
            "--out", out, "--flux-fmt", "flux_{band}"]
    assert _main([*argv, "--samples", tmp_path / "nowhere" / "s.h5"]) == 2
    _one_line_error(capsys, "nowhere")
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    def broken(path, theta, rows):
        open(path, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(cli_infer, "write_samples", broken)
    assert _main([*argv, "--samples", tmp_path / "s.h5"]) == 2
    _one_line_error(capsys, "disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no table, no temporary files
    monkeypatch.undo()
    assert _main([*argv, "--samples", tmp_path / "s.h5"]) == 0  # the rerun is not refused
    assert out.exists() and (tmp_path / "s.h5").exists()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("extra,needle", [
    (["--n-samples", 0], "--n-samples must be >= 1"),
    (["--n-samples", -5], "--n-samples must be >= 1"),
    (["--keep-columns", "objid", "NOPE"], "NOPE"),
])
def test_bad_sizes_and_unknown_keep_columns(setup, tmp_path, capsys, stream, extra, needle):
    out = tmp_path / ("o.h5" if stream else "o.fits")
    rc = _main(["infer", "--model", setup["one"], "--catalog", setup["cat"], "--out", out,
                *BASE, *extra, *(["--stream", "--quiet"] if stream else [])])
    assert rc == 2
    _one_line_error(capsys, needle)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# --exact: importance-sampled posteriors through the same path
# ---------------------------------------------------------------------------------------------
EXACT = ["--exact", "--is-n-initial", 64, "--is-n-max", 256, "--target-ess", 40]


def _decode_text(*tables):
    """Text columns (is_reason: bytes in FITS and HDF5) as str, in place."""
    for tab in tables:
        for c in tab.colnames:
            if tab[c].dtype.kind == "S":
                tab[c] = np.char.decode(np.asarray(tab[c]), "utf-8")


def test_exact_columns_samples_and_stream_equal_plain(setup, tmp_path):
    """``--exact`` (mask-aware model, S/N floor masking row 3's r band): the is_* columns, the
    summaries are percentiles of the resampled draws written to --samples, is_flag says
    exactly when k-hat >= 0.7 or ESS < target, rows not fit are flagged, the values differ
    from the amortized ones, and --stream gives the same table."""
    import h5py

    opts = [*EXACT, "--snr-floor", 5]
    samples = tmp_path / "s.h5"
    out = tmp_path / "exact.fits"
    assert _main(["infer", "--model", setup["masked"], "--catalog", setup["cat"], *BASE, *opts,
                  "--out", out, "--samples", samples]) == 0
    t = Table.read(out)
    for c in ("is_ess", "is_efficiency", "is_efficiency_flow", "is_pareto_k", "is_n_draws",
              "is_flag", "is_reason"):
        assert c in t.colnames, c
    fit = np.asarray(t["fit"], bool)
    assert fit.sum() >= 35 and t["fit"][3] and t["n_bands_used"][3] == 1
    ess, k = filled(t["is_ess"])[fit], filled(t["is_pareto_k"])[fit]
    nd = np.asarray(t["is_n_draws"])[fit]
    assert np.all((nd >= 64) & (nd <= 256)) and np.all(ess > 0) and np.all(ess <= nd)
    np.testing.assert_allclose(filled(t["is_efficiency"])[fit], ess / nd, rtol=1e-6)
    assert np.array_equal(np.asarray(t["is_flag"])[fit], ((k >= 0.7) | (ess < 40)).astype(int))
    assert np.all(np.asarray(t["is_flag"])[~fit] == 1)
    # the summaries are the resampled draws' percentiles (recomputed here with numpy)
    with h5py.File(samples, "r") as f:
        theta, rows = f["theta"][...], f["rows"][...]
    assert np.array_equal(rows, np.flatnonzero(fit)) and theta.shape[1] == 24
    med = np.percentile(theta[..., 0], 50, axis=1)
    np.testing.assert_allclose(filled(t["logmstar_p50"])[fit], med, rtol=1e-5)
    # the reweighting is seen: not the amortized medians of the same model and options
    amortized = _plain(setup, "masked", ["--snr-floor", 5], "exact_amortized")
    assert "is_flag" not in amortized.colnames
    both = fit & np.asarray(amortized["fit"], bool)
    assert np.sum(np.abs(filled(t["logmstar_p50"]) - filled(amortized["logmstar_p50"]))[both]
                  > 1e-4) >= 30
    stream = _stream(setup, "masked", opts, "exact_stream")
    _decode_text(t, stream)
    flagged = fit & (np.asarray(t["is_flag"]) == 1)
    assert all(len(r) > 0 for r in np.asarray(t["is_reason"])[flagged])  # says why
    _assert_same(t, stream)


def test_exact_refuses_impossible_sizes(setup, tmp_path, capsys):
    out = tmp_path / "o.fits"
    rc = _main(["infer", "--model", setup["one"], "--catalog", setup["cat"], "--out", out,
                *BASE, "--exact", "--is-n-initial", 500, "--is-n-max", 100])
    assert rc == 2
    _one_line_error(capsys, "--is-n-max")
    assert list(tmp_path.iterdir()) == []
    rc = _main(["infer", "--model", setup["one"], "--catalog", setup["cat"], "--out", out,
                *BASE, "--exact", "--is-adapt", -1])
    assert rc == 2
    _one_line_error(capsys, "--is-adapt")
    assert list(tmp_path.iterdir()) == []


def test_refine_replaces_flagged_draws_by_mcmc_and_stream_equals_plain(setup, tmp_path, capsys):
    """``--exact --refine`` on the first 3 rows: every galaxy the importance weights flag is
    rerun by MCMC from its importance draws (refined = 1, R-hat and ESS recorded, is_flag = 0
    exactly when it converged), the others keep their draws; --stream gives the same table;
    --refine without --exact is refused."""
    cat = tmp_path / "three.fits"
    Table.read(setup["cat"])[:3].write(cat)
    common = ["--model", setup["masked"], "--catalog", cat, *BASE, *EXACT]
    ref = [*common, "--refine", "--refine-steps", 20]
    out_is, out_ref = tmp_path / "is.fits", tmp_path / "ref.fits"
    assert _main(["infer", *common, "--out", out_is]) == 0
    assert _main(["infer", *ref, "--out", out_ref]) == 0
    a, b = Table.read(out_is), Table.read(out_ref)
    was_flagged = np.asarray(a["is_flag"]) == 1
    assert was_flagged.any()
    refined = np.asarray(b["refined"]) == 1
    assert np.array_equal(refined, was_flagged & np.asarray(a["fit"], bool))
    rhat, ess = filled(b["refine_rhat"]), filled(b["refine_ess"])
    assert np.isfinite(rhat[refined]).all() and np.isnan(rhat[~refined]).all()
    conv = (rhat < 1.05) & (ess >= 200)
    assert np.array_equal(np.asarray(b["is_flag"])[refined], (~conv[refined]).astype(int))
    lm_a, lm_b = filled(a["logmstar_p50"]), filled(b["logmstar_p50"])
    np.testing.assert_array_equal(lm_a[~refined], lm_b[~refined])  # NaN where not fit
    assert np.all(lm_a[refined] != lm_b[refined])
    h5 = tmp_path / "ref.h5"
    assert _main(["infer", *ref, "--stream", "--chunk-rows", 2, "--quiet", "--out", h5]) == 0
    st = ST.read_inference(h5)[0]
    _decode_text(b, st)
    _assert_same(b, st)
    capsys.readouterr()
    assert _main(["infer", "--model", setup["masked"], "--catalog", cat, *BASE, "--refine",
                  "--out", tmp_path / "x.fits"]) == 2
    _one_line_error(capsys, "--exact")
