"""Photometry throughput of the JAX model vs dsps and vs the NumPy reference, same run.

    python benchmarks/bench_photometry.py [--sizes 1 1000 100000] [--z-max 0.2]

Prints galaxies/s for ugriz photometry at each batch size (float32, CPU or GPU: whatever JAX
sees), and the ratio against two peers measured in the same run on the same grid:
  * dsps's per-galaxy SED from an SFH table + calc_obs_mag (jit+vmap, float64; a subprocess,
    because importing dsps turns on float64 for the whole process), and
  * the slow, obvious NumPy reference of tests/reference_model.py (a few galaxies).
Goal (training-set issue): >= 4e4 galaxies/s on 2 CPU cores.
It also prints, in the same run, what a JAX user writes, ``jit(vmap(model.photometry_fn()))``,
against ``model.photometry`` on one batch (--vmap-n, 1e5) and their ratio (architecture issue,
item 7: the per-galaxy kernel's vmap rule uses the blocked batch path, so the ratio is ~1).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, repeat=3):
    fn()  # compile / warm up
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 1000, 100000])
    ap.add_argument("--z-max", type=float, default=0.2)
    ap.add_argument("--dsps-n", type=int, default=1000)
    ap.add_argument("--ref-n", type=int, default=20)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--vmap-n", type=int, default=100000, help="0: skip the vmap comparison")
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp

    import sedflow_jax as sj
    from sedflow_jax.sim import prior as P

    model = sj.load_model(z_max=a.z_max)
    pr = P.provabgs_prior(zmax=a.z_max)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"{os.cpu_count()} CPU cores; model {model}")
    rows = []
    key = jax.random.key(0)
    for n in a.sizes:
        k1, k2 = jax.random.split(jax.random.fold_in(key, n))
        th = P.sample(k1, pr, n)
        z = jnp.clip(P.sample_redshift(k2, pr, n), 1e-3, None)
        dt = timed(lambda: model.phot_batch(th, z, model.tables).block_until_ready(),
                   repeat=3 if n <= 10**5 else 1)
        rows.append((n, dt, n / dt))
        print(f"  ours  n={n:>8d}: {dt * 1e3:10.2f} ms  {n / dt:12.0f} galaxies/s")

    if a.vmap_n:
        vmap_vs_batch(model, pr, a.vmap_n)

    if not a.no_peers:
        res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dsps_peer.py"),
                              "--n", str(a.dsps_n)], capture_output=True, text=True)
        dsps_rate = json.loads(res.stdout.strip().splitlines()[-1])["galaxies_per_s"] \
            if res.returncode == 0 else float("nan")
        if res.returncode:
            print("dsps peer failed:", res.stderr[-500:])
        sys.path.insert(0, str(ROOT / "tests"))
        import reference_model as ref

        th = np.asarray(P.sample(jax.random.key(1), pr, a.ref_n), float)
        zs = np.linspace(0.02, a.z_max, a.ref_n)
        ref.reference_photometry(th[0], zs[0])  # load caches
        t0 = time.perf_counter()
        for t, z in zip(th, zs):
            ref.reference_photometry(t, z)
        ref_rate = a.ref_n / (time.perf_counter() - t0)
        best = max(r[2] for r in rows)
        print(f"  dsps (per-galaxy SED + calc_obs_mag, vmapped, float64): {dsps_rate:10.1f} galaxies/s")
        print(f"  NumPy reference (loops, speclite):                      {ref_rate:10.1f} galaxies/s")
        print(f"ratio ours(best batch)/dsps = {best / dsps_rate:8.1f}x ; "
              f"ours/NumPy reference = {best / ref_rate:8.0f}x")
        print(f"goal >= 4e4 galaxies/s: {'met' if best >= 4e4 else 'NOT met'} ({best:.0f}/s)")


def vmap_vs_batch(model, pr, n):
    """galaxies/s of jit(vmap(photometry_fn())) and of model.photometry on the same batch."""
    import jax
    import jax.numpy as jnp

    from sedflow_jax.sim import prior as P

    k1, k2 = jax.random.split(jax.random.key(7))
    th = P.sample(k1, pr, n)
    z = jnp.clip(P.sample_redshift(k2, pr, n), 1e-3, None)
    fv = jax.jit(jax.vmap(model.photometry_fn()))
    th_np, z_np = np.asarray(th), np.asarray(z)
    dt_v = timed(lambda: fv(th, z).block_until_ready(), repeat=2)
    dt_b = timed(lambda: model.photometry(th_np, z_np).block_until_ready(), repeat=2)
    rv, rb = n / dt_v, n / dt_b
    print(f"  jit(vmap(photometry_fn())) n={n}: {rv:10.0f} galaxies/s ; model.photometry: "
          f"{rb:10.0f} galaxies/s ; ratio vmap/photometry = {rv / rb:.2f}")


if __name__ == "__main__":
    main()
