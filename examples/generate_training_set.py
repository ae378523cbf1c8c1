"""Generate a SEDflow training set on whatever device JAX sees (GPU if present, else CPU).

    python examples/generate_training_set.py --n 1131561 --out trainset [--block 65536]

Larger blocks use a GPU better (one compiled call per block); the rows depend on the block size,
so keep it fixed for a data set. Resumable: run the same command again after a kill.
"""
import argparse
import time

import jax

import sedflow_jax as sj


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_131_561)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default="trainset")
    ap.add_argument("--block", type=int, default=65536 if jax.default_backend() == "gpu" else 4096)
    ap.add_argument("--chunk", type=int, default=262_144)
    a = ap.parse_args(argv)
    print(f"JAX backend: {jax.default_backend()} ({jax.devices()[0].device_kind})")
    t0 = time.perf_counter()
    res = sj.simulate(a.seed, a.n, out=a.out, chunk=max(a.chunk, a.block), block=a.block)
    dt = time.perf_counter() - t0
    print(f"{res.n_requested:,} rows in {dt:.1f} s ({res.n_requested / dt:,.0f} galaxies/s incl. "
          f"compilation); kept {res.n_kept:,}; dropped {res.dropped}; -> {res.out}")
    return res


if __name__ == "__main__":
    main()
