"""Benchmark: real-catalog inference throughput (galaxies/s at 10^4 posterior samples each), CPU.

    python benchmarks/bench_real.py --model real_sdss_out/work/model --n-galaxies 64

Reads real SDSS galaxies (0.01 < z < 0.2) from ``examples/data/sdss_main_10k.fits``, builds the
band masks and support checks, and times :func:`sedflow_jax.sbi.inference.infer_catalog` (reading,
masking, sampling with prior rejection; derived properties off) after a warm-up call that
compiles the sampler. Without ``--model`` a small mask-aware model is trained first (the timing
then refers to that architecture: ``--blocks`` x ``--hidden``). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--n-galaxies", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=10_000)
    ap.add_argument("--train-rows", type=int, default=60_000)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--max-rows", type=int, default=65536, help="draws per compiled call")
    ap.add_argument("--workdir", default="bench_real_work")
    a = ap.parse_args(argv)

    import importlib.util

    import jax

    from sedflow_jax.sbi import inference as INF
    from sedflow_jax.sbi.posterior import AmortizedPosterior

    spec = importlib.util.spec_from_file_location("real_sdss", ROOT / "examples" / "real_sdss.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    if a.model is None:
        post, _ = ex.train_masked_model(a.workdir, train_rows=a.train_rows, max_epochs=30,
                                        n_blocks=a.blocks, hidden=a.hidden)
    else:
        post = AmortizedPosterior.load(a.model)
    cat = ex.load_catalog(a.n_galaxies, seed=1)
    INF.infer_catalog(post, cat[:8], n_samples=a.n_samples, derived=False, max_rows=a.max_rows,
                    **ex.READ_KW)  # compile
    t0 = time.perf_counter()
    res = INF.infer_catalog(post, cat, key=1, n_samples=a.n_samples, derived=False,
                          max_rows=a.max_rows, **ex.READ_KW)
    wall = time.perf_counter() - t0
    rep = res.report
    fc = post.flow.config
    out = {"galaxies": len(cat), "fit": rep["n_rows_fit"], "n_samples": a.n_samples,
           "wall_s": round(wall, 2), "galaxies_per_s": round(rep["n_rows_fit"] / wall, 3),
           "posterior_samples_per_s": round(rep["n_rows_fit"] * a.n_samples / wall),
           "acceptance_mean": round(rep["acceptance_mean"], 3), "max_rows": a.max_rows,
           "flow": f"MAF {fc.n_blocks} blocks x {fc.hidden}, d_context {fc.d_context}",
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "jax": jax.__version__, "backend": jax.default_backend()}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
