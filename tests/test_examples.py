"""The examples/ scripts run (tiny sizes)."""
import importlib.util
from pathlib import Path

import numpy as np

EX = Path(__file__).parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EX / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generate_training_set(tmp_path):
    res = _load("generate_training_set").main(
        ["--n", "5000", "--out", str(tmp_path / "ts"), "--block", "4096", "--chunk", "4096"])
    assert res.n_requested == 5000 and res.n_kept + res.n_dropped == 5000
    assert (tmp_path / "ts" / "manifest.json").exists()


def test_batch_inference(tmp_path):
    t = _load("batch_inference").main(
        ["--out", str(tmp_path / "p.fits"), "--n-samples", "200", "--n-mock", "30",
         "--tiny-train", "20000", "--workdir", str(tmp_path / "w")])
    assert len(t) == 30 and np.all(np.isfinite(t["logmstar_p50"]))


def test_fit_single_galaxy(tmp_path):
    """Flow vs NUTS on one mock galaxy (tiny flow, short NUTS): outputs and their consistency.
    NUTS settings as in test_cli.py::test_mcmc_command_fits_catalog_rows and the tiny demo
    (20 + 20 draws, tree depth 4), 200 flow draws as in test_batch_inference: the session's
    compilation cache serves their compiled programs to each other."""
    out = tmp_path / "g"
    s = _load("fit_single_galaxy").main(
        ["--out", str(out), "--n-samples", "200", "--chains", "2", "--warmup", "20",
         "--draws", "20", "--max-tree-depth", "4", "--tiny-train", "20000", "--epochs", "2"])
    for f in ("corner.png", "sed.png", "summary.json", "nuts.npz"):
        assert (out / f).stat().st_size > 0
    from sedflow_jax import mcmc as M
    from sedflow_jax.sim import prior as P

    r = M.load_result(out / "nuts.npz")
    assert r.samples.shape == (2, 20, 11) and r.info["init"] == "samples"
    np.testing.assert_allclose(r.theta[..., 1:5].sum(-1), 1.0, atol=1e-5)
    # medians reported = medians of the saved draws; truth is a prior draw inside the box
    np.testing.assert_allclose(s["nuts"]["median"]["logmstar"],
                               np.median(r.flat_samples[:, 0]), rtol=1e-6)
    lo, hi = P.sampling_bounds(P.provabgs_prior())
    t = np.array(list(s["truth"].values()))
    assert np.all((t >= np.asarray(lo)) & (t <= np.asarray(hi)))
    assert 0.0 <= s["c2st_flow_vs_nuts"] <= 1.0 and s["speedup_flow_vs_nuts"] > 1.0


def test_demo_end_to_end_tiny(tmp_path):
    """`sedflow-jax demo` with tiny sizes: every stage runs and writes its outputs."""
    from astropy.table import Table

    from sedflow_jax.demo import run_demo

    # the examples' quick flow on their 20,000 simulated rows (seed 0), 200 draws for the
    # catalog (24 galaxies) and the calibration stage (32): the session's compilation cache
    # serves the training programs (as test_fit_single_galaxy's) and the sampler (as
    # test_batch_inference's and test_fit_single_galaxy's)
    tiny = dict(n_train=20_000, blocks=3, hidden=64, max_epochs=2, patience=2, n_catalog=24,
                n_samples=200, n_mcmc=1, mcmc_chains=1, mcmc_samples=20, mcmc_warmup=20,
                mcmc_tree_depth=4, n_test=32, n_test_samples=200)
    summ = run_demo(tmp_path / "d", "small", overrides=tiny, progress=False)
    d = tmp_path / "d"
    cat = Table.read(d / "mock_catalog.fits")
    post = Table.read(d / "posteriors.fits")
    assert len(cat) == 24 and len(post) == 24
    # truths carried next to the posterior summaries
    np.testing.assert_allclose(post["logmstar_true"], cat["logmstar"])
    for f in ("summary.json", "summary.md", "config.json"):
        assert (d / f).stat().st_size > 0
    assert any((d / "figures").glob("*.png"))
    assert summ["mcmc"]["n"] == 1 and summ["catalog"]["n"] == 24
    assert summ["config"]["n_train"] == 20_000 and "sedflow_jax_version" in summ
