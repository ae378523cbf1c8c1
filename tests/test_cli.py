"""The `sedflow-jax` command line (called in-process through cli.main)."""
import json

import numpy as np
import pytest
from astropy.table import Table

from sedflow_jax import cli


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
