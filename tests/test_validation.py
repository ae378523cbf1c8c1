"""validate_posterior on a trained (small) SEDflow model: outputs and well-formed statistics."""
import json

import numpy as np

import sedflow_jax as sj
from sedflow_jax.nn import flow as F
from sedflow_jax.nn import train as T
from sedflow_jax.nn import checkpoint as CK
from sedflow_jax.nn import data as TD
from sedflow_jax.eval.validation import validate_posterior
from sedflow_jax.sim import prior as P


def test_validate_writes_figures_and_summary(tmp_path):
    # the training set and quick flow of examples/batch_inference.py (test_batch_inference: the
    # same rows, flow and optimizer, so the session's compilation cache serves its programs)
    sj.simulate(0, 20_000, out=tmp_path / "ts", progress=False)
    fc = F.FlowConfig.small(11, 11).replace(n_blocks=3, hidden=64)
    post, _ = sj.train_posterior(str(tmp_path / "ts"), tmp_path / "m", flow_config=fc,
                                 train_config=T.TrainConfig(max_epochs=8, patience=3,
                                                            progress=False))
    res = validate_posterior(post, 0, n_test=60, n_samples=100, out=tmp_path / "v")
    assert res.ranks.shape[1] == 11 and res.ranks.min() >= 0 and res.ranks.max() <= 100
    for f in ("sbc.png", "coverage.png", "validation.json", "validation.md"):
        assert (tmp_path / "v" / f).stat().st_size > 0
    s = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert s["n_test"] == 60 and set(s["sbc"]) == set(P.SAMPLING_NAMES)
    cov = np.array(list(s["coverage_95"].values()))
    assert np.all((cov >= 0) & (cov <= 1))
    # stellar mass is well constrained even by a small flow: its 95% interval covers most truths
    assert s["coverage_95"]["logmstar"] > 0.75
