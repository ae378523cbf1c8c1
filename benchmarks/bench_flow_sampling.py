"""Benchmark: drawing from a MAF -- the incremental inverse (``Flow.noise_to_theta``, what every
sampler of the package runs) against the degree-prefix inverse it replaced (the same flow's
distrax bijector with ``sampler='prefix'``: every step recomputes the hidden units of degree
<= i), measured in one process, interleaved, on the shipped ``sdss_ugriz`` flow (5 x 128).

Both draw for m galaxies x n draws in blocks of ``--blocks`` draws (``jax.lax.map`` over rows,
as :class:`sedflow_jax.sbi.sampling.RowSampler` does on a CPU); the draws agree to float32
rounding (printed). Prints draws per second, median of ``--reps`` interleaved repetitions.

Usage:  python benchmarks/bench_flow_sampling.py [--galaxies 128] [--draws 1000]
        [--blocks 4096,16384] [--reps 4]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _sampler(flow, n, rows_per_block, method):
    import jax
    from flax import nnx

    graphdef, state = nnx.split(flow)

    def one(key, x):
        f = nnx.merge(graphdef, state)
        z = jax.random.normal(key, (n, f.config.d_theta))
        if method == "incremental":
            return f.noise_to_theta(z, x)
        return f.bijector(x, sampler="prefix").forward(z)

    @jax.jit
    def run(keys, xs):
        return jax.lax.map(lambda a: one(*a), (keys, xs), batch_size=rows_per_block)

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--galaxies", type=int, default=128)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--blocks", default="4096,16384", help="draws per block, comma-separated")
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args(argv)

    import jax

    import sedflow_jax as sj

    post = sj.load_posterior("sdss_ugriz")
    rng = np.random.default_rng(0)
    m, n = args.galaxies, args.draws
    x = np.column_stack([rng.normal(17, 0.5, (m, 5)), np.full((m, 5), 0.02),
                         np.full(m, 0.1)]).astype(np.float32)
    ctx = np.asarray(post.context(x, None)[0])
    keys = jax.random.split(jax.random.key(0), m)
    runs = {}
    for b in (int(v) for v in args.blocks.split(",")):
        rows = max(1, b // n)
        for method in ("incremental", "prefix"):
            runs[(method, b)] = _sampler(post.flow, n, rows, method)
    out = {k: np.asarray(f(keys, ctx)) for k, f in runs.items()}  # compile
    ref = out[("prefix", int(args.blocks.split(",")[0]))]
    speed = {k: [] for k in runs}
    for _ in range(args.reps):
        for k, f in runs.items():
            t = time.perf_counter()
            jax.block_until_ready(f(keys, ctx))
            speed[k].append(m * n / (time.perf_counter() - t))
    print(f"{m} galaxies x {n} draws, {jax.default_backend()}, {os.cpu_count()} CPU cores")
    for (method, b), v in speed.items():
        dev = np.max(np.abs(out[(method, b)] - ref) / (1 + np.abs(ref)))
        print(f"  {method:>11s}  block {b:>6d}: {np.median(v):9.3g} draws/s   "
              f"max |diff| / (1 + |theta|) vs prefix: {dev:.1e}")


if __name__ == "__main__":
    main()
