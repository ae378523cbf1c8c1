"""Use without training: `sedflow-jax infer` without --model picks the shipped posterior that
matches the catalog's bands (and says which), sedflow_jax.load_posterior by name / path /
bands; `train` defaults to the best-measured setup (logit + band dropout).

Tiny: the "shipped" models are untrained 1-block flows whose draws depend on the photometry
(tests/test_parallel_cli.tiny_posterior) in a temporary registry ($SEDFLOW_JAX_POSTERIORS), so
these tests pass whether or not the real models are installed.
"""
from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
from astropy.table import Table

import sedflow_jax as sj
from sedflow_jax import cli
from sedflow_jax.cli import commands as CMD
from sedflow_jax.io import catalog as C
from sedflow_jax.sbi import defaults as D
from sedflow_jax.sbi import streaming as ST
from sedflow_jax.sim import store
from test_parallel_cli import filled, save_tiny_posterior

N = 16
SHORT = ("FUV", "NUV", "u", "g", "r", "i", "z")
BASE = ["--n-samples", 16, "--n-derived", 0, "--max-rounds", 1, "--seed", 5]


def _main(argv):
    return cli.main([str(v) for v in argv])


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("posteriors")
    save_tiny_posterior(root / "sdss_ugriz", bands=C.SDSS_BANDS, mask_aware=True, seed=1)
    save_tiny_posterior(root / "galex_sdss", bands=C.NSA_BANDS, mask_aware=True, seed=2)
    (root / "not_a_model").mkdir()
    return root


@pytest.fixture
def shipped(registry, monkeypatch):
    monkeypatch.setenv(D.ENV_VAR, str(registry))
    return registry


def photometry(seed=0):
    """(N, 7) fluxes in NSA order with magnitudes 16-20 and 5 % errors, and z."""
    rng = np.random.default_rng(seed)
    f = 10 ** rng.uniform(1.0, 2.6, (N, 7))
    return f, 1.0 / (0.05 * f) ** 2, rng.uniform(0.02, 0.18, N)


def test_load_posterior_by_name_path_and_bands(shipped):
    assert D.available_posteriors() == {"galex_sdss": C.NSA_BANDS, "sdss_ugriz": C.SDSS_BANDS}
    assert D.default_posterior(["u", "g", "r", "i", "z"]) == "sdss_ugriz"
    assert D.default_posterior(C.NSA_BANDS) == "galex_sdss"
    assert D.default_posterior(["FUV", "u", "g", "r", "i", "z"]) == "sdss_ugriz"  # no NUV
    assert sj.load_posterior("galex_sdss").bands == C.NSA_BANDS
    assert sj.load_posterior(bands=SHORT).bands == C.NSA_BANDS
    assert sj.load_posterior(str(shipped / "sdss_ugriz")).bands == C.SDSS_BANDS
    for call in (lambda: sj.load_posterior("nope"), lambda: sj.load_posterior(bands=["g", "r"]),
                 lambda: sj.load_posterior()):
        with pytest.raises(D.PosteriorNotFound) as exc:
            call()
        assert "sdss_ugriz (sdss_u" in str(exc.value) and "\n" not in str(exc.value)


def test_registry_argument_and_empty_registry(registry, tmp_path):
    assert sj.load_posterior("sdss_ugriz", registry=registry).bands == C.SDSS_BANDS
    with pytest.raises(D.PosteriorNotFound, match="none installed"):
        D.default_posterior(C.SDSS_BANDS, registry=tmp_path)


def test_infer_without_model_on_a_per_band_ugriz_catalog(shipped, tmp_path, capsys):
    f, iv, z = photometry()
    short, ref = Table(), Table()
    for j, s in enumerate(SHORT[2:], start=2):
        short[f"flux_{s}"], short[f"flux_ivar_{s}"] = f[:, j], iv[:, j]
        ref[f"flux_{C.NSA_BANDS[j]}"], ref[f"flux_ivar_{C.NSA_BANDS[j]}"] = f[:, j], iv[:, j]
    short["z"] = ref["z"] = z
    short.write(tmp_path / "cat.fits")
    ref.write(tmp_path / "ref.fits")
    out = tmp_path / "post.fits"
    assert _main(["infer", "--catalog", tmp_path / "cat.fits", "--out", out, *BASE]) == 0
    printed = capsys.readouterr().out
    lines = [ln for ln in printed.splitlines() if ln.startswith("model:")]
    assert len(lines) == 1 and "sdss_ugriz" in lines[0], printed
    assert "flux_u/flux_ivar_u" in printed  # the columns used
    t = Table.read(out)
    assert np.all(np.asarray(t["flag"]) == 0) and t.meta["MODEL"] == "sdss_ugriz"
    assert json.loads(t.meta["SJCONFIG"])["model"] == "sdss_ugriz"  # reruns with it
    # the same numbers as the named model on the internal layout
    out2 = tmp_path / "ref_post.fits"
    assert _main(["infer", "--model", "sdss_ugriz", "--catalog", tmp_path / "ref.fits",
                  "--out", out2, *BASE]) == 0
    np.testing.assert_array_equal(filled(t["logmstar_p50"]),
                                  filled(Table.read(out2)["logmstar_p50"]))


def nsa_catalog():
    """NSA layout: NMGY / NMGY_IVAR (FUV NUV u g r i z), Z, EXTINCTION; GALEX missing in some
    rows (NaN in rows 0-2, flux = ivar = 0 in rows 3-5)."""
    f, iv, z = photometry(1)
    f[:3, :2] = np.nan
    iv[:3, :2] = np.nan
    f[3:6, :2] = 0.0
    iv[3:6, :2] = 0.0
    return Table({"NSAID": np.arange(N), "NMGY": f, "NMGY_IVAR": iv, "Z": z,
                  "EXTINCTION": np.full((N, 7), 0.2)}), f


def test_infer_without_model_on_an_nsa_catalog_with_galex_gaps(shipped, tmp_path, capsys):
    t, f = nsa_catalog()
    t.write(tmp_path / "nsa.fits")
    out = tmp_path / "nsa_post.fits"
    argv = ["infer", "--catalog", tmp_path / "nsa.fits", *BASE, "--keep-columns", "NSAID"]
    assert _main([*argv, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "model: galex_sdss" in printed and "NMGY" in printed, printed
    r = Table.read(out)
    assert np.all(np.asarray(r["flag"]) == 0)  # every row fit: missing GALEX bands masked
    used = np.asarray(r["n_bands_used"])
    assert np.all(used[:6] == 5) and np.all(used[6:] == 7)
    assert np.all(np.asarray(r["band_flag_galex_fuv"])[:3] & C.BAND_NONFINITE)
    assert np.all(np.asarray(r["band_flag_galex_nuv"])[3:6] & C.BAND_NOT_OBSERVED)
    # the same run streamed (chunked FITS reader) gives the same table
    h5 = tmp_path / "nsa_post.h5"
    assert _main([*argv, "--out", h5, "--stream", "--chunk-rows", N, "--quiet"]) == 0
    assert "model: galex_sdss" in capsys.readouterr().out
    s = ST.read_inference(h5)[0]
    for c in ("logmstar_p50", "flag", "n_bands_used"):
        np.testing.assert_allclose(filled(s[c]), filled(r[c]), rtol=1e-6, err_msg=c)
    # the 5-band model reads its 5 of the 7 elements: the values of the same elements given
    five = tmp_path / "five.fits"
    assert _main([*argv, "--model", "sdss_ugriz", "--out", five]) == 0
    # a vector column of another name, its elements named with --vector-bands (reversed here)
    rev = Table({"PHOT": f[:, ::-1], "PHOT_IVAR": np.asarray(t["NMGY_IVAR"])[:, ::-1],
                 "zz": t["Z"], "NSAID": t["NSAID"]})
    rev.write(tmp_path / "rev.fits")
    assert _main(["infer", "--catalog", tmp_path / "rev.fits", *BASE, "--model", "sdss_ugriz",
                  "--vector-flux", "PHOT", "--vector-ivar", "PHOT_IVAR", "--vector-bands",
                  ",".join(SHORT[::-1]), "--z-column", "zz", "--out",
                  tmp_path / "rev_post.fits"]) == 0
    np.testing.assert_array_equal(filled(Table.read(five)["logmstar_p50"]),
                                  filled(Table.read(tmp_path / "rev_post.fits")["logmstar_p50"]))


def test_infer_adds_the_calibration_error_by_default(shipped, tmp_path, capsys):
    """`infer` adds SDSS's calibration error (2 % u, 1 % griz; Padmanabhan et al. 2008) to the
    catalog's sigma in quadrature unless --calibration-error none: the default run on a catalog
    with 0.2 % statistical errors equals a --calibration-error none run on the same catalog with
    the calibration folded into its ivar by hand, and differs from the errors as given."""
    f, _, z = photometry(3)
    f = f[:, 2:]
    iv = 1.0 / (0.002 * f) ** 2
    frac = np.array([0.02, 0.01, 0.01, 0.01, 0.01])
    cats = {"raw": iv, "folded": 1.0 / (1.0 / iv + (frac * f) ** 2)}
    for name, ivar in cats.items():
        t = Table({**{f"flux_{s}": f[:, j] for j, s in enumerate(SHORT[2:])},
                   **{f"flux_ivar_{s}": ivar[:, j] for j, s in enumerate(SHORT[2:])}, "z": z})
        t.write(tmp_path / f"{name}.fits")
    run = {}
    for name, flags in [("auto", []), ("none", ["--calibration-error", "none"]),
                        ("folded", ["--calibration-error", "none"])]:
        cat = tmp_path / ("folded.fits" if name == "folded" else "raw.fits")
        out = tmp_path / f"post_{name}.fits"
        assert _main(["infer", "--catalog", cat, "--out", out, *BASE, *flags]) == 0
        printed = capsys.readouterr().out
        assert ("calibration error added in quadrature" in printed) == (name == "auto"), printed
        run[name] = filled(Table.read(out)["logmstar_p50"])
    np.testing.assert_allclose(run["auto"], run["folded"], rtol=1e-6)
    assert np.all(run["auto"] != run["none"])  # the flow sees the errors
    # a bad value: one line, exit 2, no output
    for bad in ("-0.01", "q=0.1"):
        out = tmp_path / "bad.fits"
        assert _main(["infer", "--catalog", tmp_path / "raw.fits", "--out", out, *BASE,
                      "--calibration-error", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "calibration_error" in err and not out.exists(), err


@pytest.mark.parametrize("stream", [False, True])
def test_infer_without_model_no_match_is_one_line(shipped, tmp_path, capsys, stream):
    f, iv, z = photometry()
    t = Table({"flux_g": f[:, 3], "flux_ivar_g": iv[:, 3], "flux_r": f[:, 4],
               "flux_ivar_r": iv[:, 4], "z": z})
    t.write(tmp_path / "gr.fits")
    out = tmp_path / ("o.h5" if stream else "o.fits")
    argv = ["infer", "--catalog", tmp_path / "gr.fits", "--out", out, *BASE]
    assert _main([*argv, *(["--stream", "--quiet"] if stream else [])]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert "\n" not in err and err.startswith("sedflow-jax infer: error"), err
    assert "sdss_g" in err and "sdss_ugriz" in err and "galex_sdss" in err
    assert not out.exists() and "model:" not in cap.out


def test_infer_without_model_none_installed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path / "empty"))
    f, iv, z = photometry()
    t = Table({f"flux_{s}": f[:, j] for j, s in enumerate(SHORT)})
    for j, s in enumerate(SHORT):
        t[f"flux_ivar_{s}"] = iv[:, j]
    t["z"] = z
    t.write(tmp_path / "c.fits")
    assert _main(["infer", "--catalog", tmp_path / "c.fits", "--out", tmp_path / "o.fits",
                  *BASE]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "none installed" in err


# ---------------------------------------------------------------------------------------------
# train defaults
# ---------------------------------------------------------------------------------------------
class Stop(Exception):
    pass


def _fake_training_set(path, n_bands):
    path.mkdir()
    x = [f"mag_{i}" for i in range(n_bands)] + [f"sigma_{i}" for i in range(n_bands)] + ["z"]
    (path / store.MANIFEST_NAME).write_text(json.dumps(
        {"format": store.FORMAT, "format_version": 1, "x_names": x}))
    return path


@pytest.mark.parametrize("flags,theta_space,dropout,recorded", [
    ([], "logit", 0.5, 0.5),
    (["--theta-space", "box", "--band-dropout", "0"], "box", None, 0.0),
    (["--band-dropout", "0.3", "--min-bands", "3"], "logit", 0.3, 0.3),
])
def test_train_defaults_logit_and_band_dropout(tmp_path, monkeypatch, flags, theta_space,
                                               dropout, recorded):
    seen = {}

    def fake(data, out, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(CMD, "train_posterior", fake)
    data = _fake_training_set(tmp_path / "data", 5)
    with pytest.raises(Stop):
        _main(["train", "--data", data, "--out", tmp_path / "m", "--quiet", *flags])
    assert seen["theta_space"] == theta_space and seen["band_dropout"] == dropout
    rec = tomllib.loads((tmp_path / "m" / "config.toml").read_text())
    assert rec["theta-space"] == theta_space and rec["band-dropout"] == recorded
    assert rec["min-bands"] == (3 if "--min-bands" in flags else 2)


def test_train_default_dropout_off_for_too_few_bands(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake(data, out, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(CMD, "train_posterior", fake)
    data = _fake_training_set(tmp_path / "data", 2)
    with pytest.raises(Stop):
        _main(["train", "--data", data, "--out", tmp_path / "m", "--quiet"])
    assert seen["band_dropout"] is None and seen["theta_space"] == "logit"
    assert "band dropout off" in capsys.readouterr().out
