"""The prepared GPU benchmark runs end to end (its --quick mode, on the CPU) and reports every
section with a positive figure."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_quick_runs(tmp_path):
    out = tmp_path / "suite.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--quick",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    whats = [f["what"] for f in res["figures"]]
    for section in ("photometry", "simulate", "train step", "catalog sampling", "importance"):
        assert any(w.startswith(section) for w in whats), (section, whats)
    assert all(f["value"] > 0 for f in res["figures"] if "importance" not in f["what"])
    assert res["quick"] is True and res["backend"] == "cpu"
