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
        ["--n", "5000", "--out", str(tmp_path / "ts"), "--block", "1024", "--chunk", "2048"])
    assert res.n_requested == 5000 and res.n_kept + res.n_dropped == 5000
    assert (tmp_path / "ts" / "manifest.json").exists()


def test_batch_inference(tmp_path):
    t = _load("batch_inference").main(
        ["--out", str(tmp_path / "p.fits"), "--n-samples", "200", "--n-mock", "30",
         "--tiny-train", "20000", "--workdir", str(tmp_path / "w")])
    assert len(t) == 30 and np.all(np.isfinite(t["logmstar_p50"]))
