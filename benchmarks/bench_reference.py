"""Time of the slow, obvious NumPy reference model (tests/reference_model.py) for one galaxy.

The tests compare the JAX model against this reference on many draws; its cost sets how many
they can afford. Run: ``python benchmarks/bench_reference.py`` (moved here from a wall-clock
assertion in tests/test_reference_selfcheck.py: timing goals live in benchmarks/).
"""
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import reference_model as R  # noqa: E402

THETA = np.array([10.0, 0.25, 0.25, 0.25, 0.25, 0.1, 2.0, 1e-3, 1e-3, 0.5, 0.5, -0.3])

if __name__ == "__main__":
    R.reference_photometry(THETA, 0.1)  # warm caches
    times = []
    for z in (0.03, 0.07, 0.12, 0.18):
        t0 = time.perf_counter()
        R.reference_photometry(THETA, z)
        times.append(time.perf_counter() - t0)
    print(f"reference_photometry: median {np.median(times):.3f} s per galaxy "
          f"(goal < 1 s; min {min(times):.3f}, max {max(times):.3f})")
