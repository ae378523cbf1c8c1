"""The `sedflow-jax` command line (called in-process through cli.main)."""
import json

import numpy as np
import pytest
from astropy.table import Table

from sedflow_jax import cli
from sedflow_jax.cli import config as cli_config


def test_example_writes_outputs(tmp_path, capsys):
    out = tmp_path / "ex"
    assert cli.main(["example", "--out", str(out)]) == 0
    for name in ("example_sed.png", "example_sed.ecsv", "example_galaxy.json"):
        assert (out / name).stat().st_size > 0
    info = json.loads((out / "example_galaxy.json").read_text())
    # recompute a magnitude from the saved nanomaggies: consistent file contents
    f = info["nanomaggies"]["sdss_r"]
    assert abs(info["ab_mag"]["sdss_r"] - (22.5 - 2.5 * np.log10(f))) < 1e-6
    assert info["sedflow_jax_version"]
    # refuses to overwrite a non-empty folder
    assert cli.main(["example", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_photometry_table_round_trip(tmp_path):
    import sedflow_jax as sj

    names = sj.PARAM_NAMES
    theta = np.array([[10, .25, .25, .25, .25, .1, 2, 1e-3, 1e-3, .5, .5, -.3],
                      [11, 1, 0, 0, 0, 0, 5, 2e-3, 1e-3, 0, 1, 0]])
    t = Table({n: theta[:, i] for i, n in enumerate(names)})
    t["z"] = [0.05, 0.15]
    t.write(tmp_path / "in.ecsv")
    assert cli.main(["photometry", "--input", str(tmp_path / "in.ecsv"),
                     "--output", str(tmp_path / "out.fits")]) == 0
    o = Table.read(tmp_path / "out.fits")
    expect = np.asarray(sj.load_model().photometry(theta, np.array([0.05, 0.15])))
    np.testing.assert_allclose(o["flux_sdss_g"], expect[:, 1], rtol=1e-6)


@pytest.mark.parametrize("argv,msg", [
    (["photometry", "--theta", *["0.1"] * 12, "--z", "0.1"], "sum to 1"),
    (["photometry", "--theta", "10", "1", "0", "0", "0", "0", "1", "1e-3", "1e-3", "0", "0", "0",
      "--z", "-1"], "redshift"),
    (["photometry", "--theta", "10", "1", "0", "0", "0", "0", "1", "1e-3", "1e-3", "0", "0", "0",
      "--z", "0.1", "--filters", "nope"], "unknown filter"),
    (["photometry"], "--theta"),
])
def test_bad_input_exit_code(argv, msg, capsys):
    assert cli.main(argv) == 2
    assert msg in capsys.readouterr().err


def test_mcmc_command_fits_catalog_rows(tmp_path, capsys):
    """`sedflow-jax mcmc` end to end on two mock galaxies (tiny NUTS runs: the files and the
    summary, not the convergence, are checked here; tests/test_mcmc.py checks the samplers).
    The NUTS settings (20 + 20 draws, tree depth 4, SDSS model to z = 0.2) are those of
    test_examples.py::test_fit_single_galaxy and the tiny demo: one compiled sampler for all."""
    import sedflow_jax as sj

    cat = sj.mock_catalog(3, 2)
    cat["flux_sdss_g"][0] = np.nan  # row 0: one band unusable -> fit with 4 bands
    cat.write(tmp_path / "cat.fits")
    out = tmp_path / "mc"
    argv = ["mcmc", "--catalog", str(tmp_path / "cat.fits"), "--rows", "0:2", "--sampler",
            "nuts", "--chains", "2", "--warmup", "20", "--samples", "20", "--cpu-devices", "2",
            "--max-tree-depth", "4", "--compile-cache", str(tmp_path / "xla"), "--out", str(out)]
    import jax

    cache_before = jax.config.jax_compilation_cache_dir
    assert cli.main(argv) == 0, capsys.readouterr().err
    # a compilation cache JAX already has (the test session's) is kept, else ours is used
    assert jax.config.jax_compilation_cache_dir == (cache_before or str(tmp_path / "xla"))
    printed = capsys.readouterr().out
    assert "2/2 galaxies fit with nuts" in printed and "NUTS: 2 chains" in printed
    assert "calibration error added in quadrature (sdss_u 0.0217" in printed  # the default
    summ = Table.read(out / "summary.ecsv")
    assert list(summ["row"]) == [0, 1] and list(summ["status"]) == ["ok", "ok"]
    assert list(summ["n_bands"]) == [4, 5]
    from sedflow_jax.sim import prior as P
    from sedflow_jax.mcmc import load_result

    lo, hi = (np.asarray(a) for a in P.sampling_bounds(P.provabgs_prior()))
    for i, row in enumerate((0, 1)):
        r = load_result(out / f"galaxy_{row:06d}.npz")
        assert r.samples.shape == (2, 20, 11) and r.sampler == "nuts"
        # the summary's percentiles are those of the saved draws, all inside the prior box
        assert summ["logmstar_p50"][i] == pytest.approx(np.median(r.flat_theta[:, 0]), abs=1e-5)
        assert np.all((r.flat_samples >= lo - 1e-6) & (r.flat_samples <= hi + 1e-6))
        assert r.info["kernel"]["max_tree_depth"] == "4"
        assert r.info["mean_num_steps"] <= 15  # 2^4 - 1
    cfg = (out / cli_config.CONFIG_NAME).read_text()
    assert "cpu-devices = 2" in cfg or "cpu_devices = 2" in cfg, cfg
    # a NUTS-only option with an ensemble sampler is refused
    assert cli.main(argv[:6] + ["ess", "--max-tree-depth", "3", "--out", str(tmp_path / "e")]) == 2
    assert "NUTS option" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    assert cli.main(argv[:-2] + ["--calibration-error", "-1", "--out", str(tmp_path / "e")]) == 2
    assert "calibration_error must be finite" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    # some rows failed (row 2 is past the end; rows 0-1 resume): exit 0, the failures counted
    assert cli.main(argv[:4] + ["0:3"] + argv[5:] + ["--resume"]) == 0
    printed = capsys.readouterr().out
    assert "2/3 galaxies fit with nuts; 1 failed: see" in printed and "summary.ecsv" in printed
    assert list(Table.read(out / "summary.ecsv")["status"]) == ["ok", "ok", "failed"]


@pytest.mark.parametrize("flags,floor", [([], True), (["--no-calibration-floor"], False),
                                         (["--calibration-floor"], True)])
def test_simulate_calibration_floor_default_on_and_recorded(tmp_path, monkeypatch, capsys,
                                                            flags, floor):
    """`simulate` trains on the recommended calibration floor unless --no-calibration-floor
    (SEDflow's fitted noise as is); the choice is part of the recorded configuration."""
    import tomllib

    import sedflow_jax.demo  # noqa: F401  (modules that bind `simulate` by name at import:
    import sedflow_jax.io.mocks  # noqa: F401  imported here, they never see the fake below)
    from sedflow_jax.sim import simulate as S

    class Stop(Exception):
        pass

    seen = []

    def fake(seed, n, model, prior, noise=None, **kw):
        seen.append(noise)
        raise Stop

    monkeypatch.setattr(S, "simulate", fake)
    argv = ["simulate", "--n", "10", "--out", str(tmp_path / "s"), "--quiet", *flags]
    assert cli.main([*argv, "--dump-config"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["calibration-floor"] is floor
    with pytest.raises(Stop):
        cli.main(argv)
    if floor:
        assert seen[0].has_floor and tuple(seen[0].bands) == ("sdss_u", "sdss_g", "sdss_r",
                                                              "sdss_i", "sdss_z")
    else:
        assert seen[0] is None  # simulate's default: the fitted model without a floor


def test_help_answers_without_loading_jax():
    """`sedflow-jax --help` and argument errors answer at once: the parser imports no JAX (a
    command's module loads when it runs)."""
    import subprocess
    import sys

    code = ("import sys, importlib; importlib.import_module('sedflow_jax.cli.main'); "
            "from sedflow_jax.cli.parser import build_parser; build_parser(); "
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    r = subprocess.run([sys.executable, "-m", "sedflow_jax.cli", "infer", "--n-samples", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid int value" in r.stderr
