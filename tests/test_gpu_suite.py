"""The prepared GPU benchmark runs end to end (its --quick mode, on the CPU) and reports every
section with a positive figure."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_quick_runs(tmp_path):
    # in this process (the script's main, as `python benchmarks/gpu_suite.py --quick` runs it):
    # a subprocess would import JAX again and reload every compiled program from the cache
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    out = tmp_path / "suite.json"
    suite.main(["--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    whats = [f["what"] for f in res["figures"]]
    for section in ("photometry", "simulate", "train step", "catalog sampling", "importance"):
        assert any(w.startswith(section) for w in whats), (section, whats)
    assert all(f["value"] > 0 for f in res["figures"] if "importance" not in f["what"])
    assert res["quick"] is True and res["backend"] == "cpu"
