"""Training-set generation throughput: prior -> photometry -> noise -> x -> disk, vs dsps.

    python benchmarks/bench_simulate.py [--n 100000 1000000] [--block 4096] [--chunk 100000]

For each n, times :func:`sedflow_jax.simulation.simulate` writing a real shard folder (after a
small warm-up run, so compilation is reported separately), and reports galaxies/s, the
simulate-internal steady-state rate, kept fraction, disk size and the process's peak resident
memory (``resource.getrusage(...).ru_maxrss``; a running maximum, so the figure after the largest
n is the peak of the whole pipeline at that size).

The peer is dsps's per-galaxy path on the same SSP grid in the same run:
``calc_rest_sed_sfh_table_met_table`` (100-point SFH and metallicity tables) + ``calc_obs_mag``
per filter, jit + vmap over ``--dsps-n`` galaxies (benchmarks/dsps_peer.py, in a subprocess
because ``import dsps`` turns on float64 for the whole process). The dsps figure covers
photometry only (no prior draw, noise or disk), so the ratio is conservative for us.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def dir_mib(path) -> float:
    return sum(p.stat().st_size for p in Path(path).iterdir()) / 2**20


def run_dsps_peer(n: int, filters) -> dict:
    script = ROOT / "benchmarks" / "dsps_peer.py"
    if not script.exists():
        return {"error": f"{script} not found"}
    cmd = [sys.executable, str(script), "--n", str(n), "--filters", *filters]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=float, nargs="+", default=[1e5, 1e6],
                    help="training-set sizes to time (default 1e5 1e6)")
    ap.add_argument("--block", type=int, default=None, help="rows per block (default 4096)")
    ap.add_argument("--chunk", type=int, default=100_000, help="rows per shard")
    ap.add_argument("--out-dir", default=None, help="where to write (default: a temp folder)")
    ap.add_argument("--keep-files", action="store_true", help="do not delete the written sets")
    ap.add_argument("--dsps-n", type=int, default=1000, help="galaxies for the dsps peer")
    ap.add_argument("--no-peer", action="store_true", help="skip the dsps subprocess")
    a = ap.parse_args()

    import jax

    from sedflow_jax.sim import simulate as S
    from sedflow_jax.sim import readers as SR
    from sedflow_jax.sim import layout
    from sedflow_jax.sed.model import load_model

    block = a.block or S.DEFAULT_BLOCK
    t0 = time.perf_counter()
    model = load_model(z_max=0.2)
    t_load = time.perf_counter() - t0
    rss_model = maxrss_mib()
    dev = jax.devices()[0]
    print(f"device: {getattr(dev, 'device_kind', dev)} ({jax.default_backend()}), "
          f"{os.cpu_count()} CPU cores; jax {jax.__version__}; grid {model.grid.name}; "
          f"filters {', '.join(model.filter_names)}; block {block}, chunk {a.chunk}")
    print(f"model load {t_load:.2f} s, peak RSS after load {rss_model:.0f} MiB")

    # warm-up: compiles the block kernel once (same shapes as the timed runs)
    t0 = time.perf_counter()
    S.simulate(0, block, model, block=block, progress=False)
    t_compile = time.perf_counter() - t0
    print(f"warm-up (compile + {block} rows): {t_compile:.2f} s")

    base = Path(a.out_dir) if a.out_dir else Path(tempfile.mkdtemp(prefix="bench_simulate_"))
    rows = []
    for n in (int(x) for x in a.n):
        out = base / f"n{n}"
        t0 = time.perf_counter()
        r = S.simulate(1, n, model, out=out, block=block, chunk=a.chunk, overwrite=True,
                       progress=False)
        wall = time.perf_counter() - t0
        rows.append({
            "n": n, "wall_s": wall, "gal_per_s": n / wall,
            "steady_gal_per_s": r.timings["galaxies_per_s"],
            "write_s": r.timings["write_s"], "kept": r.n_kept / n,
            "disk_mib": dir_mib(out), "maxrss_mib": maxrss_mib(),
        })
        print(f"  n={n:>9,d}: {wall:7.1f} s  {n / wall:9,.0f} gal/s  kept {r.n_kept / n:.3f}  "
              f"dropped {r.dropped}", flush=True)
        if not a.keep_files:
            shutil.rmtree(out, ignore_errors=True)
    if not a.keep_files and not a.out_dir:
        shutil.rmtree(base, ignore_errors=True)

    peer = None if a.no_peer else run_dsps_peer(a.dsps_n, model.filter_names)

    print()
    print("Training-set generation (prior -> ugriz photometry -> noise -> x -> .npz shards)")
    hdr = (f"{'n':>10}  {'wall [s]':>9}  {'gal/s':>9}  {'steady gal/s':>12}  {'write [s]':>9}  "
           f"{'kept':>6}  {'disk [MiB]':>10}  {'peak RSS [MiB]':>14}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['n']:>10,d}  {r['wall_s']:>9.1f}  {r['gal_per_s']:>9,.0f}  "
              f"{r['steady_gal_per_s']:>12,.0f}  {r['write_s']:>9.2f}  {r['kept']:>6.3f}  "
              f"{r['disk_mib']:>10.1f}  {r['maxrss_mib']:>14.0f}")
    print(f"(compile + first {block} rows: {t_compile:.1f} s, not included above)")
    if peer is not None:
        print()
        if "error" in peer:
            print(f"dsps peer: unavailable ({peer['error']})")
        else:
            print(f"dsps per-galaxy path (SED from {peer['n_t']}-point SFH table + calc_obs_mag, "
                  f"jit+vmap, float64={peer['x64']}, n={peer['n']}): "
                  f"{peer['galaxies_per_s']:,.0f} gal/s")
            for r in rows:
                print(f"  ratio ours/dsps at n={r['n']:,d}: "
                      f"{r['gal_per_s'] / peer['galaxies_per_s']:,.0f}x (end to end, incl. disk)")
    print(json.dumps({"rows": rows, "compile_s": t_compile, "dsps": peer}))


if __name__ == "__main__":
    main()
