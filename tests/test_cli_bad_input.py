"""The command line's shared configuration handling (`--config FILE.toml`, the recorded
configuration of every run, `--dump-config`) and its answers to bad input (exit code 2, one
clear line on stderr; flagged catalog rows counted and never fit).

Tiny sizes throughout: a 1-band model, 64-row simulation blocks, an untrained 1-block flow.
"""
from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
from astropy.table import Table

from sedflow_jax.io import catalog as C
from sedflow_jax import cli
from sedflow_jax.cli import config as cli_config
from test_parallel_cli import N_GOOD, N_SAMPLES, assert_tables_match, filled, good_catalog, \
    save_tiny_posterior

SIM = ["--n", "256", "--seed", "3", "--filters", "sdss_r", "--block", "64", "--chunk", "128",
       "--quiet"]
INFER = ["--n-samples", str(N_SAMPLES), "--n-derived", "0", "--max-rounds", "1", "--seed", "2"]


def _main(argv):
    return cli.main([str(v) for v in argv])


def _shards(folder):
    m = json.loads((folder / "manifest.json").read_text())
    return m["config_sha256"], [e["sha256"] for e in m["shards"]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_bad_input")
    return d, save_tiny_posterior(d / "model")


# ---------------------------------------------------------------------------------------------
# configuration files
# ---------------------------------------------------------------------------------------------
def test_simulate_from_toml_equals_flags_and_record_reproduces(tmp_path, capsys):
    a, b, c = tmp_path / "flags", tmp_path / "toml", tmp_path / "again"
    assert _main(["simulate", *SIM, "--out", a]) == 0
    cfg = tmp_path / "sim.toml"
    # dashes or underscores; a [simulate] table overrides the top-level keys
    cfg.write_text('n = 999\nseed = 3\nfilters = ["sdss_r"]\nblock = 64\nchunk = 128\n'
                   'quiet = true\n[simulate]\nn = 256\n[train]\nlr = 0.1\n')
    assert _main(["simulate", "--config", cfg, "--out", b]) == 0
    assert _shards(a) == _shards(b)  # same configuration, byte-identical shards
    # every option and the version are recorded; the record reproduces the run
    rec = tomllib.loads((b / "config.toml").read_text())
    assert rec["command"] == "simulate" and rec["sedflow_jax_version"]
    assert rec["n"] == 256 and rec["block"] == 64 and rec["out"] == str(b)
    assert rec["zmax"] == 0.2 and rec["prior"] == "provabgs" and rec["overwrite"] is False
    assert _main(["simulate", "--config", b / "config.toml", "--out", c]) == 0
    assert _shards(c) == _shards(a)
    assert _main(["simulate", "--config", b, "--out", c]) == 0  # a folder: its record; resumes
    capsys.readouterr()
    # flags override the file
    assert _main(["simulate", "--config", cfg, "--out", tmp_path / "s4", "--seed", "4",
                  "--dump-config"]) == 0
    dumped = tomllib.loads(capsys.readouterr().out)
    assert dumped["seed"] == 4 and dumped["n"] == 256 and dumped["include-flux"] is False
    assert not (tmp_path / "s4").exists()  # --dump-config runs nothing
    # the dump is itself a config file
    (tmp_path / "d.toml").write_text("\n".join(f"{k} = {cli_config.toml_value(v)}"
                                               for k, v in dumped.items()))
    assert _main(["simulate", "--config", tmp_path / "d.toml", "--dump-config"]) == 0
    assert tomllib.loads(capsys.readouterr().out) == dumped


@pytest.mark.parametrize("text,msg", [
    ("n = 256\nbogus = 1\n", "unknown option(s) ['bogus']"),
    ("n = 'many'\n", "invalid value 'many'"),
    ("n = [1, 2]\n", "takes one value"),
    ("quiet = 'yes'\n", "must be true or false"),
    ("prior = 'flat'\n", "is not one of"),
    ("command = 'train'\n", "records a `train` run"),
    ("n = 1\nn-", "invalid TOML"),
    ("include-flux = true\ninclude_flux = false\n", "are the same option"),
])
def test_bad_config_files(tmp_path, capsys, text, msg):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    assert _main(["simulate", "--config", cfg, "--out", tmp_path / "o"]) == 2
    err = capsys.readouterr().err
    assert msg in err and "sedflow-jax simulate: error" in err
    assert not (tmp_path / "o").exists()


def test_config_missing_file_and_required_options(tmp_path, capsys):
    assert _main(["simulate", "--config", tmp_path / "nope.toml"]) == 2
    assert "no such file" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text("seed = 1\n")
    with pytest.raises(SystemExit):  # --n and --out still required (argparse's usage error)
        cli.main(["simulate", "--config", str(cfg)])
    assert "required" in capsys.readouterr().err


def test_infer_table_record_reproduces(setup, tmp_path, capsys):
    d, model = setup
    cat = tmp_path / "cat.ecsv"
    good_catalog().write(cat)
    out = tmp_path / "a.fits"
    assert _main(["infer", "--model", model, "--catalog", cat, "--out", out, *INFER]) == 0
    t = Table.read(out)
    rec = json.loads(t.meta[cli_config.TABLE_CONFIG_KEY])
    assert rec["command"] == "infer" and rec["n-samples"] == N_SAMPLES and rec["seed"] == 2
    assert rec["sedflow_jax_version"] == t.meta["sedflow_jax_version"]
    # rerun from the table itself (its recorded configuration), to another file
    assert _main(["infer", "--config", out, "--out", tmp_path / "b.fits"]) == 0
    assert_tables_match(Table.read(tmp_path / "b.fits"), t, rtol=0)
    assert _main(["infer", "--config", out, "--out", tmp_path / "c.fits", "--seed", 3]) == 0
    c = Table.read(tmp_path / "c.fits")
    assert not np.allclose(filled(c["logmstar_p50"]), filled(t["logmstar_p50"]))
    capsys.readouterr()
    assert _main(["simulate", "--config", out, "--out", tmp_path / "s"]) == 2
    assert "records a `infer` run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# catalogs: missing columns, bad rows
# ---------------------------------------------------------------------------------------------
def _bad_catalog():
    """N_GOOD usable rows followed by one row per problem."""
    from astropy.table import vstack

    good = good_catalog()
    bad = good_catalog(7, seed=9)
    bad["objid"] = np.arange(900, 907)
    bad["flux_sdss_r"][0] = np.nan   # non-finite flux
    bad["flux_sdss_r"][1] = -3.0     # negative flux
    bad["flux_sdss_r"][2] = 0.0      # zero flux
    bad["flux_ivar_sdss_r"][3] = 0.0   # ivar <= 0
    bad["flux_ivar_sdss_r"][4] = -1.0
    bad["z"][5] = 0.5                # beyond the training range (0, 0.2]
    bad["z"][6] = 0.0                # z = 0 is outside (zmin, zmax] too
    return vstack([good, bad])


EXPECT_FLAGS = [C.FLAG_NONFINITE, C.FLAG_NONPOSITIVE_FLUX, C.FLAG_NONPOSITIVE_FLUX,
                C.FLAG_BAD_IVAR, C.FLAG_BAD_IVAR, C.FLAG_Z_RANGE, C.FLAG_Z_RANGE]


def _check_flagged(t):
    flag = np.asarray(t["flag"])
    assert np.array_equal(flag[:N_GOOD], np.zeros(N_GOOD))
    assert [int(f) for f in flag[N_GOOD:]] == EXPECT_FLAGS
    bad = flag != 0
    assert np.isnan(filled(t["logmstar_p50"])[bad]).all()  # never fit
    assert np.isfinite(filled(t["logmstar_p50"])[~bad]).all()
    acc = filled(t["acceptance"])[bad]
    assert not (acc > 0).any()  # NaN (infer) or 0 (infer --stream): nothing drawn
    assert (np.asarray(t["n_accepted"])[bad] == 0).all()
    ood = np.asarray(t["ood"])
    assert ood[N_GOOD + 5] and ood[N_GOOD + 6]  # redshift outside: out of support
    m = t.meta
    got = {k.lower(): v for k, v in m.items()}
    assert got["n_rows"] == N_GOOD + 7 and got["n_usable"] == N_GOOD
    assert got["n_flag_nonfinite"] == 1 and got["n_flag_flux_le0"] == 2
    assert got["n_flag_ivar_le0"] == 2 and got["n_flag_z_range"] == 2


def test_flagged_rows_counted_never_fit(setup, tmp_path, capsys):
    import h5py

    d, model = setup
    cat = tmp_path / "bad.fits"
    _bad_catalog().write(cat)
    out = tmp_path / "post.fits"
    assert _main(["infer", "--model", model, "--catalog", cat, "--out", out, *INFER,
                  "--samples", tmp_path / "s.h5", "--keep-columns", "objid"]) == 0
    o = capsys.readouterr().out
    assert f"{N_GOOD + 7} rows: {N_GOOD} usable" in o
    assert "non-finite value 1" in o and "flux <= 0 2" in o and "ivar <= 0 2" in o
    assert "redshift out of range 2" in o
    t = Table.read(out)
    assert np.array_equal(t["objid"], _bad_catalog()["objid"])
    _check_flagged(t)
    with h5py.File(tmp_path / "s.h5") as f:  # samples only for the usable rows
        assert np.array_equal(f["rows"][...], np.arange(N_GOOD))
        assert f["theta"].shape == (N_GOOD, N_SAMPLES, 12)
    # the same flags and counts when streaming
    h5 = tmp_path / "post.h5"
    assert _main(["infer", "--model", model, "--catalog", cat, "--out", h5, *INFER,
                  "--stream", "--chunk-rows", 20, "--quiet", "--keep-columns", "objid"]) == 0
    assert "flagged: non-finite value 1, flux <= 0 2, ivar <= 0 2" in capsys.readouterr().out
    assert _main(["finalize", h5, "--out", tmp_path / "stream.ecsv"]) == 0
    ts = Table.read(tmp_path / "stream.ecsv")
    _check_flagged(ts)
    np.testing.assert_array_equal(np.asarray(ts["flag"]), np.asarray(t["flag"]))


def test_catalog_without_usable_rows(setup, tmp_path, capsys):
    d, model = setup
    t = _bad_catalog()[N_GOOD:]
    t.write(tmp_path / "c.fits")
    out = tmp_path / "o.fits"
    assert _main(["infer", "--model", model, "--catalog", tmp_path / "c.fits", "--out", out,
                  *INFER]) == 2
    err = capsys.readouterr().err
    assert "no usable row of 7" in err and "flux <= 0 2" in err
    assert not out.exists()


def test_mcmc_every_galaxy_failed_exits_1(tmp_path, capsys):
    """`mcmc` on rows that all fail (no usable band) exits 1, says how many failed and where
    the errors are; the summary records each failure (nothing is sampled)."""
    t = good_catalog(3)
    t["flux_sdss_r"] = np.nan
    t.write(tmp_path / "c.fits")
    out = tmp_path / "mc"
    rc = _main(["mcmc", "--catalog", tmp_path / "c.fits", "--rows", "0:3", "--filters",
                "sdss_r", "--z-max", "0.2", "--chains", "2", "--warmup", "5", "--samples", "5",
                "--cpu-devices", "1", "--compile-cache", "none", "--out", out])
    assert rc == 1
    cap = capsys.readouterr()
    assert "0/3 galaxies fit with nuts; 3 failed: see" in cap.out and "summary.ecsv" in cap.out
    last = cap.err.splitlines()[-1]  # after the progress bar
    assert last.startswith("sedflow-jax mcmc:") and "every galaxy failed" in last
    summ = Table.read(out / "summary.ecsv")
    assert list(summ["status"]) == ["failed"] * 3
    assert all("no usable band" in e for e in summ["error"])
    assert not list(out.glob("galaxy_*.npz"))


@pytest.mark.parametrize("drop,extra,msg", [
    ("flux_ivar_sdss_r", [], "missing columns ['flux_ivar_sdss_r']"),
    ("flux_sdss_r", [], "missing columns ['flux_sdss_r']"),
    (None, ["--z-column", "redshift"], "'redshift'"),
    (None, ["--flux-fmt", "FLUX_{band}"], "missing columns ['FLUX_sdss_r']"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_catalog_missing_mapped_column(setup, tmp_path, capsys, drop, extra, msg, stream):
    d, model = setup
    t = good_catalog(5)
    if drop:
        t.remove_column(drop)
    t.write(tmp_path / "c.fits")
    out = tmp_path / ("o.h5" if stream else "o.fits")
    argv = ["infer", "--model", model, "--catalog", tmp_path / "c.fits", "--out", out, *INFER,
            *extra, *(["--stream", "--quiet"] if stream else [])]
    assert _main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.startswith("sedflow-jax infer: error")
    assert not out.exists()


def test_column_mapping_options(setup, tmp_path):
    d, model = setup
    t = good_catalog()
    t.rename_columns(["flux_sdss_r", "flux_ivar_sdss_r", "z"], ["F_sdss_r", "IVAR_sdss_r", "zspec"])
    t.write(tmp_path / "c.fits")
    good_catalog().write(tmp_path / "ref.fits")
    kw = [*INFER, "--keep-columns", "objid"]
    assert _main(["infer", "--model", model, "--catalog", tmp_path / "ref.fits",
                  "--out", tmp_path / "ref_out.fits", *kw]) == 0
    assert _main(["infer", "--model", model, "--catalog", tmp_path / "c.fits", "--out",
                  tmp_path / "o.fits", "--flux-fmt", "F_{band}", "--ivar-fmt", "IVAR_{band}",
                  "--z-column", "zspec", *kw]) == 0
    assert_tables_match(Table.read(tmp_path / "o.fits"), Table.read(tmp_path / "ref_out.fits"),
                        rtol=0)


# ---------------------------------------------------------------------------------------------
# existing outputs: refused unless --overwrite (checked before any work)
# ---------------------------------------------------------------------------------------------
def _existing(kind, tmp_path):
    if kind == "file":
        p = tmp_path / "exists.fits"
        p.write_text("keep me")
    else:
        p = tmp_path / "exists"
        p.mkdir()
        (p / "keep.txt").write_text("keep me")
    return p


@pytest.mark.parametrize("argv,kind,msg", [
    (["example", "--out", "{p}"], "dir", "not empty"),
    (["photometry", "--theta", *["0.25"] * 12, "--z", "0.1", "--output", "{p}"], "file",
     "exists"),
    (["simulate", "--n", "10", "--out", "{p}"], "dir", "does not hold a sedflow-jax"),
    (["simulate", "--n", "10", "--out", "{p}"], "file", "not a folder"),
    (["train", "--data", "nowhere", "--out", "{p}"], "dir", "not empty"),
    (["infer", "--model", "nowhere", "--catalog", "c.fits", "--out", "{p}"], "file", "exists"),
    (["infer", "--model", "nowhere", "--catalog", "c.fits", "--out", "{p}.new",
      "--samples", "{p}"], "file", "--samples file"),
    (["infer", "--stream", "--model", "nowhere", "--catalog", "{cat}", "--out", "{p}.h5"],
     "h5", "--resume"),
    (["validate", "--model", "nowhere", "--out", "{p}"], "dir", "not empty"),
    (["mcmc", "--catalog", "c.fits", "--out", "{p}"], "dir", "not empty"),
    (["demo", "--out", "{p}"], "dir", "not empty"),
    (["finalize", "nowhere.h5", "--out", "{p}"], "file", "exists"),
])
def test_existing_output_refused(tmp_path, capsys, argv, kind, msg):
    cat = tmp_path / "cat.fits"
    cat.write_text("x")
    if kind == "h5":
        p = tmp_path / "exists"
        (tmp_path / "exists.h5").write_text("keep me")
    else:
        p = _existing(kind, tmp_path)
    argv = [a.format(p=p, cat=cat) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and ("--overwrite" in err or "folder" in err), err
    for f in tmp_path.rglob("*"):
        if f.is_file() and f.name not in ("cat.fits",):
            assert f.read_text() == "keep me", f  # nothing touched
    assert not (tmp_path / "exists.new").exists()


def test_overwrite_replaces(tmp_path, capsys):
    p = tmp_path / "phot.ecsv"
    p.write_text("old")
    theta = ["10", "1", "0", "0", "0", "0", "1", "1e-3", "1e-3", "0", "0", "0"]
    assert cli.main(["photometry", "--theta", *theta, "--z", "0.1", "--output", str(p),
                     "--overwrite"]) == 0
    t = Table.read(p)
    assert len(t) == 1 and json.loads(t.meta[cli_config.TABLE_CONFIG_KEY])["overwrite"] is True


def test_catalog_units_magnitudes_and_jansky():
    """Fluxes given as AB magnitudes (+ errors) or in uJy read as the same nanomaggies; a
    non-flux unit is refused."""
    import astropy.units as u
    from astropy.table import Table

    from sedflow_jax.io import catalog as C

    bands = ("g", "r")
    f = np.array([[10.0, 25.0], [3.0, 0.5]])  # nanomaggies
    sig = np.array([[0.5, 1.0], [0.2, 0.1]])
    ref = Table({"flux_g": f[:, 0], "flux_ivar_g": 1 / sig[:, 0] ** 2,
                 "flux_r": f[:, 1], "flux_ivar_r": 1 / sig[:, 1] ** 2, "z": [0.1, 0.05]})
    p0 = C.read_photometry(ref, bands)
    mag = Table({"z": [0.1, 0.05]})
    jy = Table({"z": [0.1, 0.05]})
    for i, b in enumerate(bands):
        mag[f"m_{b}"] = (22.5 - 2.5 * np.log10(f[:, i])) * u.mag
        mag[f"e_{b}"] = (2.5 / np.log(10) * sig[:, i] / f[:, i]) * u.mag
        jy[f"F_{b}"] = f[:, i] * 3.631 * u.uJy
        jy[f"I_{b}"] = 1 / (sig[:, i] * 3.631) ** 2 * u.uJy ** -2
    mag["m_r"][1], mag["e_r"][1] = 99.0, 99.0  # "not measured"
    p1 = C.read_photometry(mag, bands, flux_fmt="m_{band}", ivar_fmt="e_{band}", mask_bands=True)
    np.testing.assert_allclose(p1.flux[0], p0.flux[0], rtol=1e-10)
    np.testing.assert_allclose(p1.sigma[0], p0.sigma[0], rtol=1e-10)
    assert not p1.mask[1, 1] and p1.band_flag[1, 1] & C.BAND_SENTINEL
    p2 = C.read_photometry(jy, bands, flux_fmt="F_{band}", ivar_fmt="I_{band}")
    np.testing.assert_allclose(p2.flux, p0.flux, rtol=1e-10)
    np.testing.assert_allclose(p2.sigma, p0.sigma, rtol=1e-10)
    bad = ref.copy()
    bad["flux_g"].unit = u.erg / u.s / u.cm**2 / u.AA
    with pytest.raises(C.CatalogError, match="per unit frequency|flux density"):
        C.read_photometry(bad, bands)
